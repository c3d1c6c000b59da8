"""`--normalize dataset`: one intensity range per channel for the whole data set, estimated once
from a deterministic sample, recorded with the model and reused by embed, finetune and predict.

It keeps what per-image normalization erases: two images that differ only in protein brightness
embed identically under `image` and differently under `dataset`."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

import protloc.data
from protloc.augment import MultiCropConfig, multi_crop
from protloc.checkpoint import load_checkpoint
from protloc.cli import main
from protloc.classifier import load_classifier
from protloc.data import PERCENTILES, ViewOptions, load_item
from protloc.dataset_stats import DatasetStats, estimate, sampled_images, with_dataset_stats
from protloc.embed import load_backbone
from protloc.errors import ProtlocError
from protloc.finetune import embed_all
from protloc.pretrain import PretrainConfig, Trainer
from protloc.sources import discover
from protloc.synth import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]
PRETRAIN = ["--recipe", "dino", *TINY, "--out-dim", "16", "--batch-size", "4", "--global-size", "16",
            "--local-crops", "0", "--device", "cpu"]


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def meta(npz):
    with np.load(npz) as z:
        return z["embeddings"], json.loads(str(z["meta"]))


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """12 synthetic fields (nucleus, protein; uint16, OME channel names) with labels."""
    out = tmp_path_factory.mktemp("cells")
    write_dataset(out, n=12, size=32, seed=3, fields_per_protein=2)
    return out


@pytest.fixture(scope="module")
def pretrained(cells, tmp_path_factory):
    """A 1-step run with --normalize dataset."""
    ckpt = tmp_path_factory.mktemp("run") / "p.pt"
    result = run("pretrain", cells, "-o", ckpt, "--steps", "1", "--normalize", "dataset", *PRETRAIN)
    assert result.exit_code == 0, result.output
    return ckpt, result.stderr


def cell(protein_brightness: float) -> np.ndarray:
    """(2, 32, 32) float32: a nucleus disk and a ring of protein around it, the protein scaled."""
    yy, xx = np.mgrid[:32, :32]
    r = np.hypot(yy - 15.5, xx - 13.0)
    nucleus = np.where(r < 6, 800.0, 100.0) + 10 * np.sin(xx / 3.0)
    protein = (np.where((r > 7) & (r < 11), 2000.0, 120.0) + 30 * np.cos(yy / 2.0)) * protein_brightness
    return np.stack([nucleus, protein]).astype(np.float32)


def test_brightness_differences_survive_dataset_normalization_not_image(tmp_path):
    """Two images, the second's protein 4x dimmer (exactly: float32, a power of 2), otherwise equal."""
    folder = tmp_path / "pair"
    folder.mkdir()
    tifffile.imwrite(folder / "a_bright.tif", cell(1.0))
    tifffile.imwrite(folder / "b_dim.tif", cell(0.25))
    rows = {}
    for normalize in ("image", "dataset"):
        out = tmp_path / f"{normalize}.npz"
        result = run("embed", folder, "--weights", "random", *TINY, "--normalize", normalize, "-o", out)
        assert result.exit_code == 0, result.output
        rows[normalize], m = meta(out)
        assert m["normalize"] == normalize
        reported = [line for line in result.stderr.splitlines() if "dataset normalization" in line]
        assert len(reported) == (normalize == "dataset")  # estimated over these 2 images: one line
    bright, dim = rows["image"]
    np.testing.assert_allclose(dim, bright, rtol=0, atol=1e-5)  # per-image standardization erases the difference
    bright, dim = rows["dataset"]
    assert np.linalg.norm(dim - bright) > 0.1 * np.linalg.norm(bright)
    assert m["dataset_stats"]["channels"] == ["ch0", "ch1"]  # unnamed channels by position
    assert m["dataset_stats"]["images"] == 2 and m["dataset_stats"]["of"] == 2
    # both images through one mapping: the dim protein stays 4x dimmer above the common zero
    stats = DatasetStats.from_dict(m["dataset_stats"], "meta")
    opts = ViewOptions(normalize="dataset", dataset_stats=stats)
    a, b = (load_item(i, s, opts) for i, s in enumerate(discover([str(folder)])))
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.shift, b.shift)


