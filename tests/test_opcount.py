"""Issue 12, kernel diet: every op-count reduction of the fast path (``ickd.fastpath`` switches)
keeps losses and gradients equal to the plain eager computation (all switches off), and lowers the
number of ATen ops one step dispatches (bench/opcount.py gives the full table).

Equality: bit-level where the reduction keeps the op sequence (CE, KD, PICD values; the stacked
meters), else a stated tolerance: NICD's student probabilities become ``exp(log_softmax)`` instead of
``softmax`` (fp32 rounding, rel 1e-5), shared log-softmax nodes sum their gradients in another order
(rel 1e-5 in fp32; within 4 bf16 ulps for bf16 logits), and the folded teacher in bf16 rounds its
folded weights to bf16 (teacher logits within bf16 resolution, 5e-2 of their largest magnitude).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from ickd import fastpath
from ickd.methods import StepOutputs, create_method
from ickd.distill.paradigms import OfflineDistiller
from ickd.engine.step import EpochMeters
from ickd.memory import Neighbours
from ickd.models import create_model
from ickd.models.fold import fold_frozen

ALL_OFF = {name: False for name in fastpath.OPTIMISATIONS}


def call(method, student, teacher, labels, nb, epoch):
    """A method's losses for one step's outputs (indices unused by logit methods)."""
    return method(StepOutputs(student, teacher, labels, torch.arange(labels.shape[0]), epoch, nb))


@contextlib.contextmanager
def switches(**flags: bool):
    previous = fastpath.configure(flags)
    try:
        yield
    finally:
        fastpath.configure(previous)


METHOD_CFGS = {
    "ce": {"name": "ce", "ce_weight": 1.0},
    "kd": {"name": "kd", "ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0},
    "dkd": {"name": "dkd", "ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20},
    "ickd": {"name": "ickd", "ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "picd_weight": 0.5,
             "nicd_weight": 0.4, "warmup_epochs": 0, "tau_r": 0.05, "picd_weighting": "similarity",
             "picd_aggregate": "logits", "nicd_form": "contrastive", "kappa": 0.1, "nicd_temperature": 1.0,
             "nicd_weighting": "similarity"},
}
ICKD_VARIANTS = {
    "default(T_n=1)": {},
    "T_n=T": {"nicd_temperature": None},
    "probs+penalty": {"picd_aggregate": "probs", "nicd_form": "penalty", "nicd_weighting": "uniform"},
    "no_kd_no_nicd": {"kd_weight": 0.0, "nicd_weight": 0.0},
    "warmup(device ramp)": {"warmup_epochs": 5},
}


def neighbours(B: int = 16, K: int = 8, C: int = 10, seed: int = 0) -> tuple[Neighbours, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=g)
    nb_labels = torch.randint(0, C, (B, K), generator=g)
    nb_labels[:3] = (labels[:3].unsqueeze(1) + 1) % C  # rows without positives take the fallback
    nb_labels[3:6, :2] = labels[3:6].unsqueeze(1)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[6, 5:] = False
    nb = Neighbours(
        sims=torch.rand(B, K, generator=g) * valid, logits=torch.randn(B, K, C, generator=g) * 3 * valid.unsqueeze(-1),
        labels=torch.where(valid, nb_labels, -1), sample_indices=torch.arange(B * K).view(B, K),
        positive=valid & (nb_labels == labels.unsqueeze(1)), valid=valid,
    )
    return nb, labels


def losses_and_grad(cfg, flags, dtype=torch.float32, epoch=3):
    nb, labels = neighbours()
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(16, 10, generator=g) * 2).to(dtype).requires_grad_(True)
    teacher = (torch.randn(16, 10, generator=g) * 3).to(dtype)
    with switches(**flags):
        losses = call(create_method(cfg), student, teacher, labels, nb, epoch)
        sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, student.grad


@pytest.mark.parametrize("method", list(METHOD_CFGS))
def test_losses_and_gradients_match_the_eager_path_fp32(method):
    variants = ICKD_VARIANTS if method == "ickd" else {"": {}}
    for variant, extra in variants.items():
        cfg = {**METHOD_CFGS[method], **extra}
        ref_losses, ref_grad = losses_and_grad(cfg, ALL_OFF)
        new_losses, new_grad = losses_and_grad(cfg, {})
        assert list(new_losses) == list(ref_losses), variant
        for key, ref in ref_losses.items():
            # NICD: exp(log_softmax) for softmax; a device-scalar ramp multiplies in another order.
            if key == "nicd" and cfg.get("nicd_form") != "penalty" or extra.get("warmup_epochs") and key in ("picd", "nicd"):
                torch.testing.assert_close(new_losses[key], ref, rtol=1e-5, atol=1e-7, msg=f"{variant} {key}")
            else:
                assert torch.equal(new_losses[key], ref), f"{variant} {key}: {new_losses[key]} != {ref} (bit-level)"
        torch.testing.assert_close(new_grad, ref_grad, rtol=1e-5, atol=1e-8, msg=variant)


@pytest.mark.parametrize("method", list(METHOD_CFGS))
def test_losses_and_gradients_match_the_eager_path_bf16_logits(method):
    cfg = METHOD_CFGS[method]
    ref_losses, ref_grad = losses_and_grad(cfg, ALL_OFF, dtype=torch.bfloat16)
    new_losses, new_grad = losses_and_grad(cfg, {}, dtype=torch.bfloat16)
    for key, ref in ref_losses.items():
        torch.testing.assert_close(new_losses[key], ref, rtol=1e-5, atol=1e-7, msg=key)
    # The gradient lands in bf16 (the student logits' dtype, 8-bit mantissa): a gradient summed in
    # another order can round a few ulps apart; within 4 ulps (rel 2 * 2^-7 ~ 1.6e-2, say 2e-2).
    torch.testing.assert_close(new_grad.float(), ref_grad.float(), rtol=2e-2, atol=1e-5)


def test_shared_log_softmax_is_computed_once_per_temperature():
    """The point of the sharing: fewer log_softmax / softmax kernels (guard: it must be used)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_log_softmax", "_softmax"):
                self.n += 1
            return func(*args, **(kwargs or {}))

    nb, labels = neighbours()
    student, teacher = torch.randn(16, 10), torch.randn(16, 10)
    counts = {}
    # The fused node (its own test below) computes NICD's softmax itself: measure sharing alone.
    for name, flags in (("off", ALL_OFF), ("on", {"fused_incontext": False})):
        with switches(**flags), Count() as c:
            call(create_method(METHOD_CFGS["ickd"]), student, teacher, labels, nb, 0)
        counts[name] = c.n
    # student: 4 -> 3 (CE at 1, KD+PICD at T, NICD at T_n); neighbour weights and targets: 6 -> 4.
    assert counts["on"] <= counts["off"] - 3, counts


