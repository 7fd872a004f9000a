"""Packaging: a real wheel (and sdist) built with `python -m build`, installed non-editable into a
fresh venv, runs the first-hour commands from a folder outside the repository; shipped files and
user config folders are found; faiss is an extra; the LICENSE ships."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from ickd import resources
from ickd.config_store import compose_run_config
from tests.helpers import REPO

USER_DATASET = """\
# A user's dataset: the shipped synthetic one with 4 classes.
defaults:
  - synthetic
  - _self_
kwargs:
  num_classes: 4
"""
USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /dataset: my_tiny
trainer:
  epochs: 7
"""


def user_dirs(tmp: Path) -> tuple[Path, Path]:
    """Two user config folders: a dataset file in one, an experiment using it in the other."""
    a, b = tmp / "user_a", tmp / "user_b"
    (a / "dataset").mkdir(parents=True)
    (b / "experiment").mkdir(parents=True)
    (a / "dataset" / "my_tiny.yaml").write_text(USER_DATASET)
    (b / "experiment" / "my_exp.yaml").write_text(USER_EXPERIMENT)
    return a, b


# ----------------------------------------------------------------------------- fast checks
def test_shipped_paths_in_the_checkout_are_the_top_level_folders():
    assert resources.shipped_path("configs") == REPO / "configs"
    assert resources.shipped_path("sweeps") == REPO / "sweeps"
    assert resources.shipped_path("profiles") == REPO / "slurm" / "profiles"
    with pytest.raises(KeyError):
        resources.shipped_path("slurm")


def test_setup_py_ships_the_folders_resources_looks_for():
    tree = ast.parse((REPO / "setup.py").read_text())
    shipped = next(
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SHIPPED"
    )
    assert shipped == {f"ickd._shipped.{name}": folder for name, folder in resources.SHIPPED.items()}
    for folder in shipped.values():
        assert any((REPO / folder).glob("*.yaml")), folder


def test_user_config_dirs_from_env_compose_experiment_and_dataset(tmp_path, monkeypatch):
    a, b = user_dirs(tmp_path)
    monkeypatch.setenv("ICKD_CONFIG_PATH", f"{a}{os.pathsep}{b}")
    cfg = compose_run_config(["experiment=my_exp"])
    assert (cfg.dataset.name, cfg.dataset.kwargs.num_classes, cfg.trainer.epochs) == ("synthetic", 4, 7)
    cfg = compose_run_config(["dataset=my_tiny"])
    assert cfg.dataset.kwargs.num_classes == 4 and cfg.trainer.epochs != 7
    # Without the variable the user's files are not found (the env var is what made them compose).
    monkeypatch.delenv("ICKD_CONFIG_PATH")
    with pytest.raises(Exception, match="my_exp"):
        compose_run_config(["experiment=my_exp"])


def test_user_config_dirs_from_hydra_searchpath_override(tmp_path, monkeypatch):
    monkeypatch.delenv("ICKD_CONFIG_PATH", raising=False)
    a, b = user_dirs(tmp_path)
    cfg = compose_run_config([f"hydra.searchpath=[file://{a},file://{b}]", "experiment=my_exp"])
    assert (cfg.dataset.kwargs.num_classes, cfg.trainer.epochs) == (4, 7)


def test_missing_user_config_dir_is_named_in_a_warning(tmp_path, monkeypatch):
    a, _ = user_dirs(tmp_path)
    monkeypatch.setenv("ICKD_CONFIG_PATH", f"{tmp_path / 'typo'}{os.pathsep}{a}")
    with pytest.warns(UserWarning, match="ICKD_CONFIG_PATH names .*typo.*not a folder"):
        assert resources.user_config_dirs() == [a.resolve()]


def test_shipped_study_by_name_from_any_folder(tmp_path, monkeypatch):
    from ickd.sweep.spec import SpecError, _read, shipped_study

    monkeypatch.chdir(tmp_path)
    smoke = REPO / "sweeps" / "synthetic_smoke.yaml"
    for arg in ("synthetic_smoke", "synthetic_smoke.yaml", "sweeps/synthetic_smoke.yaml"):
        assert shipped_study(arg) == smoke
    assert shipped_study("elsewhere/synthetic_smoke") == Path("elsewhere/synthetic_smoke")
    assert _read("synthetic_smoke")[0]["name"] == "synthetic_smoke"
    with pytest.raises(SpecError, match="name of a shipped study: .*synthetic_smoke"):
        _read("no_such_study")


