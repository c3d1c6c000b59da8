"""The fast pretraining step: the same numbers as the step it replaced (float32 round-off), and
where it packs the crops (--pack auto|on|off)."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from protloc import data, kernels
from protloc.augment import MultiCropConfig, image_statistics, multi_crop
from protloc.checkpoint import load_checkpoint
from protloc.decoded import memory_budget
from protloc.model import add_residual
from protloc.dino import PACKS, WeightNormLinear, packed, param_groups
from protloc.pretrain import PretrainConfig, Trainer, recorded_config
from protloc.sources import discover
from protloc.synth import write_dataset

TINY = dict(arch="vit_tiny", patch=8, depth=2, out_dim=512, batch_size=4, lr=1e-3, warmup_epochs=0.0,
            freeze_last_layer=0.0, crops=MultiCropConfig(global_size=32, local_size=16, local_crops=2))


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    root = tmp_path_factory.mktemp("fields")
    write_dataset(root, n=8, size=48, seed=0)
    return discover([str(root)])


# --- the step as it was: each operation written out as DINO's reference code does it ----------------------


def weight_norm_linear(self, x):  # the normalized weight materialized, then the product
    return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


def pairwise_dino_loss(loss_fn, student_out, teacher_out, n_crops, temp):
    """One cross-entropy term per (teacher crop, other student crop) pair, as DINO's DINOLoss."""
    student_logp = F.log_softmax(student_out / loss_fn.student_temp, dim=-1).chunk(n_crops)
    targets = F.softmax((teacher_out - loss_fn.center) / temp, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for t, q in enumerate(targets):
        for s, logp in enumerate(student_logp):
            if s != t:
                total = total + torch.sum(-q * logp, dim=-1).mean()
                terms += 1
    loss_fn.update_center(teacher_out)
    return total / terms


def reference_step(trainer, optimizer, crops, names, n_crops, step):
    """Today's Trainer.model_step before the fast path: per-parameter clipping in a Python loop,
    torch's per-parameter AdamW loop, the EMA as multiply then add."""
    cfg, sched, student, teacher = trainer.cfg, trainer.schedules, trainer.student, trainer.teacher
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(sched.lr[step])
        if i == 0:
            group["weight_decay"] = float(sched.weight_decay[step])
    teacher_out = teacher(crops[:1], names, False, None, mask_input=False).logits
    student_out = student(crops, names, False).logits
    loss = pairwise_dino_loss(trainer.loss_fn, student_out, teacher_out, n_crops, sched.teacher_temp[step])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p in (p for p in student.parameters() if p.grad is not None):
        norm = p.grad.detach().norm(2)
        p.grad.mul_(torch.clamp(cfg.clip_grad / (norm + 1e-6), max=1.0))
    optimizer.step()
    m = float(sched.momentum[step])
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1 - m)
    return loss.item()


def test_the_fast_step_equals_the_reference_step_to_float32_round_off(fields, tmp_path, monkeypatch):
    fast = Trainer(fields, PretrainConfig(**TINY, steps=2), tmp_path / "f.pt", workers=0)
    slow = copy.deepcopy(fast)
    slow_optimizer = torch.optim.AdamW(param_groups(slow.student), foreach=False)
    before = copy.deepcopy(fast.student.state_dict())
    items = next(iter(fast.batches(2)))
    images = fast.images(items)
    names = images.names
    crops, n_crops, _ = fast.crops(images, seed=0)
    fast_losses, slow_losses = [], []
    for step in range(2):
        torch.manual_seed(step)  # stochastic depth: the same draws in both
        fast_losses.append(fast.model_step(crops, names, n_crops, None, step)[0][0])
        with monkeypatch.context() as m:
            m.setattr(WeightNormLinear, "forward", weight_norm_linear)
            torch.manual_seed(step)
            slow_losses.append(reference_step(slow, slow_optimizer, crops, names, n_crops, step))
        # the clipped gradients the optimizer gets: to round-off of the largest of each parameter's
        fast_grads = {name: p.grad for name, p in fast.student.named_parameters()}
        for name, p in slow.student.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(fast_grads[name], p.grad, rtol=0, atol=1e-4 * float(p.grad.abs().max()),
                                           msg=f"step {step}: gradient of {name}")
    assert fast_losses == pytest.approx(slow_losses, rel=1e-6)
    # AdamW moves each weight by up to the learning rate whatever its gradient's size, so a gradient
    # near 0 that round-off tips over (a key bias's) moves its weight by a share of lr either way
    atol = 0.25 * float(fast.schedules.lr[:2].sum())
    for model in ("student", "teacher"):
        fast_params = dict(getattr(fast, model).named_parameters())
        for name, p in getattr(slow, model).named_parameters():
            torch.testing.assert_close(fast_params[name], p, rtol=1e-5, atol=atol, msg=f"{model} {name}")
    torch.testing.assert_close(fast.loss_fn.center, slow.loss_fn.center, rtol=1e-5, atol=1e-7)
    # the steps moved every weight: the comparison is not between two untouched copies
    moved = [name for name, p in fast.student.named_parameters() if not torch.equal(p, before[name])]
    assert moved == [name for name, p in fast.student.named_parameters() if p.requires_grad]