def _count_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("form", ["contrastive", "penalty", None])
def test_fused_incontext_node_passes_gradcheck_in_float64(form):
    """The closed-form backward of PICD + NICD against finite differences (float64)."""
    from ickd.losses.fused import InContextLosses

    g = torch.Generator().manual_seed(3)
    B, K, C = 5, 4, 7
    z = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    target_t = torch.softmax(torch.randn(B, C, generator=g, dtype=torch.float64), 1)
    target_n = torch.softmax(torch.randn(B, C, generator=g, dtype=torch.float64) * 2, 1)
    nb_logits = torch.randn(B, K, C, generator=g, dtype=torch.float64) * 3
    not_negative = torch.rand(B, K, generator=g) < 0.4
    not_negative[0] = True  # a row without negatives
    weights = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64), 1) * ~not_negative

    def fn(z):
        log_p = torch.log_softmax(z.detach() / 4.0, 1)
        # log_p enters detached (as from the shared KD log-softmax); make PICD's value depend on z
        # through the same formula so finite differences see the gradient the node returns.
        picd, nicd = InContextLosses.apply(z, log_p, target_t, target_n, nb_logits, not_negative,
                                           weights if form == "penalty" else None, 4.0, 1.0, 0.1, form)
        return nicd + 0.0 * picd

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # PICD's gradient on its own, against the autograd of the plain formula.
    picd, _ = InContextLosses.apply(z, torch.log_softmax(z.detach() / 4.0, 1), target_t, target_n, nb_logits,
                                    not_negative, None, 4.0, 1.0, 0.1, None)
    (grad,) = torch.autograd.grad(picd, z)
    plain = (torch.special.xlogy(target_t, target_t) - target_t * torch.log_softmax(z / 4.0, 1)).sum(1).mean() * 16
    (ref,) = torch.autograd.grad(plain, z)
    torch.testing.assert_close(picd, plain)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