def test_license_is_apache_2_and_referenced():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("                                 Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) == 201
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject and 'license-files = ["LICENSE"]' in pyproject
    assert "[LICENSE](LICENSE)" in (REPO / "README.md").read_text()


def test_faiss_is_an_extra_not_a_dependency():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("faiss")]
    extras = project["optional-dependencies"]
    assert extras["faiss-cpu"][0].startswith("faiss-cpu") and extras["faiss-gpu"][0].startswith("faiss-gpu")
    assert "faiss-cpu" in (REPO / "Makefile").read_text().split("pip install -q -e", 1)[1].splitlines()[0]


# ----------------------------------------------------------------------------- the real wheel
SOURCES = ("ickd", "configs", "sweeps", "slurm", "pyproject.toml", "setup.py", "README.md", "LICENSE")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build sdist + wheel (the wheel from the sdist, as `python -m build` does) from a copy of the
    sources, install the wheel with --no-deps into a fresh venv, and borrow every other dependency
    from the running venv except faiss (a .pth to a folder of links), so the install is one
    *without* the faiss extra. Returns (venv python, venv bin, site-packages, dist folder)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for item in SOURCES:
        path = REPO / item
        (shutil.copytree(path, src / item, ignore=ignore) if path.is_dir() else shutil.copy2(path, src / item))
    dist = tmp / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels, sdists = sorted(dist.glob("ickd-*.whl")), sorted(dist.glob("ickd-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1

    venv = tmp / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheels[0])],
        capture_output=True, text=True, timeout=300,
    )
    assert inst.returncode == 0, inst.stdout + inst.stderr
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    farm = tmp / "borrowed"
    farm.mkdir()
    skip = ("ickd", "__editable__", "faiss")
    # Every site-packages folder of the running interpreter, first one wins (tools/check_floors.sh
    # runs this with a floors venv that itself borrows the rest from .venv).
    roots = [Path(p) for p in sys.path if Path(p).name == "site-packages" and Path(p).is_dir()]
    for root in roots or [Path(sysconfig.get_paths()["purelib"])]:
        for entry in root.iterdir():
            if entry.name.startswith(skip) or entry.suffix == ".pth" or (farm / entry.name).exists():
                continue
            (farm / entry.name).symlink_to(entry)
    (site / "zz_borrow_deps.pth").write_text(f"{farm}\n")  # after the venv's own site-packages
    return py, venv / "bin", site, dist


