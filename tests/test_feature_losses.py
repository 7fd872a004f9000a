"""Feature-based baselines (FitNet, AT, CRD, ReviewKD): hand computations, shapes, gradient flow,
CRD memory behaviour. Expected values are worked out on paper in the comments."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ickd.errors import ConfigError
from ickd.losses.feature import (
    ABF,
    ContrastMemory,
    ConvRegressor,
    CRDLoss,
    Embed,
    ReviewKDHead,
    at_loss,
    attention_map,
    fitnet_loss,
    hcl_loss,
    nce_contrast_loss,
)
from ickd.models.cifar_resnet import CifarResNet

T = torch.tensor


def stage_features(model: CifarResNet, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The three stage outputs (post-ReLU, mdistiller's feats[1:]) and the pooled feature."""
    feats: list[torch.Tensor] = []
    hooks = [
        getattr(model, f"layer{i}").register_forward_hook(lambda m, i, o: feats.append(o)) for i in (1, 2, 3)
    ]
    try:
        _, pooled = model(x)
    finally:
        for h in hooks:
            h.remove()
    return feats, pooled


@pytest.fixture(scope="module")
def resnet_pair():
    torch.manual_seed(0)
    student = CifarResNet(8, (32, 64, 128, 256), 100)  # resnet8x4
    teacher = CifarResNet(32, (32, 64, 128, 256), 100)  # resnet32x4
    return student, teacher


# ------------------------------------------------------------------------------------------ FitNet
def test_fitnet_loss_hand_computation():
    # 1x2x2x2: differences 1, 0, -2, 0 | 0, 0, 0, 3  -> squares sum 1 + 4 + 9 = 14, mean 14/8 = 1.75
    s = T([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 5.0]]]])
    t = T([[[[0.0, 2.0], [5.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]]])
    assert fitnet_loss(s, t).item() == pytest.approx(1.75)
    assert fitnet_loss(s, s).item() == 0.0


def test_fitnet_identity_regressor_gives_zero_loss():
    reg = ConvRegressor(2, 2, 2, 2)
    assert isinstance(reg.conv, nn.Conv2d) and reg.conv.kernel_size == (1, 1)
    with torch.no_grad():
        reg.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        reg.conv.bias.zero_()
    reg.bn.eps = 0.0  # eval BN with running mean 0, var 1: identity
    reg.eval()
    f = torch.rand(1, 2, 2, 2)  # non-negative, so the ReLU is the identity too
    assert torch.equal(reg(f), f)
    assert fitnet_loss(reg(f), f).item() == 0.0


@pytest.mark.parametrize(
    "s_size, t_size, conv_type, kernel",
    [
        (16, 16, nn.Conv2d, (1, 1)),  # resnet8x4 -> resnet32x4 2nd stage (mdistiller's CIFAR hint)
        (32, 16, nn.Conv2d, (3, 3)),  # stride 2
        (8, 16, nn.ConvTranspose2d, (4, 4)),  # upsample x2
        ((10, 9), (8, 8), nn.Conv2d, (3, 2)),  # valid conv 1 + s - t
    ],
)
def test_conv_regressor_shapes(s_size, t_size, conv_type, kernel):
    reg = ConvRegressor(128, 256, s_size, t_size)
    assert type(reg.conv) is conv_type and tuple(reg.conv.kernel_size) == kernel
    sh, sw = (s_size, s_size) if isinstance(s_size, int) else s_size
    th, tw = (t_size, t_size) if isinstance(t_size, int) else t_size
    out = reg(torch.randn(3, 128, sh, sw))
    assert out.shape == (3, 256, th, tw)
    assert (out >= 0).all()  # conv-BN-ReLU, as mdistiller's ConvReg
    assert ConvRegressor(128, 256, s_size, t_size, use_relu=False)(torch.randn(3, 128, sh, sw)).min() < 0


def test_conv_regressor_rejects_smaller_student_map():
    with pytest.raises(ConfigError, match="smaller"):
        ConvRegressor(8, 8, 6, 8)


def test_fitnet_gradients_reach_student_and_regressor_not_teacher():
    reg = ConvRegressor(4, 6, 8, 8)
    s = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.randn(2, 6, 8, 8, requires_grad=True)
    fitnet_loss(reg(s), t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters())
    assert t.grad is None


# -------------------------------------------------------------------------------------------- AT
def test_attention_map_hand_computation():
    # single channel [[1, 2], [0, 0]]: p=2 -> [1, 4, 0, 0] / sqrt(17); p=1 -> [1, 2, 0, 0] / sqrt(5)
    f = T([[[[1.0, 2.0], [0.0, 0.0]]]])
    assert torch.allclose(attention_map(f), T([[1.0, 4.0, 0.0, 0.0]]) / math.sqrt(17))
    assert torch.allclose(attention_map(f, p=1), T([[1.0, 2.0, 0.0, 0.0]]) / math.sqrt(5))
    # two channels [[1, 0], [0, 0]] and [[3, 0], [0, 0]]: mean of squares [5, 0, 0, 0] -> [1, 0, 0, 0]
    g = T([[[[1.0, 0.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 0.0]]]])
    assert torch.allclose(attention_map(g), T([[1.0, 0.0, 0.0, 0.0]]))


def test_at_loss_hand_computation_sum_of_per_pair_means():
    # pair 1 (1x2x2x2): a_s = [1, 0, 0, 0]; a_t = [0, 1, 0, 0]  -> diff^2 [1, 1, 0, 0], mean 0.5
    s1 = T([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]])
    t1 = T([[[[0.0, 2.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]]])
    # pair 2: a_s = [1, 0, 0, 0]; teacher uniform -> a_t = [.5, .5, .5, .5] -> diff^2 .25 each, mean .25
    s2 = T([[[[3.0, 0.0], [0.0, 0.0]], [[4.0, 0.0], [0.0, 0.0]]]])
    t2 = torch.full((1, 2, 2, 2), 7.0)
    assert at_loss([s1], [t1]).item() == pytest.approx(0.5)
    assert at_loss([s2], [t2]).item() == pytest.approx(0.25)
    assert at_loss([s1, s2], [t1, t2]).item() == pytest.approx(0.75)


def test_at_loss_pools_the_larger_map_and_ignores_channel_count():
    # student 1x1x4x4 with the top-left 2x2 block = 2 -> pooled to 2x2: [[2, 0], [0, 0]] -> a = [1, 0, 0, 0]
    s = torch.zeros(1, 1, 4, 4)
    s[..., :2, :2] = 2.0
    t = torch.ones(1, 3, 2, 2)  # a_t = [.5] * 4
    assert at_loss([s], [t]).item() == pytest.approx(0.25)
    assert at_loss([t], [s]).item() == pytest.approx(0.25)  # teacher side pooled the same way


def test_at_loss_zero_when_student_equals_teacher():
    feats = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]
    assert at_loss(feats, [f.clone() for f in feats]).item() == 0.0