def test_the_statistics_are_the_percentiles_of_the_sampled_pixels_and_deterministic(cells):
    sources = discover([str(cells)])
    stats = estimate(sources, ViewOptions(), workers=0)
    # 32 x 32 images hold fewer than PIXELS pixels: every pixel is sampled
    pixels = [load_item(i, s, ViewOptions(normalize="none")).pixels for i, s in enumerate(sources)]
    assert stats.channels == ("nucleus", "protein") and stats.images == stats.of == 12
    for c, name in enumerate(stats.channels):
        lo, hi = np.percentile(np.concatenate([p[c].ravel() for p in pixels]).astype(np.float64), PERCENTILES)
        assert (stats.lo[c], stats.hi[c]) == (lo, hi), name
    assert estimate(sources, ViewOptions(), workers=1) == stats  # read in a loader worker: the same
    # larger images: a random sample of pixels, the same positions for the same list
    few = estimate(sources, ViewOptions(), workers=0, pixels=50)
    assert few == estimate(sources, ViewOptions(), workers=0, pixels=50) and few != stats
    assert few.pixels == 50


def test_sampling_reads_each_sampled_image_once_spread_over_the_list(cells, monkeypatch):
    reads = []
    real = protloc.data.read_source

    def counting(source, **kw):
        reads.append(source.id)
        return real(source, **kw)

    monkeypatch.setattr(protloc.data, "read_source", counting)
    sources = discover([str(cells)])
    estimate(sources, ViewOptions(), workers=0)
    assert sorted(reads) == sorted(s.id for s in sources)  # all 12, once each
    reads.clear()
    assert sampled_images(12, 5) == [0, 3, 6, 8, 11]  # first and last included, evenly spaced
    stats = estimate(sources, ViewOptions(), workers=0, max_images=5)
    assert reads == [sources[i].id for i in (0, 3, 6, 8, 11)] and (stats.images, stats.of) == (5, 12)
    assert sampled_images(1000, 256) == sorted(set(sampled_images(1000, 256))) and len(sampled_images(1000, 256)) == 256


def test_a_channel_the_statistics_do_not_know_is_an_error_naming_it(cells, tmp_path):
    stats = estimate(discover([str(cells)]), ViewOptions(), workers=0)
    with pytest.raises(ProtlocError, match=r"^img\.tif: channel\(s\) er not in the data set's normalization"):
        stats.scale_shift(["nucleus", "er"], "img.tif")
    scale, shift = stats.scale_shift(["protein", "nucleus"], "img.tif")  # by name, in any order
    assert scale[0] == pytest.approx(1 / (stats.hi[1] - stats.lo[1])) and shift[1] == pytest.approx(
        -stats.lo[0] / (stats.hi[0] - stats.lo[0]))
    # through embed with a checkpoint's statistics: one line naming the file and the channel
    odd = tmp_path / "odd"
    odd.mkdir()
    tifffile.imwrite(odd / "x.tif", cell(1.0).astype(np.uint16))
    ckpt = tmp_path / "p.pt"
    assert run("pretrain", cells, "-o", ckpt, "--steps", "1", "--normalize", "dataset", *PRETRAIN).exit_code == 0
    result = run("embed", odd, "--weights", ckpt, "--channels", "nucleus,er", "--workers", "0", "-o",
                 tmp_path / "e.npz")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"protloc: error: {odd / 'x.tif'}: channel(s) er not in the data set's")
    assert not (tmp_path / "e.npz").exists()


