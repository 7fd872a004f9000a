"""Issue 11, security: teacher files load weights-only unless trusted (a real pickle that would run
code), one redaction rule for W&B and storage URLs (real offline W&B files grepped for planted
secrets of every kind), and secrets in storage URLs are refused and never echoed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ickd.config_store import compose_run_config
from ickd.distill.build import build_teacher
from ickd.errors import CheckpointError
from ickd.models import create_model, load_pretrained
from ickd.redaction import REDACTED, is_secret_key, redact, redact_argv, redact_text
from ickd.sweep.storage import StorageError, has_password, open_storage, redact as redact_url
from tests.helpers import FAST, REPO, run_ickd
from tests.test_track import offline, offline_runs  # noqa: F401 (the fixture)


def ickd(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ickd.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# --- teacher checkpoints ----------------------------------------------------------------------

class _TouchOnLoad:
    """Unpickling this runs Path.touch(marker): the stand-in for a malicious payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def booby_trapped(tmp_path) -> tuple[Path, Path, torch.nn.Module]:
    """Valid ResNet8 teacher weights for the synthetic data plus an object that runs code when unpickled."""
    teacher = create_model("resnet8", 10, in_channels=3)
    marker = tmp_path / "code-ran"
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict(), "epoch": 3, "payload": _TouchOnLoad(marker)}, path)
    assert not marker.exists()
    return path, marker, teacher


def test_a_teacher_that_is_not_weights_only_is_refused_by_ickd_train_without_running_its_code(tmp_path, booby_trapped):
    path, marker, _ = booby_trapped
    proc = run_ickd("train", *FAST, "distill=kd", "paradigm=offline", f"teacher.checkpoint={path}",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr  # `ickd train` logs through Hydra's job logging (stdout)
    assert "runs code stored in the file" in said and "teacher.trust_checkpoint=true" in said
    assert "Traceback" not in said
    assert not marker.exists()  # nothing was unpickled


def test_trust_checkpoint_true_unpickles_and_loads_the_teacher(booby_trapped):
    path, marker, source = booby_trapped
    base = [*FAST, "distill=kd", "paradigm=offline", f"teacher.checkpoint={path}"]
    with pytest.raises(CheckpointError, match="arbitrary|runs code"):
        build_teacher(compose_run_config(base), 10, 3)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="weights_only=False"):
        teacher = build_teacher(compose_run_config([*base, "teacher.trust_checkpoint=true"]), 10, 3)
    assert marker.exists()  # the file's code ran: that is what trusting means
    for key, value in source.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[key], value, rtol=0, atol=0)


def test_weights_only_teachers_need_no_trust(tmp_path):
    source = create_model("resnet8", 10)
    torch.save({"model": source.state_dict(), "epoch": 240, "best_acc": 71.2}, tmp_path / "ok.pth")
    info = load_pretrained(create_model("resnet8", 10), tmp_path / "ok.pth")
    assert info["metadata"] == {"epoch": 240, "best_acc": 71.2}


# --- the redaction rule -----------------------------------------------------------------------

SECRET_KEYS = ["pwd", "db.password", "passwd", "passphrase", "ssh_passphrase", "credentials", "aws_credentials",
               "access_key", "aws_secret_access_key", "auth", "http_auth", "api_key", "apiKey", "WANDB_API_KEY",
               "private", "private_key", "hf_token", "client_secret", "secret", "token", "sslpassword", "pass", "authToken"]
PLAIN_KEYS = ["author", "authors", "tokenizer", "memory.k", "optim.lr", "passes", "n_passes", "keys", "dataset.root",
              "checkpoint", "trust_checkpoint", "name", "monkey", "passfile"]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_key_names(key):
    assert is_secret_key(key)
    assert redact({key: "v", "k": {key: 12345}}) == {key: REDACTED, "k": {key: REDACTED}}  # numbers too


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_key_names_are_kept(key):
    assert not is_secret_key(key) and redact({key: "v"}) == {key: "v"}


@pytest.mark.parametrize("text,expected", [
    ("https://TOKEN1@github.com/x.git", "https://***@github.com/x.git"),
    ("git+ssh://u:pw2@host/x", "git+ssh://u:***@host/x"),
    ("postgresql+psycopg2://me:p@ss3@db:5432/o", "postgresql+psycopg2://me:***@db:5432/o"),  # a raw "@" in it
    ("postgresql://me@db/o", "postgresql://me@db/o"),  # database schemes: a lone userinfo is the user
    ("s3://AKIA4:sec5@bucket/key", "s3://AKIA4:***@bucket/key"),
    ("https://h/x?sslpassword=6&sslmode=require", "https://h/x?sslpassword=***&sslmode=require"),
    ("https://h/x?access_token=7&X-Amz-Signature=8&apiKey=9&auth=10&page=2", "https://h/x?access_token=***&X-Amz-Signature=***&apiKey=***&auth=***&page=2"),
    ("plain text, memory.k=4", "plain text, memory.k=4"),
])
def test_secrets_inside_urls(text, expected):
    assert redact_text(text) == expected