def test_at_gradients_reach_student_not_teacher():
    s = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    t = [torch.randn(2, 6, 8, 8, requires_grad=True), torch.randn(2, 6, 8, 8, requires_grad=True)]
    at_loss(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


# ------------------------------------------------------------------------------------------- CRD
def test_nce_contrast_loss_hand_computation():
    # x = [.5, .25, .25], n_data 4 -> m = 2, m*Pn = .5:
    # -(log(.5 / 1) + 2 log(.5 / .75)) = log 2 + 2 log 1.5 = 0.693147 + 0.810930 = 1.504077
    x = T([[0.5, 0.25, 0.25]])
    assert nce_contrast_loss(x, 4).item() == pytest.approx(1.504077, abs=1e-5)
    # batch mean: a second row [1, 0, 0] -> -(log(1/1.5) + 2 log(1)) = log 1.5 = 0.405465
    x2 = T([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    assert nce_contrast_loss(x2, 4).item() == pytest.approx((1.504077 + 0.405465) / 2, abs=1e-5)


def _identity_crd(n_data: int = 4, momentum: float = 0.5, nce_t: float = 1.0) -> CRDLoss:
    crd = CRDLoss(2, 2, n_data, feat_dim=2, nce_k=2, nce_t=nce_t, momentum=momentum)
    for emb in (crd.embed_s, crd.embed_t):
        with torch.no_grad():
            emb.linear.weight.copy_(torch.eye(2))
            emb.linear.bias.zero_()
    return crd


def test_crd_loss_hand_computation():
    crd = _identity_crd()
    # memories (unit rows); the batch is sample 1 with negatives 0 and 3
    crd.contrast.memory_t.copy_(T([[0.8, -0.6], [0.6, 0.8], [1.0, 0.0], [-0.6, -0.8]]))
    crd.contrast.memory_s.copy_(T([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    f_s, f_t = T([[3.0, 4.0]]), T([[5.0, 0.0]])  # embeddings v_s = [.6, .8], v_t = [1, 0]
    idx, cidx = T([1]), T([[1, 0, 3]])
    # s-anchor: <memory_t[j], v_s> = 1, 0, -1 -> exp: e, 1, 1/e; Z_s = 4 * mean = 4 (e + 1 + 1/e) / 3
    # t-anchor: <memory_s[j], v_t> = 1, 0, -1 -> the same scores and Z.
    e = math.e
    z = 4 * (e + 1 + 1 / e) / 3
    x = [e / z, 1 / z, (1 / e) / z]  # z = 5.4482 -> [0.4989, 0.1836, 0.0675]
    mpn = 2 / 4
    one_side = -(math.log(x[0] / (x[0] + mpn)) + math.log(mpn / (x[1] + mpn)) + math.log(mpn / (x[2] + mpn)))
    assert one_side == pytest.approx(1.1336, abs=1e-4)  # 0.6942 + 0.3127 + 0.1267 (paper check)
    loss = crd(f_s, f_t, idx, cidx)
    assert loss.item() == pytest.approx(2 * one_side, abs=1e-5)
    assert crd.contrast.z_s.item() == pytest.approx(z) and crd.contrast.z_t.item() == pytest.approx(z)


def test_crd_memory_momentum_update_and_renormalisation():
    crd = _identity_crd(momentum=0.5)
    mem = crd.contrast
    mem.memory_s.copy_(T([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    mem.memory_t.copy_(T([[0.8, -0.6], [0.6, 0.8], [1.0, 0.0], [-0.6, -0.8]]))
    before_s, before_t = mem.memory_s.clone(), mem.memory_t.clone()
    crd(T([[0.0, 2.0]]), T([[0.0, -3.0]]), T([1]), T([[1, 0, 3]]))  # v_s = [0, 1], v_t = [0, -1]
    # memory_s[1]: .5 [1, 0] + .5 [0, 1] = [.5, .5] -> normalised [1/sqrt2, 1/sqrt2]
    r = 1 / math.sqrt(2)
    assert torch.allclose(mem.memory_s[1], T([r, r]))
    # memory_t[1]: .5 [.6, .8] + .5 [0, -1] = [.3, -.1] -> / sqrt(.1) = [.948683, -.316228]
    assert torch.allclose(mem.memory_t[1], T([0.948683, -0.316228]), atol=1e-6)
    others = [0, 2, 3]
    assert torch.equal(mem.memory_s[others], before_s[others])
    assert torch.equal(mem.memory_t[others], before_t[others])
    assert torch.allclose(mem.memory_s.norm(dim=1), torch.ones(4))


def test_crd_memory_untouched_in_eval_mode():
    crd = _identity_crd()
    before = {k: v.clone() for k, v in crd.state_dict().items()}
    crd.eval()
    crd(torch.randn(2, 2), torch.randn(2, 2), T([0, 2]), T([[0, 1, 3], [2, 0, 1]]))
    assert all(torch.equal(v, before[k]) for k, v in crd.state_dict().items())


def test_crd_z_is_set_once_from_the_first_batch():
    crd = _identity_crd()
    crd(torch.randn(2, 2), torch.randn(2, 2), T([0, 2]), T([[0, 1, 3], [2, 0, 1]]))
    z_s, z_t = crd.contrast.z_s.clone(), crd.contrast.z_t.clone()
    assert z_s > 0 and z_t > 0
    crd(torch.randn(2, 2) * 5, torch.randn(2, 2), T([1, 3]), T([[1, 0, 2], [3, 2, 0]]))
    assert torch.equal(crd.contrast.z_s, z_s) and torch.equal(crd.contrast.z_t, z_t)


def test_crd_sampling_excludes_the_positive_and_covers_the_rest():
    mem = ContrastMemory(4, 5, nce_k=2000)
    idx = T([0, 3, 4, 3])
    cidx = mem.sample(idx, generator=torch.Generator().manual_seed(0))
    assert cidx.shape == (4, 2001) and cidx.dtype == torch.long
    assert torch.equal(cidx[:, 0], idx)
    for row, i in zip(cidx[:, 1:], idx.tolist()):
        assert (row != i).all()
        assert set(row.tolist()) == set(range(5)) - {i}
        # uniform over the 4 others: each about 500 of 2000
        assert torch.bincount(row, minlength=5).max() < 600


def test_crd_sampling_with_labels_draws_other_classes_only():
    labels = T([2, 0, 2, 1, 0, 2, 1, 1])  # sorted by class: 0 -> {1, 4}, 1 -> {3, 6, 7}, 2 -> {0, 2, 5}
    mem = ContrastMemory(4, 8, nce_k=3000, labels=labels)
    idx = T([0, 1, 3])
    cidx = mem.sample(idx, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cidx[:, 0], idx)
    expected = {0: {1, 3, 4, 6, 7}, 1: {0, 2, 3, 5, 6, 7}, 3: {0, 1, 2, 4, 5}}
    for row, i in zip(cidx[:, 1:], idx.tolist()):
        assert set(row.tolist()) == expected[i]
        counts = torch.bincount(row, minlength=8)[sorted(expected[i])].double()
        assert (counts / counts.mean() - 1).abs().max() < 0.2  # uniform over the other classes


def test_crd_sampling_is_reproducible_with_a_generator_and_with_the_global_seed():
    mem = ContrastMemory(4, 100, nce_k=50)
    idx = T([5, 7])
    a = mem.sample(idx, generator=torch.Generator().manual_seed(3))
    b = mem.sample(idx, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    torch.manual_seed(11)
    c = mem.sample(idx)
    torch.manual_seed(11)
    assert torch.equal(c, mem.sample(idx))


def test_crd_state_dict_round_trip_restores_memory_exactly():
    torch.manual_seed(0)
    crd = CRDLoss(16, 24, n_data=50, feat_dim=8, nce_k=10)
    for step in range(3):
        idx = torch.randperm(50)[:6]
        crd(torch.randn(6, 16), torch.randn(6, 24), idx, generator=torch.Generator().manual_seed(step))
    sd = crd.state_dict()
    assert {"contrast.memory_s", "contrast.memory_t", "contrast.z_s", "contrast.z_t"} <= set(sd)
    torch.manual_seed(123)
    other = CRDLoss(16, 24, n_data=50, feat_dim=8, nce_k=10)
    assert not torch.equal(other.contrast.memory_s, crd.contrast.memory_s)
    other.load_state_dict(sd)
    for name in ("memory_s", "memory_t", "z_s", "z_t"):
        assert torch.equal(getattr(other.contrast, name), getattr(crd.contrast, name))
    f_s, f_t, idx = torch.randn(6, 16), torch.randn(6, 24), torch.arange(6)
    la = crd(f_s, f_t, idx, generator=torch.Generator().manual_seed(9))
    lb = other(f_s, f_t, idx, generator=torch.Generator().manual_seed(9))
    assert torch.equal(la, lb)


def test_crd_gradients_reach_student_and_both_embeddings_not_teacher():
    torch.manual_seed(0)
    crd = CRDLoss(16, 24, n_data=40, feat_dim=8, nce_k=12)
    f_s = torch.randn(5, 16, requires_grad=True)
    f_t = torch.randn(5, 24, requires_grad=True)
    loss = crd(f_s, f_t, torch.arange(5))
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    for p in list(crd.embed_s.parameters()) + list(crd.embed_t.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert f_t.grad is None
    assert not crd.contrast.memory_s.requires_grad and not crd.contrast.memory_t.requires_grad


def test_crd_defaults_follow_mdistiller_cifar():
    crd = CRDLoss(256, 256, n_data=100)
    mem = crd.contrast
    assert (mem.feat_dim, mem.nce_k, mem.nce_t, mem.momentum) == (128, 16384, 0.07, 0.5)
    assert mem.memory_s.shape == mem.memory_t.shape == (100, 128)
    stdv = 1 / math.sqrt(128 / 3)
    assert mem.memory_s.abs().max() <= stdv
    assert crd(torch.randn(2, 256), torch.randn(2, 256), T([0, 1])).dim() == 0


def test_embed_shape_and_unit_norm():
    out = Embed(12, 5)(torch.randn(3, 3, 2, 2))  # flattened to 12
    assert out.shape == (3, 5)
    assert torch.allclose(out.norm(dim=1), torch.ones(3))


def test_contrast_memory_rejects_bad_settings():
    with pytest.raises(ConfigError):
        ContrastMemory(8, 10, momentum=1.0)
    with pytest.raises(ConfigError):
        ContrastMemory(8, 10, nce_t=0.0)
    with pytest.raises(ConfigError):
        ContrastMemory(8, 3, labels=T([1, 1, 1]))


# -------------------------------------------------------------------------------------- ReviewKD
def test_hcl_loss_hand_computation_2x2_and_pooled_level():
    # 2x2 level: fs [[1, 2], [3, 4]] vs 0: full MSE (1+4+9+16)/4 = 7.5; levels 4, 2 skipped (l >= h);
    # level 1: mean 2.5 -> 6.25 with weight 1/2 -> (7.5 + 3.125) / 1.5 = 7.083333
    fs = T([[[[1.0, 2.0], [3.0, 4.0]]]])
    # pooled level (N, C) = [1, 3] vs 0: MSE 5, weight 1
    ps = T([[1.0, 3.0]])
    assert hcl_loss([fs], [torch.zeros_like(fs)]).item() == pytest.approx(7.083333, abs=1e-5)
    assert hcl_loss([ps], [torch.zeros_like(ps)]).item() == pytest.approx(5.0)
    both = hcl_loss([fs, ps], [torch.zeros_like(fs), torch.zeros_like(ps)])
    assert both.item() == pytest.approx(12.083333, abs=1e-5)


def test_hcl_loss_hand_computation_8x8_weights():
    # 8x8 map with the top-left 4x4 quadrant = 1 vs 0. Full MSE 16/64 = .25; pool 4 (4x4): top-left
    # 2x2 = 1 -> .25; pool 2: [[1, 0], [0, 0]] -> .25; pool 1: .25 -> .0625.
    # (.25 + .25/2 + .25/4 + .0625/8) / (1 + 1/2 + 1/4 + 1/8) = .4453125 / 1.875 = .2375
    fs = torch.zeros(1, 1, 8, 8)
    fs[..., :4, :4] = 1.0
    assert hcl_loss([fs], [torch.zeros_like(fs)]).item() == pytest.approx(0.2375)


def test_hcl_loss_zero_when_student_equals_teacher():
    feats = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 8)]
    assert hcl_loss(feats, [f.clone() for f in feats]).item() == 0.0


def test_hcl_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="hcl_loss"):
        hcl_loss([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 3, 4, 4)])


def test_abf_fuse_shapes():
    abf = ABF(64, 256, 128, fuse=True)
    out, res = abf(torch.randn(2, 64, 16, 16), torch.randn(2, 256, 8, 8), 16)
    assert out.shape == (2, 128, 16, 16) and res.shape == (2, 256, 16, 16)
    out, res = abf(torch.randn(2, 64, 16, 16), torch.randn(2, 256, 8, 8), 32)  # resized output
    assert out.shape == (2, 128, 32, 32)
    with pytest.raises(ValueError, match="residual"):
        abf(torch.randn(2, 64, 16, 16))
    assert ABF(64, 32, 16, fuse=False).att_conv is None


def test_review_head_on_resnet8x4_to_resnet32x4(resnet_pair):
    student, teacher = resnet_pair
    x = torch.randn(2, 3, 32, 32)
    s_feats, s_pooled = stage_features(student, x)
    with torch.no_grad():
        t_feats, t_pooled = stage_features(teacher, x)
    assert [tuple(f.shape[1:]) for f in s_feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    head = ReviewKDHead([64, 128, 256, 256], [64, 128, 256, 256])  # mdistiller's CIFAR channels
    assert head.mid_channel == 256  # min(512, 256)
    assert [a.att_conv is not None for a in head.abfs] == [True, True, True, False]
    outs = head(s_feats + [s_pooled])
    targets = t_feats + [t_pooled[:, :, None, None]]
    assert [o.shape for o in outs] == [t.shape for t in targets]
    loss = hcl_loss(outs, targets)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None for p in head.parameters())
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


def test_review_head_different_teacher_widths_and_out_sizes():
    head = ReviewKDHead([16, 32, 64, 64], [32, 64, 128, 128], out_sizes=[16, 8, 4, 1])
    assert head.mid_channel == 64
    feats = [
        torch.randn(2, 16, 32, 32), torch.randn(2, 32, 16, 16), torch.randn(2, 64, 8, 8), torch.randn(2, 64)
    ]
    outs = head(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 128, 1, 1)]
    with pytest.raises(ConfigError):
        ReviewKDHead([16, 32], [32])


def test_hcl_gradients_reach_student_not_teacher():
    s = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    t = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    hcl_loss(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


# ------------------------------------------------------------------------------- no host syncs
def test_forward_paths_do_not_read_values_back(monkeypatch):
    """No .item()/bool()/float()/tolist() on tensors in any forward path (CPU stand-in for a CUDA
    sync check): each would wait for the device."""
    torch.manual_seed(0)
    crd = CRDLoss(16, 16, n_data=30, feat_dim=8, nce_k=7, labels=torch.arange(30) % 3)
    head = ReviewKDHead([8, 16, 16], [8, 16, 16])
    reg = ConvRegressor(8, 8, 8, 4)
    s4, t4 = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)

    def boom(*a, **k):
        raise AssertionError("host read-back in a forward path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    fitnet_loss(reg(s4), t4)
    at_loss([s4], [t4])
    hcl_loss(head([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 16)]), [
        torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 16)])
    crd(torch.randn(4, 16), torch.randn(4, 16), torch.arange(4))
    crd(torch.randn(4, 16), torch.randn(4, 16), torch.arange(4), torch.randint(0, 30, (4, 5)))