def test_recorded_in_the_checkpoint_and_reused_by_embed_finetune_and_predict(cells, pretrained, tmp_path):
    ckpt, stderr = pretrained
    sources = discover([str(cells)])
    recorded = load_checkpoint(ckpt)["config"]["dataset_stats"]
    assert recorded == estimate(sources, ViewOptions(), workers=0).to_dict()
    assert load_checkpoint(ckpt)["config"]["normalize"] == "dataset"
    assert sum("dataset normalization: 1-99.8th percentiles" in line for line in stderr.splitlines()) == 1

    # embed 4 of the images: the checkpoint's statistics, not those of the 4 (which differ)
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in sorted(cells.glob("*.tif"))[:4]:
        (subset / path.name).write_bytes(path.read_bytes())
    lines = (cells / "labels.csv").read_text().splitlines()  # path,label,group of 2 classes
    labels = subset / "labels.csv"
    labels.write_text("\n".join(lines[:5]) + "\n")
    result = run("embed", subset, "--weights", ckpt, "--workers", "0", "-o", tmp_path / "e.npz")
    assert result.exit_code == 0, result.output
    assert "dataset normalization" not in result.stderr  # nothing estimated
    rows, m = meta(tmp_path / "e.npz")
    assert m["normalize"] == "dataset" and m["dataset_stats"] == recorded
    model, _ = load_backbone(str(ckpt), [], ViewOptions())
    given = ViewOptions(size=m["size"], normalize="dataset", dataset_stats=DatasetStats.from_dict(recorded, "ckpt"))
    subset_sources = discover([str(subset)])
    _, same = embed_all(model, subset_sources, given, workers=0)
    np.testing.assert_array_equal(rows, same)  # the same rows as a run given the same statistics
    own = estimate(subset_sources, ViewOptions(), workers=0)
    assert own.to_dict() != recorded
    _, other = embed_all(model, subset_sources, dataclasses.replace(given, dataset_stats=own), workers=0)
    assert not np.allclose(rows, other)  # so re-estimating would have shown

    # finetune --freeze on the subset: the MODEL records them, predict reuses them
    head = tmp_path / "head.pt"
    result = run("finetune", subset, "--labels", labels, "--weights", ckpt, "--freeze", "--folds", "0",
                 "--no-groups", "--epochs", "2", "--workers", "0", "-o", head)
    assert result.exit_code == 0, result.output
    assert "dataset normalization" not in result.stderr
    clf = load_classifier(head)
    assert clf.views["dataset_stats"] == recorded and clf.views["normalize"] == "dataset"
    assert clf.checkpoint["config"]["dataset_stats"] == recorded
    result = run("predict", subset, "--weights", head, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "dataset normalization" not in result.stderr
    predicted = np.array([[float(v) for v in line.split("\t")[2:]] for line in result.stdout.splitlines()[1:]])
    np.testing.assert_allclose(predicted, clf.probabilities(same), atol=1e-6)

    # full fine-tuning trains on crops of dataset-normalized images and records the statistics too
    model_path = tmp_path / "full.pt"
    result = run("finetune", subset, "--labels", labels, "--weights", ckpt, "--folds", "0", "--no-groups",
                 "--epochs", "1", "--val-fraction", "0", "--size", "16", "--workers", "0", "-o", model_path)
    assert result.exit_code == 0, result.output
    full = load_classifier(model_path)
    assert full.views["dataset_stats"] == recorded and full.checkpoint["config"]["dataset_stats"] == recorded


def test_a_random_backbone_records_what_it_estimated_and_predict_reuses_it(cells, tmp_path):
    """embed --weights random --normalize dataset estimates over its images and records them in
    the .npz; a head trained on that file keeps them, and predict on other images uses them."""
    emb = tmp_path / "e.npz"
    result = run("embed", cells, "--weights", "random", *TINY, "--size", "16", "--normalize", "dataset", "-o", emb)
    assert result.exit_code == 0, result.output
    _, m = meta(emb)
    assert m["dataset_stats"] == estimate(discover([str(cells)]), ViewOptions(), workers=0).to_dict()
    head = tmp_path / "head.pt"
    result = run("finetune", emb, "--labels", cells / "labels.csv", "--folds", "0", "--epochs", "2", "-o", head)
    assert result.exit_code == 0, result.output
    assert load_classifier(head).views["dataset_stats"] == m["dataset_stats"]
    one = tmp_path / "one"
    one.mkdir()
    first = sorted(cells.glob("*.tif"))[0]
    (one / first.name).write_bytes(first.read_bytes())
    result = run("predict", one, "--weights", head, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "dataset normalization" not in result.stderr  # the recorded statistics, not this one image's


def test_pretraining_crops_of_dataset_normalized_images_are_left_as_they_are(cells, tmp_path):
    plain = MultiCropConfig(global_size=16, local_crops=0, global_scale=(1.0, 1.0), flips=False, brightness=0,
                            contrast=0, gamma=0, blur=(0.0, 0.0, 0.0), noise=0, normalize="dataset")
    dim = torch.full((2, 16, 16), 0.25)
    dim[1, 4:8, 4:8] = 0.5
    crops, _ = multi_crop([dim], plain, torch.Generator().manual_seed(0))
    torch.testing.assert_close(crops[0, 0], dim)  # not standardized: a dim image stays dim
    # the trainer's loader maps every image with the data set's statistics
    sources = discover([str(cells)])
    cfg = PretrainConfig(arch="vit_tiny", patch=8, depth=1, out_dim=16, batch_size=4, steps=1, normalize="dataset",
                         crops=MultiCropConfig(global_size=16, local_crops=0))
    trainer = Trainer(sources, cfg, tmp_path / "t.pt", workers=0)
    stats = trainer.dataset_stats_estimated
    assert (cfg.crops.normalize == "dataset" and trainer.view.normalize == "dataset"
            and trainer.view.dataset_stats == stats)
    images = trainer.images([load_item(i, s, trainer.view) for i, s in enumerate(sources[:2])])
    scale, shift = stats.scale_shift(["nucleus", "protein"], "-")
    raw = load_item(0, sources[0], ViewOptions(normalize="none")).pixels.astype(np.float32)
    (scale0, shift0), pixels = images.scale_shift[0], images.pixels[0]
    mapped = pixels.float() * scale0[:, None, None] + shift0[:, None, None]
    np.testing.assert_allclose(mapped.numpy(), raw * scale[:, None, None] + shift[:, None, None], rtol=1e-6)
    assert trainer.student.backbone.config.dataset_stats == stats.to_dict()


def test_recorded_statistics_are_checked(tmp_path):
    with pytest.raises(ProtlocError, match="^model.pt: its dataset normalization statistics are unusable"):
        with_dataset_stats(ViewOptions(normalize="dataset"), {"channels": ["a"], "lo": [0.0]}, "model.pt", [])
    opts, estimated = with_dataset_stats(ViewOptions(normalize="image"), {"bogus": 1}, "model.pt", [])
    assert opts.dataset_stats is None and estimated is None  # other normalizations ignore them


def test_resume_takes_the_statistics_from_the_checkpoint(cells, tmp_path):
    ckpt, straight = tmp_path / "r.pt", tmp_path / "s.pt"
    args = ["--steps", "2", "--normalize", "dataset", *PRETRAIN]
    assert run("pretrain", cells, "-o", ckpt, *args, "--stop-at", "1").exit_code == 0
    resumed = run("pretrain", cells, "-o", ckpt, "--resume", "--workers", "0")
    assert resumed.exit_code == 0, resumed.output
    assert "dataset normalization" not in resumed.stderr  # not estimated again
    assert run("pretrain", cells, "-o", straight, *args).exit_code == 0
    a, b = load_checkpoint(straight), load_checkpoint(ckpt)
    assert a["config"]["dataset_stats"] == b["config"]["dataset_stats"] is not None
    for name, tensor in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][name], tensor, atol=1e-6, rtol=0, msg=name)