def test_fused_incontext_dispatches_fewer_ops_forward_and_backward():
    """The point of the fused node (guard: it must be used): fewer ops for IC-KD's loss + backward."""
    nb, labels = neighbours()
    g = torch.Generator().manual_seed(1)
    counts = {}
    for name, flags in (("plain", {"fused_incontext": False}), ("fused", {})):
        student = (torch.randn(16, 10, generator=g) * 2).requires_grad_(True)
        teacher = torch.randn(16, 10, generator=g) * 3

        def step():
            sum(call(create_method(METHOD_CFGS["ickd"]), student, teacher, labels, nb, 0).values()).backward()

        with switches(**flags):
            counts[name] = _count_ops(step)
    assert counts["fused"] <= counts["plain"] - 40, counts


@pytest.mark.parametrize("method", ["dkd", "ickd"])
def test_warmup_ramp_is_a_device_scalar_that_never_changes_the_signature(method):
    """A captured step must see each epoch's ramp without a recapture: the signature stays the same
    and the trainer's per-step ``step_signature`` call (outside the graph) writes the new factor."""
    cfg = {**METHOD_CFGS[method], "warmup_epochs": 4}
    nb, labels = neighbours()
    student, teacher = torch.randn(16, 10), torch.randn(16, 10)
    m = create_method(cfg)
    first = call(m, student, teacher, labels, nb, 0)  # eager step: allocates and sets the scalar
    key = "dkd" if method == "dkd" else "picd"
    assert isinstance(m._ramp, torch.Tensor) and m._ramp.item() == 0.25
    signatures = {m.step_signature(e) for e in range(6)}
    assert signatures == {"device-ramp"}
    m.step_signature(2)  # what the trainer does before a replay at epoch 2
    assert m._ramp.item() == 0.75
    # A "replay": the captured graph would reuse the epoch-0 tensors; the factor it reads is m._ramp.
    torch.testing.assert_close(first[key] / 0.25 * m._ramp, call(m, student, teacher, labels, nb, 2)[key], rtol=1e-6, atol=0)
    with switches(device_ramp=False):
        plain = create_method(cfg)
        assert len({plain.step_signature(e) for e in range(6)}) == 4  # 0.25, 0.5, 0.75, 1.0: recaptures


@pytest.mark.parametrize("aggregate", ["logits", "probs"])
def test_targets_at_two_temperatures_equal_two_separate_calls_bit_for_bit(aggregate):
    from ickd.losses import aggregate_positive_targets, aggregate_positive_targets_at

    nb, _ = neighbours()
    teacher = torch.randn(16, 10)
    args = (nb.logits, nb.sims, nb.positive, teacher)
    both = aggregate_positive_targets_at(*args, (4.0, 1.0), tau_r=0.05, aggregate=aggregate)
    for t, target in zip((4.0, 1.0), both):
        assert torch.equal(target, aggregate_positive_targets(*args, t, tau_r=0.05, aggregate=aggregate))


def test_retrieval_stats_from_the_invariants_equal_the_masked_form_bit_for_bit():
    from ickd.distill.paradigms import retrieval_stats

    nb, _ = neighbours()
    with switches(stats=False):
        ref = retrieval_stats(nb, "p_")
    new = retrieval_stats(nb, "p_")
    assert list(new) == list(ref)
    for key in ref:
        assert new[key].dtype == ref[key].dtype == torch.float32 and torch.equal(new[key], ref[key]), key


# ------------------------------------------------------------------------------------ meters
def _feed(meters: EpochMeters, steps):
    meters.reset()
    for losses, stats, logits, labels in steps:
        meters.add(sum(losses.values()), losses, stats, logits, labels)


def test_stacked_meters_equal_per_key_meters_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    steps = []
    for i in range(6):
        ce, kd = torch.rand((), generator=g), torch.rand((), generator=g)
        if i == 3:
            kd = torch.tensor(math.nan)
        if i == 4:
            ce = torch.tensor(math.inf)
        steps.append(({"ce": ce, "kd": kd}, {"pos_frac": torch.rand((), generator=g)},
                      torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)))
    results = {}
    for name, flags in (("off", {"meters": False}), ("on", {"meters": True})):
        with switches(**flags):
            m = EpochMeters(torch.device("cpu"))
            _feed(m, steps)
            results[name] = ({k: v.clone() for k, v in m.sums.items()}, m.correct.clone(), m.nonfinite(), int(m.step))
            m.reset({"step": 7, "sums": {"ce": 3.0, "new": 1.5}, "correct": 5})
            results[name] += ({k: v.item() for k, v in m.sums.items()}, m.correct.item(), int(m.step))
    off, on = results["off"], results["on"]
    assert on[2] == off[2] == (3, ["kd"])
    assert on[1].item() == off[1].item() and on[3] == off[3] == 6
    assert set(on[0]) == set(off[0])
    for key in off[0]:
        a, b = on[0][key], off[0][key]
        assert torch.equal(a, b) or (torch.isnan(a) and torch.isnan(b)), key
    assert on[4] == off[4] and on[5] == off[5] == 5 and on[6] == off[6] == 7


