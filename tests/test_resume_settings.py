"""`pretrain --resume` continues a run exactly as its checkpoint records it: a flag that would change
the run is an error naming it (flag, checkpoint value, given value) unless it equals the recorded
value; flags left out take the recorded values; flags that do not change the run are free.
`--init` starts a new run from a checkpoint's weights; `--clip-grad 0` means no clipping."""

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from protloc.augment import MultiCropConfig
from protloc.checkpoint import load_checkpoint
from protloc.cli import main
from protloc.cli.pretrain import RUN_INDEPENDENT, _settings, pretrain_command
from protloc.dino import clip_gradients
from protloc.pretrain import PretrainConfig, Trainer
from protloc.sources import discover

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--recipe", "dino", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--out-dim", "16",
         "--global-size", "16", "--local-size", "16", "--local-crops", "1", "--batch-size", "2", "--workers", "0",
         "--device", "cpu"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in "abcd":
        tifffile.imwrite(folder / f"{name}.tif", rng.integers(0, 4000, (2, 24, 24), dtype=np.uint16))
    return folder


@pytest.fixture(scope="module")
def stopped(images, tmp_path_factory):
    """A run of 4 steps with non-default settings, stopped after step 1."""
    ckpt = tmp_path_factory.mktemp("run") / "p.pt"
    result = run("pretrain", images, "-o", ckpt, "--steps", "4", "--lr", "0.002", "--seed", "3", "--z", "mean",
                 "--stop-at", "1", *FLAGS)
    assert result.exit_code == 0, result.output
    return ckpt


def copy(ckpt, tmp_path):
    target = tmp_path / ckpt.name
    target.write_bytes(ckpt.read_bytes())
    return target


def test_every_flag_either_defines_the_run_or_is_declared_independent_of_it():
    flags = {max(p.opts, key=len) for p in pretrain_command.params if p.opts[0].startswith("-")}
    settings = set(_settings(PretrainConfig()))
    assert flags == settings | RUN_INDEPENDENT and not settings & RUN_INDEPENDENT


@pytest.mark.parametrize("flag", [["--steps", "8"], ["--epochs", "2"], ["--lr", "0.001"], ["--warmup-epochs", "2"],
                                  ["--teacher-temp", "0.07"], ["--clip-grad", "0"], ["--arch", "vit_small"],
                                  ["--out-dim", "32"], ["--use-bn-in-head"], ["--global-scale", "0.5,1"],
                                  ["--pack", "off"], ["--normalize", "percentile"], ["--channels", "nucleus,protein"],
                                  ["--z", "max"], ["--channel-suffixes", "gfp,rfp"], ["--seed", "0"]],
                         ids=lambda flag: flag[0])
def test_a_flag_that_changes_the_run_is_refused_naming_it(images, stopped, tmp_path, flag):
    ckpt = copy(stopped, tmp_path)
    result = run("pretrain", images, "-o", ckpt, "--resume", *flag)
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert f" {flag[0]} (checkpoint: " in result.stderr and f"--init {ckpt}" in result.stderr
    assert load_checkpoint(ckpt)["step"] == 1


def test_the_error_names_every_difference_with_both_values(images, stopped, tmp_path):
    ckpt = copy(stopped, tmp_path)
    result = run("pretrain", images, "-o", ckpt, "--resume", "--steps", "8", "--lr", "0.001", "--arch", "vit_tiny")
    assert result.stderr == (
        f"protloc: error: {ckpt}: --resume continues the run with the settings it records; given otherwise: "
        "--steps (checkpoint: 4, given: 8), --lr (checkpoint: 0.002, given: 0.001). To train longer or otherwise, "
        f"start a new run from its weights: protloc pretrain DATA -o NEW.pt --init {ckpt} --steps N ...\n")


def test_resume_takes_the_recorded_settings_and_equals_an_uninterrupted_run(images, stopped, tmp_path):
    """Flags left out take the recorded values (--lr 0.002, --seed 3, --z mean, the tiny model);
    equal ones and those that do not change the run are accepted."""
    ckpt = copy(stopped, tmp_path)
    resumed = run("pretrain", images, "-o", ckpt, "--resume", "--steps", "4", "--arch", "vit_tiny", "--lr", "0.002",
                  "--workers", "1", "--log", tmp_path / "log.jsonl", "--checkpoint-every", "1", "--device", "cpu",
                  "--on-error", "skip", "--max-pixels", "100000", "--force", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    straight = tmp_path / "straight.pt"
    assert run("pretrain", images, "-o", straight, "--steps", "4", "--lr", "0.002", "--seed", "3", "--z", "mean",
               *FLAGS, "--quiet").exit_code == 0
    a, b = load_checkpoint(straight), load_checkpoint(ckpt)
    assert a["step"] == b["step"] == 4 and a["train"] == b["train"]
    for name, tensor in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][name], tensor, atol=1e-6, rtol=0, msg=name)


def test_a_complete_run_says_how_to_train_longer(images, stopped, tmp_path):
    ckpt = copy(stopped, tmp_path)
    assert run("pretrain", images, "-o", ckpt, "--resume", "--quiet").exit_code == 0
    again = run("pretrain", images, "-o", ckpt, "--resume")
    assert again.exit_code == 1
    assert again.stderr == (f"protloc: error: {ckpt}: the run is already complete (4 of 4 steps); to train longer, "
                            f"start a new run from its weights with --init {ckpt}\n")


def test_init_starts_a_new_run_from_the_weights(images, stopped, tmp_path):
    old = load_checkpoint(stopped)
    cfg = PretrainConfig(arch="vit_tiny", patch=8, depth=1, out_dim=16, batch_size=2, steps=6, lr=0.01, seed=5,
                         crops=MultiCropConfig(global_size=16, local_size=16, local_crops=1))
    trainer = Trainer(discover([str(images)]), cfg, tmp_path / "new.pt", workers=0, init=str(stopped))
    assert trainer.step == 0 and not trainer.optimizer.state  # a new optimizer
    assert trainer.schedules.total == 6 and trainer.cfg.lr == 0.01  # the new run's schedules
    for model in (trainer.student, trainer.teacher):
        for name, tensor in old["model"].items():  # the checkpoint's (teacher) backbone
            torch.testing.assert_close(model.backbone.state_dict()[name], tensor, msg=name)
    head = trainer.student.head.state_dict()  # a new DINO head (this run's seed), not the checkpoint's
    assert not torch.equal(head["mlp.0.weight"], old["student"]["head.mlp.0.weight"])
    result = run("pretrain", images, "-o", tmp_path / "cli.pt", "--init", stopped, "--steps", "2", *FLAGS, "--quiet")
    assert result.exit_code == 0, result.output
    new = load_checkpoint(tmp_path / "cli.pt")
    assert new["step"] == 2 and new["train"]["steps"] == 2 and new["train"]["lr"] == PretrainConfig.lr


def test_clip_grad_zero_means_no_clipping(images, tmp_path):
    layer = torch.nn.Linear(4, 4)
    layer.weight.grad = torch.full((4, 4), 100.0)
    clip_gradients(layer, 0)
    assert torch.equal(layer.weight.grad, torch.full((4, 4), 100.0))
    clip_gradients(layer, 3.0)
    assert torch.linalg.norm(layer.weight.grad) == pytest.approx(3.0, rel=1e-4)
    result = run("pretrain", images, "-o", tmp_path / "c.pt", "--steps", "1", "--clip-grad", "0", *FLAGS, "--quiet")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "c.pt")["train"]["clip_grad"] == 0
