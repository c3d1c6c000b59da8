"""The pretraining loop: exact resume, checkpoints, failure handling, torchrun, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from protloc.augment import MultiCropConfig
from protloc.checkpoint import load_checkpoint
from protloc.cli import main
from protloc.errors import ProtlocError
from protloc.pretrain import PretrainConfig, Schedules, StepBatches, Trainer
from protloc.distributed import World
from protloc.sources import discover
from protloc.synth import write_dataset

TINY = dict(arch="vit_tiny", patch=8, out_dim=64, batch_size=4, lr=1e-3, warmup_epochs=0.5,
            warmup_teacher_temp_epochs=0.5, freeze_last_layer=0.0,
            crops=MultiCropConfig(global_size=32, local_size=16, local_crops=2))
# TINY as flags (TINY is a PretrainConfig: the dino recipe's defaults)
TINY_FLAGS = ["--recipe", "dino", "--arch", "vit_tiny", "--patch", "8", "--out-dim", "64", "--batch-size", "4",
              "--global-size", "32", "--local-size", "16", "--local-crops", "2", "--warmup-epochs", "0.5",
              "--workers", "0"]


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    out = tmp_path_factory.mktemp("cells")
    write_dataset(out, n=12, size=48, seed=5, fields_per_protein=2)
    return out


def train(sources, out, stop_at=None, resume=False, **kw):
    cfg = PretrainConfig(**{**TINY, "steps": 4, **kw})
    trainer = Trainer(sources, cfg, out, workers=0, resume=resume, checkpoint_every=2)
    trainer.run(stop_at=stop_at)
    return trainer


@pytest.mark.parametrize("use_bn_in_head", [False, True])  # with batch norm: its running statistics resume too
def test_two_steps_and_resume_equal_four_steps(cells, tmp_path, use_bn_in_head):
    sources = discover([str(cells)])
    straight = train(sources, tmp_path / "a.pt", use_bn_in_head=use_bn_in_head)
    train(sources, tmp_path / "b.pt", stop_at=2, use_bn_in_head=use_bn_in_head)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 2
    resumed = train(sources, tmp_path / "b.pt", resume=True)
    assert resumed.step == 4
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    for key in ("teacher", "student"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, atol=1e-6, rtol=0, msg=f"{key}.{name}")
    torch.testing.assert_close(b["center"], a["center"], atol=1e-6, rtol=0)
    assert a["model"].keys() == straight.teacher.backbone.state_dict().keys()  # `model` = teacher backbone
    assert not torch.equal(a["teacher"]["backbone.pos_embed"], a["student"]["backbone.pos_embed"])


def test_data_order_covers_each_epoch_and_splits_over_ranks():
    steps = list(StepBatches(10, 2, World(0, 1), seed=0, start=0, stop=5, steps_per_epoch=5))
    assert sorted(i for batch in steps for i in batch) == list(range(10))  # one epoch, every image once
    rank0 = list(StepBatches(10, 2, World(0, 2), seed=0, start=0, stop=2, steps_per_epoch=2))
    rank1 = list(StepBatches(10, 2, World(1, 2), seed=0, start=0, stop=2, steps_per_epoch=2))
    for a, b in zip(rank0, rank1):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    assert list(StepBatches(10, 2, World(0, 1), 0, 3, 5, 5)) == steps[3:]  # resuming mid-epoch


def test_schedules_follow_the_epochs():
    cfg = PretrainConfig(**{**TINY, "steps": None, "epochs": 4, "warmup_epochs": 1, "freeze_last_layer": 1})
    s = Schedules.build(cfg, n_images=20, world_size=1)
    assert s.steps_per_epoch == 5 and s.total == 20 and s.freeze_last_layer_steps == 5
    assert s.lr[0] == 0 and s.lr[5] == pytest.approx(1e-3 * 4 / 256)
    with pytest.raises(ProtlocError, match="fewer than one batch"):
        Schedules.build(cfg, n_images=3, world_size=1)


def test_last_layer_frozen_during_the_first_epoch(cells, tmp_path):
    sources = discover([str(cells)])
    trainer = Trainer(sources,
                      PretrainConfig(**{**TINY, "steps": 3, "freeze_last_layer": 1.0, "norm_last_layer": False}),
                      tmp_path / "f.pt", workers=0)
    before = trainer.student.head.last_layer.weight_v.detach().clone()
    trainer.run()
    assert trainer.schedules.freeze_last_layer_steps == 3
    torch.testing.assert_close(trainer.student.head.last_layer.weight_v.detach(), before)
    assert not torch.equal(trainer.student.head.mlp[0].weight.detach(), trainer.teacher.head.mlp[0].weight.detach())


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(cells, tmp_path, monkeypatch):
    sources = discover([str(cells)])
    trainer = Trainer(sources, PretrainConfig(**{**TINY, "steps": 4}), tmp_path / "n.pt", workers=0, checkpoint_every=2)
    real_forward = trainer.loss_fn.forward

    def poisoned(student_out, *args):
        loss, targets = real_forward(student_out, *args)
        return (loss * float("nan") if trainer.step == 2 else loss), targets
    monkeypatch.setattr(trainer.loss_fn, "forward", poisoned)
    with pytest.raises(ProtlocError, match="step 3.*step 2"):
        trainer.run()
    assert load_checkpoint(tmp_path / "n.pt")["step"] == 2


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_pretrain_log_then_embed(cells, tmp_path):
    ckpt, log = tmp_path / "p.pt", tmp_path / "log.jsonl"
    result = run_cli(["pretrain", cells, "-o", ckpt, "--steps", "2", "--log", log, *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "lr", "weight_decay", "teacher_temp", "momentum", "images_per_s", "peak_memory_mb"} <= set(rows[0])
    assert all(np.isfinite(r["loss"]) for r in rows)
    emb = tmp_path / "e.npz"
    assert run_cli(["embed", cells, "--weights", ckpt, "--workers", "0", "-o", emb]).exit_code == 0
    with np.load(emb) as z:
        assert z["embeddings"].shape == (12, 192)
        assert json.loads(str(z["meta"]))["normalize"] == "image"  # as --recipe dino records
    # the run is complete: resuming has nothing to do; a new run needs --force
    again = run_cli(["pretrain", cells, "-o", ckpt, "--resume"])
    assert again.exit_code == 1 and "already complete" in again.stderr
    assert run_cli(["pretrain", cells, "-o", ckpt, "--steps", "2", *TINY_FLAGS]).exit_code == 1
    assert run_cli(["pretrain", cells, "-o", tmp_path / "x.pt", *TINY_FLAGS]).exit_code == 2  # no length given


def test_init_from_a_protloc_checkpoint(cells, tmp_path):
    first = tmp_path / "first.pt"
    assert run_cli(["pretrain", cells, "-o", first, "--steps", "1", *TINY_FLAGS, "--depth", "1"]).exit_code == 0
    trainer = Trainer(discover([str(cells)]), PretrainConfig(**{**TINY, "steps": 1, "depth": 1}),
                      tmp_path / "second.pt", workers=0, init=str(first))
    torch.testing.assert_close(trainer.student.backbone.state_dict()["pos_embed"],
                               load_checkpoint(first)["model"]["pos_embed"])


def test_torchrun_two_gloo_processes_keep_identical_teachers(cells, tmp_path):
    ckpt = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "protloc", "pretrain", str(cells), "-o", str(ckpt), "--steps", "2", "--checkpoint-every", "1",
           "--device", "cpu", *TINY_FLAGS[:-2], "--batch-size", "2", "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt_data = load_checkpoint(ckpt)
    assert ckpt_data["world_size"] == 2 and ckpt_data["step"] == 2
    sums = ckpt_data["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]


def start_pretrain(cells, tmp_path, name, *flags):
    """A CPU pretraining run in its own process, logging each step to NAME.jsonl."""
    cmd = [sys.executable, "-m", "protloc", "pretrain", str(cells), "-o", str(tmp_path / f"{name}.pt"),
           "--log", str(tmp_path / f"{name}.jsonl"), "--device", "cpu", *TINY_FLAGS, *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_steps(proc, log_path, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {n}: {proc.stderr.read()[-2000:]}"
        if log_path.exists() and len(log_path.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {n} within {timeout} s")


@pytest.mark.parametrize("objective", [[], ["--koleo", "0.1", "--centering", "sinkhorn", "--ibot", "1"]],
                         ids=["dino", "dinov2"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(cells, tmp_path, objective):
    """Killed at a random moment: the last checkpoint is whole, and resuming from it finishes the
    run exactly as if nothing had happened (with DINOv2's KoLeo, Sinkhorn-Knopp and iBOT too)."""
    flags = ["--steps", "12", "--checkpoint-every", "3", "--seed", "3", *objective]
    proc = start_pretrain(cells, tmp_path, "killed", *flags)
    wait_for_steps(proc, tmp_path / "killed.jsonl", 4)
    proc.kill()
    proc.wait()
    survived = load_checkpoint(tmp_path / "killed.pt")  # whole, not half-written
    assert survived["step"] in (3, 6, 9)
    assert run_cli(["pretrain", str(cells), "-o", str(tmp_path / "killed.pt"), "--resume", "--device", "cpu",
                    "--workers", "0"]).exit_code == 0
    straight = start_pretrain(cells, tmp_path, "straight", *flags)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]
    a, b = load_checkpoint(tmp_path / "straight.pt"), load_checkpoint(tmp_path / "killed.pt")
    assert a["step"] == b["step"] == 12
    for name, tensor in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(cells, tmp_path, sig):
    proc = start_pretrain(cells, tmp_path, "run", "--steps", "1000", "--checkpoint-every", "1000")
    wait_for_steps(proc, tmp_path / "run.jsonl", 2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert f"stopped by {sig.name}" in stderr and "--resume" in stderr and "Traceback" not in stderr
    steps_logged = len((tmp_path / "run.jsonl").read_text().splitlines())
    assert load_checkpoint(tmp_path / "run.pt")["step"] == steps_logged < 1000