def test_stacked_meters_use_few_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    losses = {name: torch.rand(()) for name in ("ce", "kd", "picd", "nicd")}
    stats = {name: torch.rand(()) for name in ("pos_frac", "nb_sim", "no_pos_frac")}
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    counts = {}
    for name, flag in (("off", False), ("on", True)):
        with switches(meters=flag):
            m = EpochMeters(torch.device("cpu"))
            m.reset()
            total = sum(losses.values())
            m.add(total, losses, stats, logits, labels)  # lays the meters out
            with Count() as c:
                m.add(total, losses, stats, logits, labels)
            counts[name] = c.n
    # 8 values: one stack + one add_ instead of ~2 ops each, and 2 ops for the non-finite check of
    # 4 losses instead of ~7 each (19 ops, views included).
    assert counts["on"] <= 20 and counts["on"] < counts["off"] / 2, counts


# ------------------------------------------------------------------------------- folded teacher
def test_fold_frozen_matches_the_teacher_in_fp32():
    torch.manual_seed(0)
    net = create_model("resnet8", 10, in_channels=3, widths=[8, 8, 16, 32]).eval()
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    folded = fold_frozen(net, torch.float32)
    assert folded is not None and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        (a, fa), (b, fb) = net(x), folded(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fb, fa, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        fold_frozen(net.train(), torch.float32)


def test_offline_step_uses_the_folded_teacher_under_autocast_only():
    torch.manual_seed(0)
    teacher = create_model("resnet8", 10, in_channels=3, widths=[8, 8, 16, 32])
    student = create_model("resnet8", 10, in_channels=3, widths=[4, 4, 8, 16])
    distiller = OfflineDistiller(student, create_method(METHOD_CFGS["kd"]), None, teacher, None)
    x = torch.randn(8, 3, 32, 32)
    assert distiller._step_teacher(x) is teacher  # no autocast: the teacher itself, fp32 exact
    outs = {}
    for name, flag in (("off", False), ("on", True)):
        with switches(teacher_fold=flag), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), torch.no_grad():
            net = distiller._step_teacher(x)
            assert (net is teacher) == (not flag)
            outs[name] = net(x)
    logits_off, logits_on = outs["off"][0].float(), outs["on"][0].float()
    assert outs["on"][0].dtype == outs["off"][0].dtype == torch.bfloat16
    scale = logits_off.abs().max()
    assert (logits_on - logits_off).abs().max() <= 5e-2 * scale
    # The bank fill pass runs the same folded network the steps query with.
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), torch.no_grad():
        assert torch.equal(distiller._fill_forward(teacher, x)[1], outs["on"][1])
    # Cached once; rebuilt when the teacher's weights change in place.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = distiller._step_teacher(x)
        assert distiller._step_teacher(x) is first
        with torch.no_grad():
            next(teacher.parameters()).mul_(2.0)
        assert distiller._step_teacher(x) is not first
    assert "_folded" not in dict(distiller.named_modules()) and not any("_folded" in k for k in distiller.state_dict())


