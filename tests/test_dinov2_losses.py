"""DINOv2 / iBOT ingredients (`pretrain --koleo`, `--centering sinkhorn`, `--ibot`): KoLeo against a
brute-force reference, Sinkhorn-Knopp against the paper's algorithm (one process and two), block
masks, the mask token and the masked-patch loss by hand, and short runs with each flag: they learn,
their checkpoints embed, resume is exact, flags are recorded and compared, DDP keeps replicas equal."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner

from protloc.augment import MultiCropConfig
from protloc.checkpoint import load_checkpoint
from protloc.cli import main
from protloc.dino import DINOHead, DINOLoss, DINOModel, iBOTPatchLoss
from protloc.dinov2 import block_mask, koleo_loss, sample_masks, sinkhorn_knopp
from protloc.model import ViTConfig, VisionTransformer
from protloc.pretrain import PretrainConfig, Trainer
from protloc.sources import discover
from protloc.synth import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(arch="vit_tiny", patch=8, depth=1, out_dim=64, batch_size=4, lr=1e-3, warmup_epochs=0.5,
            warmup_teacher_temp_epochs=0.5, freeze_last_layer=0.0,
            crops=MultiCropConfig(global_size=32, local_size=16, local_crops=2))
MODEL_FLAGS = ["--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--out-dim", "64", "--global-size", "32",
               "--local-size", "16", "--warmup-epochs", "0.5", "--workers", "0", "--device", "cpu"]
TINY_FLAGS = [*MODEL_FLAGS, "--batch-size", "4", "--local-crops", "2"]
ALL_ON = dict(koleo=0.1, centering="sinkhorn", ibot=1.0, mask_ratio=(0.2, 0.5), mask_prob=0.5)
ALL_ON_FLAGS = ["--koleo", "0.1", "--centering", "sinkhorn", "--ibot", "1", "--mask-ratio", "0.2,0.5"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    out = tmp_path_factory.mktemp("cells")
    write_dataset(out, n=12, size=48, seed=5, fields_per_protein=2)
    return out


# --- KoLeo ---------------------------------------------------------------------------------------

def koleo_reference(x, eps=1e-8):
    """-mean_i log(min_{j != i} ||x_i - x_j|| + eps) of the L2-normalized rows, by brute force in float64."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    nearest = [min(np.linalg.norm(x[i] - x[j]) for j in range(n) if j != i) for i in range(n)]
    return -np.mean(np.log(np.array(nearest) + eps))


@pytest.mark.parametrize("n, dim", [(2, 3), (7, 5), (33, 192)])
def test_koleo_matches_a_brute_force_reference(n, dim):
    x = np.random.default_rng(n).normal(size=(n, dim)) * np.random.default_rng(1).uniform(0.1, 10, (n, 1))
    got = koleo_loss(torch.from_numpy(x).float())
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(koleo_reference(x), rel=1e-5, abs=1e-6)


def test_koleo_spreads_features_apart_and_stays_finite_on_duplicates():
    x = torch.randn(16, 8) * 0.01 + torch.randn(1, 8)  # a tight cluster
    x.requires_grad_(True)
    before = koleo_loss(x).item()
    optimizer = torch.optim.SGD([x], lr=0.05)
    for _ in range(50):
        optimizer.zero_grad()
        koleo_loss(x).backward()
        optimizer.step()
    assert koleo_loss(x).item() < before - 1.0  # nearest neighbours much farther apart
    twins = torch.randn(1, 8).repeat(4, 1).requires_grad_(True)  # identical rows (e.g. blank images)
    loss = koleo_loss(twins)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(twins.grad).all()
    assert koleo_loss(torch.randn(1, 8)).item() == 0.0  # no neighbour, no term


# --- Sinkhorn-Knopp ------------------------------------------------------------------------------

def sinkhorn_reference(logits, temp, iterations):
    """SwAV's / DINOv2's Sinkhorn-Knopp written from the algorithm, float64, plain exp, no guards."""
    q = np.exp(logits.astype(np.float64) / temp).T  # (K, B)
    K, B = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= K
        q /= q.sum(axis=0, keepdims=True)
        q /= B
    return (q * B).T


@pytest.mark.parametrize("temp", [0.04, 0.1, 0.005])  # 1 / 0.005 overflows a plain float32 exp
def test_sinkhorn_knopp_matches_the_algorithm(temp):
    logits = np.random.default_rng(0).uniform(-1, 1, (24, 16))  # the head's outputs are cosines
    got = sinkhorn_knopp(torch.from_numpy(logits).float(), temp).double().numpy()
    np.testing.assert_allclose(got, sinkhorn_reference(logits, temp, 3), rtol=1e-4, atol=1e-7)