def test_the_weight_normalized_layer_equals_the_materialized_weight_forward_and_backward():
    torch.manual_seed(0)
    layer = WeightNormLinear(16, 300)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)  # a trained norm, not DINO's fixed 1
    x = torch.randn(7, 16, requires_grad=True)
    grads = []
    for forward in (WeightNormLinear.forward, weight_norm_linear):
        layer.zero_grad()
        x.grad = None
        out = forward(layer, x)
        (out * torch.linspace(-1, 1, 300)).sum().backward()
        grads.append((out.detach(), x.grad.clone(), layer.weight_v.grad.clone(), layer.weight_g.grad.clone()))
    for fast, slow in zip(*grads):  # weight_v's gradient has cancelling terms: round-off of the largest
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * float(slow.abs().max()))


# --- --pack auto|on|off ----------------------------------------------------------------------------------


def test_auto_packs_exactly_where_attention_runs_on_the_triton_kernel(monkeypatch):
    cpu = torch.device("cpu")
    assert (packed("on", cpu), packed("off", cpu)) == (True, False)
    monkeypatch.setenv("PROTLOC_BACKEND", "torch")
    assert packed("auto", cpu) is False  # the torch path attends per crop size: packing only costs
    monkeypatch.setenv("PROTLOC_BACKEND", "auto")
    assert packed("auto", cpu) is False  # a CPU tensor never takes the kernel under auto
    if "attention" in kernels.TRITON_OPS:
        monkeypatch.setenv("PROTLOC_BACKEND", "triton")
        assert packed("auto", cpu) is True
    with pytest.raises(ValueError, match="auto, on, off"):
        packed("yes", cpu)
    assert PACKS == ("auto", "on", "off")


def test_the_checkpoint_records_the_pack_setting_and_old_bools_read_as_on_off(fields, tmp_path, monkeypatch):
    monkeypatch.setenv("PROTLOC_BACKEND", "torch")
    trainer = Trainer(fields, PretrainConfig(**TINY, steps=1), tmp_path / "p.pt", workers=0)
    assert trainer.cfg.pack == "auto" and trainer.pack is False
    trainer.run()
    assert load_checkpoint(tmp_path / "p.pt")["train"]["pack"] == "auto"
    assert recorded_config(tmp_path / "p.pt").pack == "auto"
    old = PretrainConfig().to_dict()
    for value, setting in ((True, "on"), (False, "off")):
        assert PretrainConfig.from_dict({**old, "pack": value}).pack == setting


# --- decoded images kept in memory (protloc.decoded) -----------------------------------------------------