def test_attention_maps_of_a_dataset_normalized_checkpoint(cells, pretrained, tmp_path):
    """plot attention reads images as embed does: with the checkpoint's statistics (none estimated)."""
    ckpt, _ = pretrained
    out = tmp_path / "a.png"
    result = run("plot", "attention", sorted(cells.glob("*.tif"))[0], "--weights", ckpt, "-o", out)
    assert result.exit_code == 0 and out.stat().st_size > 0, result.output
    assert "dataset normalization" not in result.stderr


WORKERS_STARTING_LATE = r"""
import os, signal, sys, time
import torch
import protloc.data
real = protloc.data._worker_init
def late(*args):  # a loaded machine: the workers start after the main process is gone
    time.sleep(1.5)
    real(*args)
protloc.data._worker_init = late
class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, i):
        time.sleep(0.1)
        return i
samples = protloc.data.decoded(Slow(), 2, batch_size=None)  # as estimate() and every loader starts workers
time.sleep(0.3)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_loader_workers_end_when_the_main_process_dies_before_they_start():
    """A worker whose main process is gone before its init ran has no main to watch: it ends at once
    (it used to wait for its parent, by then init's, forever)."""
    proc = subprocess.Popen([sys.executable, "-c", WORKERS_STARTING_LATE], start_new_session=True)
    proc.wait()

    def group():
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == proc.pid and fields[0] != "Z":
                pids.append(int(pid))
        return pids

    deadline = time.monotonic() + 20
    while group() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = group()
    for pid in left:
        os.kill(pid, 9)
    assert not left, "loader workers outlived their main process"