def test_redact_argv_covers_override_and_option_forms():
    argv = ["ickd", "train", "+extra.pwd=a1", "logger.api_key=a2", "--token", "a3", "--auth=a4", "memory.k=4",
            "+u=https://a5@h/x", "author=ada"]
    assert redact_argv(argv) == ["ickd", "train", "+extra.pwd=***", "logger.api_key=***", "--token", "***", "--auth=***",
                                 "memory.k=4", "+u=https://***@h/x", "author=ada"]


# --- storage URLs ------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://me@127.0.0.1:5/db?sslpassword=s3cr3t-ssl",
    "postgresql+psycopg2://me@127.0.0.1:5/db?sslmode=require&password=s3cr3t-q",
    "postgresql+psycopg2://me:s3cr3t-pw@127.0.0.1:5/db",
    "postgresql+psycopg2://me@127.0.0.1:5/db?auth_token=s3cr3t-tok",
])
def test_secrets_in_storage_urls_are_refused_and_never_echoed(tmp_path, url):
    assert has_password(url) and "s3cr3t" not in redact_url(url)
    with pytest.raises(StorageError) as info:
        open_storage(url, tmp_path)
    assert "s3cr3t" not in str(info.value) and "PGPASSWORD" in str(info.value)
    proc = ickd("sweep", "--root", str(tmp_path / "studies"), "create", str(REPO / "sweeps" / "synthetic_smoke.yaml"),
                "--storage", url)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "s3cr3t" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    if "sslpassword" in url:
        assert "sslpassword" in proc.stderr and "service" in proc.stderr
    assert not (tmp_path / "studies" / "synthetic_smoke").exists()


def test_path_parameters_of_libpq_are_allowed_but_hidden_when_printed():
    url = "postgresql+psycopg2://me@db/o?sslkey=/home/me/.pg/key&sslcert=/home/me/.pg/crt&passfile=/home/me/.pgpass"
    assert not has_password(url)
    assert redact_url(url) == "postgresql+psycopg2://me@db/o?sslkey=***&sslcert=/home/me/.pg/crt&passfile=***"


# --- real offline W&B files --------------------------------------------------------------------

PLANTED = {
    "+extra.pwd": "pl-pwd-1", "+extra.passphrase": "pl-passphrase-2", "+extra.credentials": "pl-credentials-3",
    "+extra.aws_access_key": "pl-access-key-4", "+extra.auth": "pl-auth-5", "+extra.api_key": "pl-api-key-6",
    "+extra.private": "pl-private-7", "+extra.hf_token": "pl-token-8", "+extra.db_password": "pl-password-9",
    "+extra.client_secret": "pl-secret-10",
}
PLANTED_IN_VALUES = {
    "dataset.root": "https://pl-url-token-11@data.example.org/fmnist",  # dataset=synthetic ignores its root
    "+extra.storage": "postgresql+psycopg2://me:pl-url-password-12@db.example/optuna?sslpassword=pl-sslpassword-13",
    "+extra.query": "https://api.example.org/v1?access_token=pl-query-token-14&sig=pl-sig-15&key=pl-key-16",
}


@pytest.mark.slow
def test_no_planted_secret_reaches_any_offline_wandb_file(tmp_path, offline):  # noqa: F811
    out = tmp_path / "run"
    overrides = [f"{k}='{v}'" for k, v in {**PLANTED, **PLANTED_IN_VALUES}.items()]  # quoted: URLs hold = ? &
    run_ickd("train", *FAST, "stage=teacher", "model=resnet8", "trainer.epochs=1", "trainer.max_batches_per_epoch=2",
                    "logger=wandb", "+extra.author=ada-lovelace-kept", *overrides, f"hydra.run.dir={out}", cwd=tmp_path)
    (run,) = offline_runs(out)
    files = [p for p in (out / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and len(files) >= 3
    secrets = [v for v in PLANTED.values()] + ["pl-url-token-11", "pl-url-password-12", "pl-sslpassword-13",
                                               "pl-query-token-14", "pl-sig-15", "pl-key-16"]
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, (secret, path)
    wandb_file = next(p for p in files if p.suffix == ".wandb")
    assert b"ada-lovelace-kept" in wandb_file.read_bytes()  # the grep would find a planted value: not redacted
    config = run["config"]
    assert config["extra.author"] == "ada-lovelace-kept" and config["extra.pwd"] == REDACTED
    assert config["dataset.root"] == "https://***@data.example.org/fmnist"