def step_crops(trainer, stop):
    """The crops of every step up to `stop`, as train_step cuts them."""
    out = []
    for step, items in enumerate(trainer.batches(stop)):
        out.append(trainer.crops(trainer.images(items), seed=step)[0])
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_kept_images_give_the_crops_of_decoding_every_time_and_are_decoded_once(fields, tmp_path, monkeypatch,
                                                                                 workers):
    calls = []
    load_item = data.load_item
    monkeypatch.setattr(data, "load_item", lambda i, *a: calls.append(i) or load_item(i, *a))
    runs = {}
    for budget in (0, 2**40):  # nothing fits / everything fits
        trainer = Trainer(fields, PretrainConfig(**TINY, steps=6), tmp_path / f"{budget}.pt", workers=workers)
        trainer.decoded.budget = budget
        calls.clear()
        runs[budget] = step_crops(trainer, 6)  # 3 epochs of 2 steps
        if workers == 0:  # decoded in this process: the calls are seen
            assert sorted(calls) == sorted(list(range(len(fields))) * (3 if budget == 0 else 1))
        assert trainer.decoded.keep is (budget > 0) and len(trainer.decoded.items) == (len(fields) if budget else 0)
        assert len(trainer.stats_kept) == (len(fields) if budget else 0)  # normalize "image": each image's statistics
        assert len(trainer.pixels_kept) == (len(fields) if budget else 0)  # and its float32 pixels (a CPU run)
    for decoded_each_time, kept in zip(runs[0], runs[2**40]):
        for a, b in zip(decoded_each_time, kept):
            assert torch.equal(a, b)


def test_the_memory_budget_is_a_share_of_the_machine_split_over_processes(monkeypatch):
    one, four = memory_budget(1), memory_budget(4)
    assert one > 0 and four == pytest.approx(one / 4, abs=1)
    monkeypatch.delattr(os, "sysconf")
    assert memory_budget(1) == 0  # memory unknown: nothing is kept


@pytest.mark.parametrize("lengths", [[5, 5, 5], [7, 7, 3, 3, 3]], ids=["one-crop-size", "packed"])
def test_the_residual_under_stochastic_depth_is_the_reference_drop_path(lengths):
    """x + drop_path(branch) as DINO's: each sequence's branch kept with probability 1 - p, scaled by 1 / (1 - p)."""
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    x, branch = torch.randn(2, sum(lengths), 8).unbind()
    torch.manual_seed(0)
    fast = add_residual(x, branch, cu_seqlens, max(lengths), 0.5, training=True)
    torch.manual_seed(0)
    keep = (torch.rand(len(lengths)) >= 0.5).float() / 0.5
    slow = x + branch * keep.repeat_interleave(torch.tensor(lengths))[:, None]
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    assert 0 < keep.count_nonzero() < len(lengths)  # some branches dropped, some kept (seed 0)
    assert torch.equal(add_residual(x, branch, cu_seqlens, max(lengths), 0.5, training=False), x + branch)


@pytest.mark.parametrize("normalize", ["image", "dataset"])
def test_crops_converting_their_own_regions_equal_crops_of_the_converted_field(normalize):
    """multi_crop on pixels as decoded with (scale, shift) gives the crops of the whole field converted first,
    and known statistics those it computes."""
    g = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 4096, (2, h, w), generator=g).to(torch.uint16) for h, w in ((90, 70), (64, 64))]
    scale_shift = [(torch.tensor([1 / 4096, 1 / 2048]), torch.tensor([0.0, -0.5])) for _ in raw]
    converted = [r.float() * s[:, None, None] + t[:, None, None] for r, (s, t) in zip(raw, scale_shift)]
    cfg = MultiCropConfig(global_size=32, local_size=16, local_crops=2, normalize=normalize)
    whole = multi_crop(converted, cfg, torch.Generator().manual_seed(5), protein_channel=1)
    regions = multi_crop(raw, cfg, torch.Generator().manual_seed(5), protein_channel=1, scale_shift=scale_shift)
    stats = [image_statistics(r, ss) for r, ss in zip(raw, scale_shift)]
    known = multi_crop(raw, cfg, torch.Generator().manual_seed(5), protein_channel=1, scale_shift=scale_shift,
                       stats=stats)
    for a, b, c in zip(whole, regions, known):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # scaled after the resize: float32 round-off
        assert torch.equal(b, c)
