"""DINO pieces: loss against a naive computation, centering, schedules, EMA, parameter groups,
and the packed multi-crop forward against the per-crop-size forward."""

import math

import numpy as np
import pytest
import torch

from protloc.dino import (DINOHead, DINOLoss, DINOModel, clip_gradients, collapse_warning, cosine_schedule,
                          ema_update, param_groups, teacher_temp_schedule)
from protloc.model import ViTConfig, VisionTransformer


def test_loss_matches_a_naive_sum_over_crop_pairs():
    torch.manual_seed(0)
    B, K, n_crops = 3, 7, 4
    student = torch.randn(n_crops * B, K)
    teacher = torch.randn(2 * B, K)
    loss_fn = DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, K))
    center = loss_fn.center.clone()
    loss, _ = loss_fn(student, teacher, n_crops, teacher_temp=0.04)
    terms = []
    for t in range(2):
        for s in range(n_crops):
            if s == t:
                continue
            for b in range(B):
                q = torch.softmax((teacher[t * B + b] - center[0]) / 0.04, dim=0)
                logp = torch.log_softmax(student[s * B + b] / 0.1, dim=0)
                terms.append(-(q * logp).sum() / B)
    assert loss.item() == pytest.approx(float(sum(terms)) / (2 * (n_crops - 1)), rel=1e-5)
    # the center moved towards the batch mean of the teacher outputs
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def test_head_shapes_names_and_weight_norm():
    head = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 50)
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_g",
            "last_layer.weight_v"} <= set(head.state_dict())
    assert not head.last_layer.weight_g.requires_grad  # DINO's norm_last_layer
    # logits of a unit-norm bottleneck through unit-norm rows are cosines: within [-1, 1]
    assert out.abs().max() <= 1 + 1e-5


def test_head_batch_norm_separates_nearly_identical_inputs():
    """What --use-bn-in-head is for: inputs that differ by 1e-3 give different logits with it."""
    torch.manual_seed(0)
    x = torch.randn(1, 16) + 1e-3 * torch.randn(8, 16)
    plain = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    with_bn = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8, use_bn=True)
    assert {"mlp.0.weight", "mlp.1.running_mean", "mlp.3.weight", "mlp.4.running_var",
            "mlp.6.weight"} <= set(with_bn.state_dict())
    spread = lambda logits: (logits - logits.mean(0)).abs().max().item()  # noqa: E731
    assert spread(plain(x)) < 1e-3 < 0.1 < spread(with_bn(x))


def test_schedules():
    lr = cosine_schedule(1.0, 0.0, 100, warmup_steps=10)
    assert len(lr) == 100 and lr[0] == 0.0 and lr[10] == pytest.approx(1.0) and lr[-1] == pytest.approx(0.0, abs=1e-3)
    assert np.all(np.diff(lr[:11]) > 0) and np.all(np.diff(lr[10:]) <= 1e-12)
    assert len(cosine_schedule(1.0, 0.0, 5, warmup_steps=50)) == 5  # warm-up longer than the run is cut
    temp = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert temp[0] == pytest.approx(0.04) and temp[29] == pytest.approx(0.07) and temp[-1] == 0.07
    mom = cosine_schedule(0.996, 1.0, 50)
    assert mom[0] == pytest.approx(0.996) and mom[-1] == pytest.approx(1.0, abs=1e-5)


def test_weight_decay_spares_biases_and_norms():
    model = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=1, img_size=16))
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"}
    assert no_decay["weight_decay"] == 0.0


def test_ema_and_gradient_clipping():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    expected = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    ema_update(a, b, 0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    for p in b.parameters():
        p.grad = torch.full_like(p, 10.0)
    clip_gradients(b, 3.0)
    assert all(p.grad.norm().item() == pytest.approx(3.0, rel=1e-4) for p in b.parameters())


def test_collapse_warning():
    K = 1000
    assert collapse_warning(0.001, K) and "near 0" in collapse_warning(0.001, K)
    assert "uniform" in collapse_warning(math.log(K) - 1e-3, K)
    assert collapse_warning(3.0, K) is None


@pytest.mark.parametrize("layout", ["fused", "channel"])
def test_packed_multicrop_equals_per_crop_size_forward_and_gradients(layout):
    torch.manual_seed(0)
    vit = ViTConfig(arch="vit_tiny", patch=8, layout=layout, depth=2, img_size=32)
    model = DINOModel(VisionTransformer(vit), DINOHead(vit.dim, out_dim=64, hidden_dim=32, bottleneck_dim=16))
    names = ["nucleus", "protein"]
    crops = [torch.randn(4, 2, 32, 32), torch.randn(8, 2, 16, 16)]  # 2 x 2 global, 4 x 2 local
    packed = model(crops, names, pack=True).logits
    params = [p for p in model.parameters() if p.requires_grad]
    g_packed = torch.autograd.grad(packed.square().sum(), params, allow_unused=True)
    separate = model(crops, names, pack=False).logits
    g_separate = torch.autograd.grad(separate.square().sum(), params, allow_unused=True)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_packed, g_separate):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert packed.shape == (12, 64)
    # the order is the crops' order: the first 4 rows are the global crops
    torch.testing.assert_close(packed[:4], model(crops[:1], names).logits, atol=1e-5, rtol=1e-5)