# ------------------------------------------------------------------------------------- op counts
@pytest.mark.slow
def test_opcount_bench_counts_fewer_ops_with_the_optimisations(capsys):
    """bench/opcount.py on the small pair: every method counts fewer ops with the switches on."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import opcount

    rows = {}
    for name, baseline in (("off", ["--baseline", "all"]), ("on", [])):
        try:
            assert opcount.main(["--small", "--num-train", "512", "--methods", "kd", "ickd", *baseline]) == 0
        finally:
            fastpath.configure({k: True for k in fastpath.OPTIMISATIONS})
        lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
        rows[name] = {r["method"]: r["body_ops"] for r in lines if r["kind"] == "method"}
    assert rows["on"]["kd"] < rows["off"]["kd"] and rows["on"]["ickd"] < rows["off"]["ickd"], rows


# ------------------------------------------------------------------ the lean bank (``lean_bank``)
def _filled_bank(transform: str, dtype=torch.float32, n: int = 200, d: int = 12, c: int = 7, seed: int = 0):
    from ickd.memory import MemoryBank

    g = torch.Generator().manual_seed(seed)
    bank = MemoryBank(n, d, c, update="overwrite", feature_dtype=dtype, feature_transform=transform)
    bank.begin_fill()
    idx = torch.arange(n)
    labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(99))
    bank.fill(idx, torch.relu(torch.randn(n, d, generator=g)) + 0.1, torch.randn(n, c, generator=g), labels)
    bank.finish_fill()
    return bank, g


def _batch(g, b=16, n=200, d=12, c=7):
    # Labels as a dataset gives them: sample i always has label LABELS[i] (the bank's fill used them).
    idx = torch.randperm(n, generator=g)[:b]
    labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(99))[idx]
    return idx, torch.relu(torch.randn(b, d, generator=g)) + 0.1, torch.randn(b, c, generator=g), labels


@pytest.mark.parametrize("transform", ["none", "center", "center_whiten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lean_retrieval_equals_the_general_path(transform, dtype):
    """A full index-addressed bank: the same neighbours, similarities and order with and without
    the lean search (which skips every mask an empty slot would need)."""
    import copy

    bank, g = _filled_bank(transform, dtype)
    idx, feats, _, labels = _batch(g)
    out = {}
    for name, flags in (("general", {"lean_bank": False}), ("lean", {})):
        with switches(**flags):
            out[name] = copy.deepcopy(bank).retrieve(feats, 8, labels, exclude_indices=idx)
    ref, new = out["general"], out["lean"]
    assert new.all_valid and not ref.all_valid  # guard: the lean path ran
    for field in ("sims", "logits", "labels", "sample_indices", "positive", "valid"):
        assert torch.equal(getattr(new, field), getattr(ref, field)), field
    assert not (new.sample_indices == idx.unsqueeze(1)).any()  # self-exclusion


@pytest.mark.parametrize("transform", ["center", "center_whiten"])
def test_lean_writes_leave_the_bank_bit_identical(transform):
    """Retrieve-then-write steps (the memo of the normalised query, the in-place mean update and the
    skipped label/index re-writes) leave every tensor of the bank as the general path does."""
    import copy

    base, g = _filled_bank(transform)
    batches = [_batch(g) for _ in range(3)]
    states = {}
    for name, flags in (("general", {"lean_bank": False}), ("lean", {})):
        bank = copy.deepcopy(base)
        with switches(**flags):
            for idx, feats, logits, labels in batches:
                bank.retrieve(feats, 8, labels, exclude_indices=idx)
                bank.update(idx, feats, logits, labels)
        states[name] = bank.state_dict()
    for key, ref in states["general"].items():
        if isinstance(ref, torch.Tensor):
            assert torch.equal(states["lean"][key], ref), key


def test_the_normalisation_memo_is_not_used_for_another_or_a_changed_tensor():
    bank, g = _filled_bank("center")
    idx, feats, logits, labels = _batch(g)
    bank.retrieve(feats, 8, labels, exclude_indices=idx)
    assert bank._unit_memo is not None and bank._unit_memo[0] is feats
    feats.mul_(2.0)  # changed in place after the retrieval: its version moved on
    ref = copy_bank = None
    import copy

    copy_bank = copy.deepcopy(bank)
    copy_bank._unit_memo = None
    copy_bank.update(idx, feats, logits, labels)
    bank.update(idx, feats, logits, labels)
    assert bank._unit_memo is None  # a write consumes the memo
    ref = copy_bank.state_dict()
    for key, value in bank.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ref[key]), key


def test_bank_whitening_is_fp32_inside_a_bf16_autocast():
    """The fill pass and the step's writes run inside the step's bf16 autocast; the whitening
    matmul must stay fp32 (as for queries, which retrieval transforms with autocast off)."""
    import copy

    bank, g = _filled_bank("center_whiten")
    idx, feats, logits, labels = _batch(g)
    plain, cast = copy.deepcopy(bank), copy.deepcopy(bank)
    plain.update(idx, feats, logits, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast.update(idx, feats, logits, labels)
    assert torch.equal(cast.feats, plain.feats)


def test_lean_bank_and_fused_losses_dispatch_fewer_ops_in_retrieval_and_writes():
    """Guard that the lean paths are taken: one retrieve + write costs far fewer ops."""
    counts = {}
    for name, flags in (("general", {"lean_bank": False}), ("lean", {})):
        bank, g = _filled_bank("center_whiten")
        idx, feats, logits, labels = _batch(g)
        with switches(**flags), fastpath.simulated_capture():
            counts[name] = _count_ops(lambda: (bank.retrieve(feats, 8, labels, exclude_indices=idx),
                                               bank.update(idx, feats, logits, labels)))
    assert counts["lean"] <= counts["general"] - 30, counts