def test_sinkhorn_knopp_is_doubly_stochastic_up_to_its_iterations():
    """Every sample's target sums to 1; every prototype's share of the batch tends to B / K, the
    closer the more iterations."""
    B, K = 40, 10
    logits = torch.randn(B, K, generator=torch.Generator().manual_seed(0))
    errors = []
    for iterations in (1, 3, 30):
        q = sinkhorn_knopp(logits, 0.5, iterations).double()
        torch.testing.assert_close(q.sum(dim=1), torch.ones(B, dtype=torch.float64), atol=1e-5, rtol=0)
        assert (q >= 0).all()
        errors.append((q.sum(dim=0) - B / K).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4 * B / K
    plain = torch.softmax(logits / 0.5, dim=1).sum(dim=0)  # a softmax alone: far from balanced
    assert (plain - B / K).abs().max().item() > 0.25 * B / K


def _two_ranks(rank, init_file, shards, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        q = sinkhorn_knopp(shards[rank], 0.05)
        loss = iBOTPatchLoss(shards[rank].shape[1], center_momentum=0.9)  # its center: all-reduced mean
        loss.update_center(shards[rank])
        torch.save({"q": q, "center": loss.center}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_knopp_and_the_center_over_two_processes_equal_one_process_on_the_whole(tmp_path):
    """The shards differ in size, as the masked patches of two processes do."""
    whole = torch.randn(11, 6)
    shards = [whole[:4], whole[4:]]
    mp.start_processes(_two_ranks, args=(str(tmp_path / "init"), shards, str(tmp_path / "out")), nprocs=2,
                       start_method="fork")
    parts = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    torch.testing.assert_close(torch.cat([p["q"] for p in parts]), sinkhorn_knopp(whole, 0.05), atol=1e-6, rtol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["center"], 0.1 * whole.mean(0, keepdim=True), atol=1e-6, rtol=1e-5)


def test_sinkhorn_centering_leaves_the_center_alone():
    loss_fn = DINOLoss(8, centering="sinkhorn")
    teacher, student = torch.randn(6, 8), torch.randn(9, 8)
    loss, targets = loss_fn(student, teacher, 3, teacher_temp=0.04)
    torch.testing.assert_close(torch.cat(targets), sinkhorn_knopp(teacher, 0.04))
    assert torch.isfinite(loss) and torch.equal(loss_fn.center, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(8, centering="mean")


# --- masks ---------------------------------------------------------------------------------------

def test_block_masks_hold_exactly_the_count_in_blocks():
    rng = np.random.default_rng(0)
    with_neighbour = total = 0
    for count in (0, 1, 5, 20, 32, 50, 64):
        mask = block_mask(8, 8, count, rng)
        assert mask.shape == (8, 8) and mask.sum() == count
        padded = np.pad(mask, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        with_neighbour += int((mask & neighbours).sum())
        total += count
    assert with_neighbour > 0.9 * total  # blocks, not scattered patches (random ones: about half here)
    with pytest.raises(ValueError):
        block_mask(4, 4, 17, rng)


def test_sample_masks_ratio_within_bounds_and_deterministic_under_a_seed():
    n_crops, side, ratio, prob = 64, 8, (0.1, 0.5), 0.5
    masks = sample_masks(n_crops, side, side, ratio, prob, np.random.default_rng(3))
    assert masks.shape == (n_crops, side * side) and masks.dtype == bool
    counts = masks.sum(axis=1)
    masked = np.sort(counts[counts > 0])
    assert len(masked) == int(n_crops * prob)
    assert masked.min() >= int(side * side * ratio[0]) and masked.max() <= int(side * side * ratio[1])
    assert masked[-1] - masked[0] >= 0.7 * side * side * (ratio[1] - ratio[0])  # spread over the range
    assert counts[: n_crops // 2].any() and counts[n_crops // 2:].any()  # shuffled over the crops
    again = sample_masks(n_crops, side, side, ratio, prob, np.random.default_rng(3))
    other = sample_masks(n_crops, side, side, ratio, prob, np.random.default_rng(4))
    assert np.array_equal(masks, again) and not np.array_equal(masks, other)
    # a step of one image with a 2 x 2 grid still masks something
    assert sample_masks(2, 2, 2, (0.1, 0.2), 0.3, np.random.default_rng(0)).sum() == 1


# --- the mask token and the iBOT loss ------------------------------------------------------------

def tiny_dino(layout, mask_token=True):
    torch.manual_seed(0)
    vit = ViTConfig(arch="vit_tiny", patch=8, layout=layout, depth=1, img_size=32, mask_token=mask_token)
    model = DINOModel(VisionTransformer(vit), DINOHead(vit.dim, out_dim=16, hidden_dim=32, bottleneck_dim=8))
    with torch.no_grad():
        model.backbone.mask_token.normal_()
    return model


@pytest.mark.parametrize("layout", ["fused", "channel"])
def test_masked_patches_enter_as_the_mask_token_and_only_they_reach_the_patch_outputs(layout):
    model, names = tiny_dino(layout), ["nucleus", "protein"]
    crops = torch.randn(3, 2, 32, 32, requires_grad=True)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, [0, 5, 6]] = True
    masks[2, 15] = True
    ones = torch.ones(3, 2)
    backbone = model.backbone
    plain, masked = (backbone.tokens(crops, ones, 0 * ones, names, m) for m in (None, masks))
    token_mask = backbone.token_mask(masks, 2)  # (3, T): every channel's token at a masked patch
    assert token_mask.sum() == 4 * (2 if layout == "channel" else 1)
    pos = backbone.pos_embed_at(4, 4)[1:]  # (16, D)
    fill = backbone.mask_token + pos
    if layout == "channel":
        fill = torch.cat([fill + backbone.channel_embed[backbone.channel_ids([n])] for n in names])
    torch.testing.assert_close(masked[:, 1:][token_mask], fill.expand(3, -1, -1)[token_mask])
    assert torch.equal(masked[:, 1:][~token_mask], plain[:, 1:][~token_mask]) and torch.equal(masked[:, 0], plain[:, 0])
    # the student's outputs do not depend on the pixels of its masked patches; the teacher's do
    student = model([crops], names, masks=masks)
    grad, = torch.autograd.grad(student.logits.sum() + student.patch_logits.sum(), crops)
    hidden = masks.view(3, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand(-1, 2, -1, -1)
    assert grad[hidden].abs().max() == 0 and grad[~hidden].abs().max() > 0
    teacher = model([crops], names, masks=masks, mask_input=False)
    grad, = torch.autograd.grad(teacher.patch_logits.sum(), crops)
    assert grad[hidden].abs().max() > 0
    assert student.patch_logits.shape == (int(token_mask.sum()), 16) and torch.equal(student.patch_mask, token_mask)


@pytest.mark.parametrize("layout", ["fused", "channel"])
def test_the_ibot_loss_has_no_gradient_at_unmasked_patches(layout):
    model, names = tiny_dino(layout), ["nucleus", "protein"]
    crops = [torch.randn(4, 2, 32, 32), torch.randn(4, 2, 16, 16)]
    masks = torch.from_numpy(sample_masks(4, 4, 4, (0.2, 0.5), 0.5, np.random.default_rng(0)))
    outputs = []
    model.backbone.norm.register_forward_hook(lambda module, args, out: outputs.append(out) or out.retain_grad())
    student = model(crops, names, pack=True, masks=masks)
    teacher = model(crops[:1], names, masks=masks, mask_input=False)
    loss, _ = iBOTPatchLoss(16)(student.patch_logits, teacher.patch_logits.detach(), student.patch_mask, 0.04)
    loss.backward()
    tokens = outputs[0].grad  # (total tokens of the pack, D): the global crops' tokens first
    T = student.patch_mask.shape[1]
    glob = tokens[: 4 * (1 + T)].view(4, 1 + T, -1)
    assert glob[:, 1:][student.patch_mask].abs().sum(dim=-1).min() > 0  # every masked token is in the loss
    assert glob[:, 1:][~student.patch_mask].abs().max() == 0 and glob[:, 0].abs().max() == 0
    assert tokens[4 * (1 + T):].abs().max() == 0  # nor the local crops


def test_ibot_loss_equals_the_hand_computed_cross_entropy():
    """2 crops of 3 patch tokens; crop 0 has tokens 0 and 2 masked, crop 1 none."""
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.3, 0.1]])
    patch_mask = torch.tensor([[True, False, True], [False, False, False]])
    loss_fn = iBOTPatchLoss(3, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([[0.05, -0.05, 0.0]]))
    center = loss_fn.center.clone()

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()
    ce = [-(softmax((teacher[i] - center[0]).numpy() / 0.04) * np.log(softmax(student[i].numpy() / 0.1))).sum()
          for i in range(2)]
    loss, _ = loss_fn(student, teacher, patch_mask, 0.04)
    assert loss.item() == pytest.approx((ce[0] + ce[1]) / 2 / 2, rel=1e-5)  # mean in crop 0, over 2 crops
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def test_a_student_learns_the_teachers_masked_patch_targets():
    """Gradients reach the mask token and the shared head: on a fixed batch, 30 Adam steps towards
    a fixed teacher lower the iBOT loss and move the mask token."""
    student, teacher = tiny_dino("fused"), tiny_dino("fused")
    crops = [torch.randn(8, 2, 32, 32)]
    masks = torch.from_numpy(sample_masks(8, 4, 4, (0.2, 0.5), 0.5, np.random.default_rng(1)))
    with torch.no_grad():
        target = teacher(crops, ["nucleus", "protein"], masks=masks, mask_input=False).patch_logits
    loss_fn = iBOTPatchLoss(16)
    token = student.backbone.mask_token.detach().clone()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        out = student(crops, ["nucleus", "protein"], masks=masks)
        loss, _ = loss_fn(out.patch_logits, target, out.patch_mask, 0.04)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(student.backbone.mask_token.detach(), token)


# --- pretraining with the flags ------------------------------------------------------------------

def train(cells, out, stop_at=None, resume=False, steps=4, **kw):
    trainer = Trainer(discover([str(cells)]), PretrainConfig(**{**TINY, "steps": steps, **kw}), out, workers=0,
                      resume=resume, checkpoint_every=2)
    rows = []
    trainer.run(stop_at=stop_at, on_step=rows.append)
    return trainer, rows


@pytest.mark.parametrize("flags", [dict(koleo=0.1), dict(centering="sinkhorn"), dict(ibot=1.0),
                                   dict(ALL_ON, layout="channel", pack="on")],
                         ids=["koleo", "sinkhorn", "ibot", "all-channel-packed"])
def test_a_short_run_with_each_flag_behaves_and_its_checkpoint_embeds(cells, tmp_path, flags):
    trainer, rows = train(cells, tmp_path / "p.pt", **flags)
    parts = [name for name in ("koleo", "ibot") if flags.get(name)]
    for row in rows:
        assert np.isfinite(row["loss"])
        if parts:  # the log splits the loss into its terms
            assert row["loss"] == pytest.approx(row["dino_loss"] + sum(row[f"{p}_loss"] for p in parts), rel=1e-5)
        else:  # DINO's loss alone, logged as before
            assert "dino_loss" not in row
    ckpt = load_checkpoint(tmp_path / "p.pt")
    assert (ckpt["train"]["centering"] == flags.get("centering", "center")
            and ckpt["train"]["ibot"] == flags.get("ibot", 0))
    if flags.get("centering") == "sinkhorn":  # the center is neither used nor updated
        assert torch.equal(ckpt["center"], torch.zeros(1, 64))
    else:
        assert ckpt["center"].abs().sum() > 0
    if flags.get("ibot"):  # the mask token learns (it starts at zero) and the teacher follows it
        assert (ckpt["student"]["backbone.mask_token"].abs().sum() > 0
                and ckpt["teacher"]["backbone.mask_token"].abs().sum() > 0)
        assert ckpt["ibot_center"].abs().sum() > 0 or flags.get("centering") == "sinkhorn"
    else:
        assert "backbone.mask_token" not in ckpt["student"] and "ibot_center" not in ckpt
    emb = tmp_path / "e.npy"
    result = run_cli("embed", cells, "--weights", tmp_path / "p.pt", "--workers", "0", "-o", emb)
    assert result.exit_code == 0, result.output
    assert np.load(emb).shape == (12, 192) and np.isfinite(np.load(emb)).all()


def test_two_steps_and_resume_equal_four_steps_with_all_on(cells, tmp_path):
    train(cells, tmp_path / "a.pt", **ALL_ON, use_bn_in_head=True)
    train(cells, tmp_path / "b.pt", stop_at=2, **ALL_ON, use_bn_in_head=True)
    resumed, _ = train(cells, tmp_path / "b.pt", resume=True)
    assert resumed.step == 4 and resumed.cfg.ibot == 1.0 and resumed.cfg.mask_ratio == (0.2, 0.5)
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    for key in ("teacher", "student"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, atol=1e-6, rtol=0, msg=f"{key}.{name}")
    for key in ("center", "ibot_center"):
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_ibot_center_resumes_exactly_with_running_mean_centering(cells, tmp_path):
    flags = dict(ALL_ON, centering="center")
    train(cells, tmp_path / "a.pt", **flags)
    train(cells, tmp_path / "b.pt", stop_at=2, **flags)
    train(cells, tmp_path / "b.pt", resume=True)
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    assert a["ibot_center"].abs().sum() > 0
    torch.testing.assert_close(b["ibot_center"], a["ibot_center"], atol=1e-6, rtol=0)
    torch.testing.assert_close(b["teacher"]["head.mlp.0.weight"], a["teacher"]["head.mlp.0.weight"], atol=1e-6, rtol=0)


def test_cli_records_compares_and_checks_the_flags(cells, tmp_path):
    ckpt = tmp_path / "p.pt"
    result = run_cli("pretrain", cells, "-o", ckpt, "--steps", "3", "--stop-at", "1", *TINY_FLAGS, *ALL_ON_FLAGS,
                     "--mask-prob", "0.4", "--quiet")
    assert result.exit_code == 0, result.output
    train_cfg = load_checkpoint(ckpt)["train"]
    assert (train_cfg["koleo"], train_cfg["centering"], train_cfg["ibot"]) == (0.1, "sinkhorn", 1.0)
    assert tuple(train_cfg["mask_ratio"]) == (0.2, 0.5) and train_cfg["mask_prob"] == 0.4
    for flag in (["--koleo", "0.2"], ["--centering", "center"], ["--ibot", "0.5"], ["--mask-ratio", "0.1,0.5"],
                 ["--mask-prob", "0.5"]):
        refused = run_cli("pretrain", cells, "-o", ckpt, "--resume", *flag)
        assert refused.exit_code == 1 and f" {flag[0]} (checkpoint: " in refused.stderr, refused.output
    assert run_cli("pretrain", cells, "-o", ckpt, "--resume", "--workers", "0", "--quiet").exit_code == 0
    assert load_checkpoint(ckpt)["step"] == 3
    # masking flags without --ibot would do nothing: a usage error
    alone = run_cli("pretrain", cells, "-o", tmp_path / "x.pt", "--steps", "1", "--mask-prob", "0.3", *TINY_FLAGS)
    assert alone.exit_code == 2 and "give --ibot W too" in alone.stderr and not (tmp_path / "x.pt").exists()
    one = run_cli("pretrain", cells, "-o", tmp_path / "y.pt", "--steps", "1", "--koleo", "0.1", *MODEL_FLAGS,
                  "--batch-size", "1")
    assert one.exit_code == 1 and one.stderr.startswith("protloc: error: --koleo") and len(one.stderr.splitlines()) == 1


def test_init_across_runs_with_and_without_a_mask_token(cells, tmp_path):
    """A DINO checkpoint starts an iBOT run (its own mask token) and the other way round (dropped)."""
    plain, _ = train(cells, tmp_path / "plain.pt", steps=1)
    cfg = PretrainConfig(**{**TINY, "steps": 1, "ibot": 1.0})
    ibot = Trainer(discover([str(cells)]), cfg, tmp_path / "ibot.pt", workers=0, init=str(tmp_path / "plain.pt"))
    assert torch.equal(ibot.student.backbone.mask_token, torch.zeros(1, 192))
    torch.testing.assert_close(ibot.student.backbone.pos_embed, plain.teacher.backbone.pos_embed)
    ibot.run()
    back = Trainer(discover([str(cells)]), PretrainConfig(**{**TINY, "steps": 1}), tmp_path / "back.pt", workers=0,
                   init=str(tmp_path / "ibot.pt"))
    assert not hasattr(back.student.backbone, "mask_token")
    torch.testing.assert_close(back.student.backbone.pos_embed, ibot.teacher.backbone.pos_embed)


def test_torchrun_two_processes_with_all_on_keep_identical_teachers(cells, tmp_path):
    ckpt = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "protloc", "pretrain", str(cells), "-o", str(ckpt), "--steps", "2", "--checkpoint-every", "1",
           *MODEL_FLAGS, "--batch-size", "2", "--local-crops", "1", "--use-bn-in-head", *ALL_ON_FLAGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = load_checkpoint(ckpt)
    assert data["world_size"] == 2 and data["step"] == 2
    assert len(data["replica_checksums"]) == 2 and data["replica_checksums"][0] == data["replica_checksums"][1]
    assert data["student"]["backbone.mask_token"].abs().sum() > 0 and data["train"]["ibot"] == 1.0
