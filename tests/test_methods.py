"""Methods as nn.Modules over a step's outputs (issue 13): a user's method from outside the package,
the feature-based baselines (FitNet, AT, CRD, ReviewKD) and composed methods train end to end, a
method's parameters train and its state is checkpointed and resumed exactly, and models give stage
features without a new state_dict key. The losses themselves are checked against hand computations
in tests/test_feature_losses.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ickd.engine import train
from ickd.errors import ConfigError
from ickd.methods import METHODS, StepOutputs, create_method
from ickd.models import create_model, forward_features
from tests.helpers import REPO, StopAfter, compose_config

SMALL = ["trainer.epochs=2", "trainer.max_batches_per_epoch=3", "dataset.kwargs.num_train=256", "dataset.kwargs.num_val=64",
         "trainer.deterministic=true"]


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --- models: stage features, same forward, same state_dict ------------------------------------------
@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "wrn_16_2", "vgg8"])
def test_forward_features_matches_forward_and_keeps_the_state_dict(name):
    torch.manual_seed(0)
    net = create_model(name, 10).eval()
    keys_before = list(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    logits, pooled = net(x)
    f_logits, feats = forward_features(net, x, ("stages", "preact"))
    assert torch.equal(f_logits, logits) and torch.equal(feats["pooled"], pooled)
    assert len(feats["stages"]) == len(feats["preact"]) >= 4
    for post, pre in zip(feats["stages"], feats["preact"]):
        assert post.shape == pre.shape and post.dim() == 4
    # the last stage pooled is the pooled feature
    torch.testing.assert_close(feats["stages"][-1].mean(dim=(2, 3)), pooled)
    assert list(net.state_dict()) == keys_before


def test_a_model_without_stage_features_is_named_with_the_fix():
    net = create_model("MobileNetV2", 10)
    with pytest.raises(ConfigError, match="per-stage features.*CIFAR ResNet, WRN or VGG"):
        forward_features(net, torch.randn(2, 3, 32, 32), ("stages",))


# --- the registry, composition and errors -----------------------------------------------------------
def test_every_shipped_method_is_registered_and_composites_merge_their_terms():
    assert {"ce", "kd", "kd_matched", "dkd", "ickd", "incontext", "composite", "fitnet", "at", "crd", "reviewkd"} <= set(METHODS)
    cfg = compose_config("distill=kd+picd").distill
    method = create_method(cfg)
    assert type(method).__name__ == "Composite" and method.needs_bank and method.needs_teacher
    assert list(method.terms) == ["kd", "incontext"]


def test_composite_terms_with_the_same_loss_name_are_refused():
    from tests.test_opcount import neighbours

    kd = {"name": "kd", "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 4.0}
    method = create_method({"name": "kd+kd", "terms": {"a": kd, "b": kd}})
    nb, labels = neighbours()
    out = StepOutputs(torch.randn(16, 10), torch.randn(16, 10), labels, torch.arange(16), 0, nb)
    with pytest.raises(ConfigError, match=r"term 'b' returns loss\(es\) \['ce', 'kd'\]"):
        method(out)


def test_a_target_that_is_not_a_method_is_refused():
    with pytest.raises(ConfigError, match="could not be imported"):
        create_method({"name": "x", "_target_": "nowhere.Nothing"})
    with pytest.raises(ConfigError, match="not a subclass of ickd.methods.Method"):
        create_method({"name": "x", "_target_": "torch.nn.Linear"})


def test_a_methods_parameters_join_the_optimised_set(teacher_dir):
    from ickd.distill import build_distiller

    cfg = compose_config("distill=fitnet", f"teacher.checkpoint={teacher_dir}")
    distiller = build_distiller(cfg, 10, 3, 256, torch.device("cpu"))
    trained = {id(p) for p in distiller.trainable_parameters()}
    head = list(distiller.method.parameters())
    assert head and all(id(p) in trained for p in head)
    assert not trained & {id(p) for p in distiller.teacher.parameters()}


# --- end to end ---------------------------------------------------------------------------------
METHOD_RUNS = {
    "fitnet": ["distill=fitnet"],
    "at": ["distill=at"],
    "crd": ["distill=crd", "distill.nce_k=64"],
    "reviewkd": ["distill=reviewkd"],
    "dkd+ickd": ["distill=dkd+ickd"],
    "crd+ickd": ["distill=crd+ickd", "distill.terms.crd.nce_k=64"],
    "kd+picd": ["distill=kd+picd"],
}
EXPECTED_LOSSES = {"fitnet": {"ce", "fitnet"}, "at": {"ce", "at"}, "crd": {"ce", "crd"}, "reviewkd": {"ce", "reviewkd"},
                   "dkd+ickd": {"ce", "dkd", "picd", "nicd"}, "crd+ickd": {"ce", "crd", "picd", "nicd"},
                   "kd+picd": {"ce", "kd", "picd"}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_baselines_and_composites_train_end_to_end(tmp_path, teacher_dir, name):
    summary = train(compose_config(*METHOD_RUNS[name], *SMALL, f"teacher.checkpoint={teacher_dir}"), tmp_path)
    assert summary["status"] == "completed", summary
    last = _metrics(tmp_path)[-1]
    losses = {k.removeprefix("train/") for k in last if k.startswith("train/")} - {"loss", "top1", "pos_frac", "nb_sim", "no_pos_frac"}
    assert losses == EXPECTED_LOSSES[name]
    assert all(torch.isfinite(torch.tensor(last[f"train/{k}"])) for k in losses)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["distiller"]
    if name in ("fitnet", "crd", "reviewkd", "crd+ickd"):  # methods with heads or memories
        assert state["method"], "the method's state is checkpointed"


@pytest.mark.slow
def test_a_method_with_state_resumes_exactly(tmp_path, teacher_dir):
    """CRD: its heads (trained), sample memories (buffers) and the RNG of its negative sampling come
    back from the checkpoint: an interrupted run ends with the uninterrupted run's weights."""
    args = ["distill=crd", "distill.nce_k=64", *SMALL, "trainer.epochs=3", f"teacher.checkpoint={teacher_dir}"]
    straight = tmp_path / "straight"
    train(compose_config(*args), straight)

    partial = tmp_path / "partial"
    assert train(compose_config(*args), partial, callbacks=[StopAfter(1)])["status"] == "stopped"
    assert train(compose_config(*args), partial)["resumed_from_epoch"] == 1
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)["distiller"]
    b = torch.load(partial / "checkpoints" / "last.pt", weights_only=False)["distiller"]
    for part in ("student", "method"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    # the sample memory was in use: its normalising constant is set on the first batch (-1 before)
    assert float(a["method"]["crd.contrast.z_s"]) > 0


def test_resuming_a_method_with_state_from_a_checkpoint_without_it_is_refused(teacher_dir):
    from ickd.distill import build_distiller
    from ickd.errors import CheckpointError

    distiller = build_distiller(compose_config("distill=fitnet", f"teacher.checkpoint={teacher_dir}"), 10, 3, 256, torch.device("cpu"))
    state = distiller.training_state()
    del state["method"]
    with pytest.raises(CheckpointError, match="another distill method"):
        distiller.load_training_state(state)


# --- a method from the user's own package --------------------------------------------------------
MY_METHOD = '''
"""A user's method, outside the ickd package: CE + a weighted MSE between logits, scaled by a
trainable temperature (a parameter, so it joins the optimiser and the checkpoints)."""
import torch
import torch.nn.functional as F
from torch import nn

from ickd.methods import Method


class MyMethod(Method):
    needs_teacher = True

    def __init__(self, cfg, context=None):
        super().__init__(cfg, context)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, out):
        gap = (out.student_logits.float() * self.log_scale.exp() - out.teacher_logits.float()).pow(2).mean()
        return {"ce": F.cross_entropy(out.student_logits.float(), out.labels),
                "mse": float(self.cfg["mse_weight"]) * gap}
'''


@pytest.mark.slow
def test_add_a_method_from_a_module_outside_the_package(tmp_path, teacher_dir):
    """README "Add a method": one Python file in the user's package plus one YAML in the user's config
    folder; `ickd train distill=my_method +distill._target_=mylab.kd.MyMethod`."""
    (tmp_path / "mylab").mkdir()
    (tmp_path / "mylab" / "__init__.py").write_text("")
    (tmp_path / "mylab" / "kd.py").write_text(textwrap.dedent(MY_METHOD))
    (tmp_path / "conf" / "distill").mkdir(parents=True)
    (tmp_path / "conf" / "distill" / "my_method.yaml").write_text("name: my_method\nmse_weight: 0.5\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), ICKD_CONFIG_PATH=str(tmp_path / "conf"))
    run = tmp_path / "run"
    args = ["dataset=synthetic", "teacher=resnet8", "student=resnet8", "trainer.device=cpu", "trainer.progress=off",
            "trainer.batch_size=32", *SMALL, f"teacher.checkpoint={teacher_dir}",
            "distill=my_method", "+distill._target_=mylab.kd.MyMethod", f"hydra.run.dir={run}"]
    proc = subprocess.run([sys.executable, "-m", "ickd.cli", "train", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = next(p.parent for p in run.rglob("metrics.jsonl"))
    last = _metrics(folder)[-1]
    assert {"train/ce", "train/mse"} <= set(last)
    state = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)["distiller"]
    assert float(state["method"]["log_scale"]) != 0.0  # the method's parameter trained


# --- paradigms decide from their class, not their name ----------------------------------------------
@pytest.mark.parametrize("paradigm", ["online", "teacher_free"])
def test_a_paradigm_whose_bank_source_trains_refuses_a_frozen_bank_and_a_fill_pass_transform(paradigm):
    from ickd.distill import PARADIGMS, build_distiller
    from ickd.distill.context import build_bank

    assert PARADIGMS.get(paradigm).source_trains and not PARADIGMS.get("offline").source_trains
    with pytest.raises(ConfigError, match="would freeze the first epoch"):
        build_distiller(compose_config("distill=ickd", f"paradigm={paradigm}", "memory.update=frozen"), 10, 3, 256, torch.device("cpu"))
    cfg = compose_config("distill=ickd", f"paradigm={paradigm}", "memory.feature_transform=center_whiten")
    with pytest.raises(ConfigError, match="computes its whitening once"):
        build_bank(cfg, 256, 64, 10, torch.device("cpu"), 0)
    offline = compose_config("distill=ickd", "memory.feature_transform=center_whiten")
    assert build_bank(offline, 256, 64, 10, torch.device("cpu"), 0).feature_transform == "center_whiten"
