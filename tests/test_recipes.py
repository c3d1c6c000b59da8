"""`pretrain --recipe small|dino`: a recipe is a whole set of settings (protloc/recipes.py);
an explicit flag replaces exactly its setting; the checkpoint records every resolved setting, and
embed / finetune / predict with it view images as it records (size, normalization, pooling)
unless told otherwise; --resume works with --recipe."""

import dataclasses
import json

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from protloc.checkpoint import load_checkpoint
from protloc.classifier import load_classifier
from protloc.cli import main
from protloc.cli.pretrain import _config, pretrain_command
from protloc.data import ViewOptions
from protloc.dataset_stats import DatasetStats
from protloc.embed import load_backbone
from protloc.finetune import embed_all
from protloc.pretrain import PretrainConfig
from protloc.recipes import DEFAULT, DINO, RECIPES, changes, resolve, settings
from protloc.sources import discover

pytestmark = pytest.mark.usefixtures("one_thread")

# `small` made cheap for tests: each flag replaces one of its settings
CHEAP = ["--depth", "1", "--out-dim", "16", "--batch-size", "2", "--global-size", "16", "--workers", "0",
         "--device", "cpu"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def resolved(*args) -> PretrainConfig:
    """The settings `protloc pretrain DATA -o X ARGS` would run with (nothing is read or written)."""
    with pretrain_command.make_context("pretrain", ["data", "-o", "x.pt", *args]) as ctx:
        return _config(ctx)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """6 fields of 40 x 40, 2 channels, uint16, with labels."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k in range(6):
        tifffile.imwrite(folder / f"f{k}.tif", rng.integers(0, 4000, (2, 40, 40), dtype=np.uint16))
    (folder / "labels.csv").write_text("path,label\n" + "".join(f"f{k}.tif,{'ab'[k % 2]}\n" for k in range(6)))
    return folder


@pytest.fixture(scope="module")
def small_run(images, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("run") / "small.pt"
    result = run("pretrain", images, "-o", ckpt, "--recipe", "small", "--steps", "1", "--embed-pool", "mean", *CHEAP)
    assert result.exit_code == 0, result.output
    return ckpt


def test_small_resolves_to_the_documented_settings_and_dino_to_the_reference():
    small = resolve("small", {})
    assert (small.arch, small.patch, small.depth, small.use_bn_in_head, small.out_dim, small.batch_size) == \
        ("vit_tiny", 8, 4, True, 1024, 32)
    assert (small.crops.global_size, small.crops.local_crops, small.lr, small.warmup_epochs) == (64, 0, 0.0016, 10.0)
    assert (small.warmup_teacher_temp_epochs, small.momentum_teacher, small.freeze_last_layer) == (0.0, 0.99, 0.0)
    assert (small.embed_size, small.embed_pool, small.normalize, small.recipe) == (64, "cls", "dataset", "small")
    assert (small.koleo, small.centering, small.ibot) == (0.3, "center", 0.0)
    assert set(changes("small")) == {"arch", "patch", "depth", "use_bn_in_head", "out_dim", "batch_size", "lr",
                                     "warmup_teacher_temp_epochs", "momentum_teacher", "freeze_last_layer",
                                     "global_size", "local_crops", "embed_size", "normalize",
                                     "koleo"}  # the rest is dino's
    assert resolve("dino", {}) == DINO == PretrainConfig() and DEFAULT == "small"
    assert (DINO.out_dim, DINO.crops.local_crops, DINO.embed_size, DINO.normalize, DINO.koleo) == \
        (65536, 8, None, "image", 0.0)
    assert resolved("--steps", "5") == dataclasses.replace(small, steps=5)  # no --recipe: the default one
    assert resolved("--recipe", "dino", "--steps", "5") == dataclasses.replace(DINO, steps=5)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("args, setting, value", [
    (["--out-dim", "77"], "out_dim", 77), (["--patch", "16"], "patch", 16), (["--lr", "0.01"], "lr", 0.01),
    (["--no-bn-in-head"], "use_bn_in_head", False), (["--use-bn-in-head"], "use_bn_in_head", True),
    (["--global-size", "32"], "global_size", 32), (["--local-scale", "0.1,0.3"], "local_scale", (0.1, 0.3)),
    (["--embed-size", "0"], "embed_size", None), (["--embed-size", "48"], "embed_size", 48),
    (["--embed-pool", "mean"], "embed_pool", "mean"), (["--normalize", "dataset"], "normalize", "dataset"),
    (["--pack", "off"], "pack", "off"), (["--seed", "4"], "seed", 4)], ids=lambda v: str(v))
def test_an_explicit_flag_replaces_exactly_its_setting(recipe, args, setting, value):
    cfg = resolved("--recipe", recipe, *args)
    want = {**settings(RECIPES[recipe]), setting: value}
    assert settings(cfg) == want
    assert cfg.crops.normalize == cfg.normalize  # the crops follow the run's normalization


def test_help_says_what_each_recipe_sets():
    text = " ".join(run("pretrain", "--help").output.split()).replace("- ", "-")  # click wraps at hyphens
    assert "small (the default): for a few hundred to a few hundred thousand images on a CPU or one GPU: dino's " \
           "except --arch vit_tiny --patch 8 --depth 4 --normalize dataset --embed-size 64 --out-dim 1024 " \
           "--use-bn-in-head --batch-size 32" in text and "--koleo 0.3" in text
    assert "DINO head output dimension. Default: the --recipe's: dino 65536, small 1024." in text
    assert "Default: the --recipe's: dino 0 (native), small 64." in text
    assert "Stochastic depth of the student. Default: 0.1 (every --recipe)." in text


def test_the_checkpoint_records_every_resolved_setting(small_run):
    ckpt = load_checkpoint(small_run)
    want = resolve("small", {"depth": 1, "out_dim": 16, "batch_size": 2, "global_size": 16, "steps": 1,
                             "embed_pool": "mean"})
    assert PretrainConfig.from_dict(ckpt["train"]) == want and ckpt["train"]["recipe"] == "small"
    config = ckpt["config"]  # the backbone's: how embed views images with it
    assert (config["view_size"], config["normalize"], config["pool"]) == (64, "dataset", "mean")
    assert config["dataset_stats"]["channels"] == ["ch0", "ch1"] and config["dataset_stats"]["of"] == 6
    assert (config["arch"], config["patch"], config["depth"]) == ("vit_tiny", 8, 1)


def embedded(path):
    with np.load(path) as z:
        return z["embeddings"], json.loads(str(z["meta"]))


def test_embed_finetune_and_predict_view_as_the_checkpoint_records_unless_told(images, small_run, tmp_path):
    model, _ = load_backbone(str(small_run), [], ViewOptions())
    stats = DatasetStats.from_dict(load_checkpoint(small_run)["config"]["dataset_stats"], "ckpt")
    recorded = ViewOptions(size=64, normalize="dataset", dataset_stats=stats)
    sources = discover([str(images)])
    result = run("embed", images, "--weights", small_run, "--workers", "0", "-o", tmp_path / "rec.npz")
    assert result.exit_code == 0, result.output
    rows, m = embedded(tmp_path / "rec.npz")
    assert (m["size"], m["normalize"], m["pool"]) == (64, "dataset", "mean")
    _, want = embed_all(model, sources, dataclasses.replace(recorded, pool="mean"), workers=0)
    np.testing.assert_array_equal(rows, want)

    result = run("embed", images, "--weights", small_run, "--workers", "0", "--size", "0", "--pool", "cls",
                 "--normalize", "percentile", "-o", tmp_path / "told.npz")
    assert result.exit_code == 0, result.output
    rows, m = embedded(tmp_path / "told.npz")
    assert (m["size"], m["normalize"], m["pool"]) == (None, "percentile", "cls")
    _, want = embed_all(model, sources, ViewOptions(normalize="percentile", pool="cls"), workers=0)  # native 40 px
    np.testing.assert_array_equal(rows, want)

    head = tmp_path / "head.pt"
    result = run("finetune", images, "--labels", images / "labels.csv", "--weights", small_run, "--freeze",
                 "--folds", "0", "--epochs", "2", "--workers", "0", "-o", head)
    assert result.exit_code == 0, result.output
    clf = load_classifier(head)
    assert (clf.views["size"], clf.views["normalize"], clf.views["pool"]) == (64, "dataset", "mean")
    assert (clf.checkpoint["config"]["view_size"], clf.checkpoint["config"]["pool"]) == (64, "mean")
    result = run("predict", images, "--weights", head, "--workers", "0", "--size", "32")
    assert result.exit_code == 0, result.output
    probs = np.array([[float(v) for v in line.split("\t")[2:]] for line in result.stdout.splitlines()[1:]])
    _, x = embed_all(model, sources, dataclasses.replace(recorded, size=32, pool="mean"), workers=0)
    np.testing.assert_allclose(probs, clf.probabilities(x), atol=1e-6)  # the flag's size, the MODEL's pooling

    full = tmp_path / "full.pt"  # full fine-tuning: crops and evaluation at the recorded 64 px
    result = run("finetune", images, "--labels", images / "labels.csv", "--weights", small_run, "--folds", "0",
                 "--epochs", "1", "--val-fraction", "0", "--workers", "0", "-o", full)
    assert result.exit_code == 0, result.output
    tuned = load_classifier(full)
    assert (tuned.views["size"] == 64
            and json.loads(json.dumps(tuned.checkpoint["classifier"]["finetune"]))["size"] == 64)
    assert run("finetune", images, "--labels", images / "labels.csv", "--weights", small_run, "--size", "0",
               "--folds", "0", "-o", tmp_path / "x.pt").exit_code == 2  # native size needs --freeze


def test_resume_with_a_recipe(images, tmp_path):
    ckpt = tmp_path / "r.pt"
    args = ["pretrain", images, "-o", ckpt, "--recipe", "small", "--steps", "2", *CHEAP]
    assert run(*args, "--stop-at", "1").exit_code == 0
    wrong = run("pretrain", images, "-o", ckpt, "--resume", "--recipe", "dino")
    assert wrong.exit_code == 1 and "--recipe (checkpoint: small, given: dino)" in wrong.stderr
    assert load_checkpoint(ckpt)["step"] == 1
    resumed = run("pretrain", images, "-o", ckpt, "--resume", "--recipe", "small", "--out-dim", "16", "--workers", "0")
    assert resumed.exit_code == 0, resumed.output
    straight = tmp_path / "s.pt"
    assert run("pretrain", images, "-o", straight, "--recipe", "small", "--steps", "2", *CHEAP).exit_code == 0
    a, b = load_checkpoint(straight), load_checkpoint(ckpt)
    assert a["step"] == b["step"] == 2 and a["train"] == b["train"] and b["train"]["recipe"] == "small"
    for name, tensor in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][name], tensor, atol=1e-6, rtol=0, msg=name)