def run_installed(bin_dir: Path, args: list[str], cwd: Path, env_extra: dict[str, str] | None = None, timeout: float = 600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ICKD_", "VIRTUAL_ENV"))}
    env.update({"OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", **(env_extra or {})})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.mark.slow
def test_wheel_carries_configs_profiles_studies_and_license(installed):
    import tarfile
    import zipfile

    _, _, site, dist = installed
    names = zipfile.ZipFile(next(dist.glob("*.whl"))).namelist()
    for path in ("ickd/_shipped/configs/train.yaml", "ickd/_shipped/configs/experiment/fashion_mnist/demo.yaml",
                 "ickd/_shipped/sweeps/synthetic_smoke.yaml", "ickd/_shipped/profiles/a100.yaml",
                 "ickd-0.1.0.dist-info/licenses/LICENSE"):
        assert path in names, path
    for name in ("configs", "sweeps", "profiles"):  # every shipped yaml of the checkout is in the wheel
        for f in resources.shipped_path(name).rglob("*.yaml"):
            assert f"ickd/_shipped/{name}/{f.relative_to(resources.shipped_path(name))}" in names
    sdist = tarfile.open(next(dist.glob("*.tar.gz"))).getnames()
    for path in ("configs/train.yaml", "sweeps/synthetic_smoke.yaml", "slurm/profiles/a100.yaml", "LICENSE", "setup.py"):
        assert f"ickd-0.1.0/{path}" in sdist, path
    meta = next(site.glob("ickd-*.dist-info")) / "METADATA"
    text = meta.read_text()
    assert "License-Expression: Apache-2.0" in text
    assert "Provides-Extra: faiss-cpu" in text and "Provides-Extra: faiss-gpu" in text
    assert not [line for line in text.splitlines() if line.startswith("Requires-Dist: faiss") and "extra ==" not in line]


@pytest.mark.slow
def test_installed_wheel_runs_the_first_hour_commands_outside_the_repo(installed, tmp_path):
    py, bin_dir, site, _ = installed
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = run_installed(bin_dir, [str(py), "-c", textwrap.dedent("""
        import ickd, ickd.resources as r
        print(ickd.__file__)
        for name in ("configs", "sweeps", "profiles"):
            print(r.shipped_path(name))
        """)], cwd)
    lines = where.stdout.split()
    assert where.returncode == 0 and len(lines) == 4, where.stdout + where.stderr
    for line in lines:  # the package and its data come from the fresh venv, never the checkout
        assert Path(line).is_relative_to(site) and not Path(line).is_relative_to(REPO), line

    job = run_installed(bin_dir, ["ickd", "train", "--cfg", "job", "dataset=synthetic", "trainer.epochs=3"], cwd)
    assert job.returncode == 0, job.stdout + job.stderr
    assert "name: synthetic" in job.stdout and "epochs: 3" in job.stdout

    # A user config folder through ICKD_CONFIG_PATH, with the installed package.
    a, b = user_dirs(tmp_path)
    mine = run_installed(bin_dir, ["ickd", "train", "--cfg", "job", "experiment=my_exp"], cwd,
                         {"ICKD_CONFIG_PATH": f"{a}{os.pathsep}{b}"})
    assert mine.returncode == 0, mine.stdout + mine.stderr
    assert "num_classes: 4" in mine.stdout and "epochs: 7" in mine.stdout
    # ... and Hydra's own hydra.searchpath on the command line (ickd train's pre-check keeps it).
    hydra_way = run_installed(bin_dir, ["ickd", "train", f"hydra.searchpath=[file://{a},file://{b}]", "experiment=my_exp", "--cfg", "job"], cwd)
    assert hydra_way.returncode == 0, hydra_way.stdout + hydra_way.stderr
    assert "num_classes: 4" in hydra_way.stdout and "epochs: 7" in hydra_way.stdout

    env = {"ICKD_STUDIES": str(cwd / "studies"), "ICKD_LAUNCHES": str(cwd / "launches"),
           "ICKD_TEACHER": str(cwd / "no-teacher")}  # only composed by `create`, never loaded
    study = run_installed(bin_dir, ["ickd", "sweep", "create", "synthetic_smoke"], cwd, env)
    assert study.returncode == 0, study.stdout + study.stderr
    assert (cwd / "studies" / "synthetic_smoke" / "journal.log").is_file()

    launch = run_installed(bin_dir, ["ickd", "launch", "train", "--profile", "a100", "--dry-run", "dataset=synthetic"], cwd, env)
    assert launch.returncode == 0, launch.stdout + launch.stderr
    assert "1 run(s) would be submitted with profile a100" in launch.stdout


@pytest.mark.slow
def test_installed_wheel_without_faiss_uses_torch_and_explains_the_extra(installed, tmp_path):
    py, bin_dir, _, _ = installed
    probe = run_installed(bin_dir, [str(py), "-c", textwrap.dedent("""
        import importlib.util
        assert importlib.util.find_spec("faiss") is None, "faiss leaked into the no-extra venv"
        from ickd.errors import ConfigError
        from ickd.memory import MemoryBank
        bank = MemoryBank(1024, 1024, 3, retriever="auto")   # M*D = 2**20: faiss_flat if faiss were there
        print("auto:", bank.retriever.name, "|", bank.backend_reason)
        try:
            MemoryBank(64, 8, 3, retriever="faiss_flat")
        except ConfigError as exc:
            print("explicit:", exc)
        """)], tmp_path)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "auto: torch | " in probe.stdout and "faiss is not installed" in probe.stdout
    assert "explicit:" in probe.stdout and "pip install 'ickd[faiss-cpu]'" in probe.stdout


FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs `apt-get install dataset-fashion-mnist` (CI installs it)")
def test_installed_wheel_runs_the_demo_at_its_smallest(installed, tmp_path):
    _, bin_dir, _, _ = installed
    out = tmp_path / "demo"
    demo = run_installed(bin_dir, [
        "ickd", "demo", "--out", str(out), "--study-trials", "1", "--study-workers", "1", "--workers", "1",
        "--seeds", "2", "--baselines", "kd",
        "dataset.train_subset=300", "dataset.holdout=200", "dataset.val_subset=200", "trainer.epochs=1", "trainer.batch_size=64",
    ], tmp_path, timeout=1500)
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    assert (out / "summary.json").is_file() and "Bottom line:" in demo.stdout
