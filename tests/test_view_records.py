"""One owner per idea (issue 16): the view record (ViewOptions.to_record / from_record) that embeddings
files and MODELs carry, views built from flags in one place, the pixels behind a row, the finetune
run's preparation, EmbedStats.merge, and an unusable PROTLOC_BACKEND as one error line."""

import dataclasses
import json

import click
import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from protloc.cells import cut_cells
from protloc.classifier import Classifier, prediction_view
from protloc.cli import main
from protloc.cli.options import cell_options, channel_options, data_options, view_flags, view_from_flags, view_options
from protloc.data import ViewOptions, view_record
from protloc.dataset_stats import DatasetStats
from protloc.embed import EmbedStats
from protloc.embeddings import read_embeddings
from protloc.errors import ProtlocError
from protloc.finetune import FinetuneConfig, check_mode
from protloc.head import Head
from protloc.model import ViTConfig
from protloc.plot_data import read_view

TINY = ["--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def write_image(path, pixels):
    tifffile.imwrite(path, pixels, metadata={"axes": "CYX"})
    return path


def test_an_unusable_backend_is_one_error_line(tmp_path, monkeypatch):
    image = write_image(tmp_path / "a.tif", np.random.default_rng(0).integers(0, 255, (2, 16, 16), dtype=np.uint8))
    monkeypatch.setenv("PROTLOC_BACKEND", "cuda-please")
    result = run(["embed", image, "--weights", "random", *TINY, "-o", tmp_path / "e.npz"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "protloc: error: PROTLOC_BACKEND='cuda-please': expected one of auto, triton, torch"]
    assert not (tmp_path / "e.npz").exists()


def full_view():
    stats = DatasetStats(channels=("nucleus", "protein"), lo=(1.0, 2.0), hi=(100.0, 200.0), images=3, of=4, pixels=99)
    return ViewOptions(size=48, cells="masks/{stem}.tif", cell_size=24, mask_outside=True, border="pad",
                       normalize="dataset", dataset_stats=stats, pool="mean", aggregate="mean",
                       channels=("nucleus", "protein"), channel_suffixes=("gfp", "dapi"), z="mean",
                       model_channels=("protein", "nucleus", "er"), channel_strategy="random", fill="mean",
                       strategy_seed=7)


def test_a_record_reads_back_as_the_view_it_was(tmp_path):
    view = full_view()
    record = json.loads(json.dumps(view.to_record()))  # as an .npz meta or a MODEL stores it
    assert ViewOptions.from_record(record, "x.npz") == view
    tiles = ViewOptions(tile=32, normalize="percentile")
    assert tiles.to_record()["stride"] == 32 and tiles.to_record()["cell_size"] is None  # no cells: no crop settings
    assert ViewOptions.from_record(tiles.to_record(), "x.npz") == dataclasses.replace(tiles, stride=32)
    assert set(view_record({"cwd": "/x", "weights": "m.pt", **record})) == set(record)


def test_an_old_style_record_still_reads():
    """Records written before cells, channel strategies and dataset statistics existed, and a bare
    .npy's (every setting None): what they do not say is the model's, else the defaults."""
    config = ViTConfig(arch="vit_tiny", patch=8, normalize="percentile", pool="mean", view_size=64)
    old = {"size": 32, "normalize": "image", "pool": "cls", "tile": 16, "stride": 8, "aggregate": "mean",
           "channels": ["nucleus", "protein"], "channel_suffixes": None, "z": "sum"}
    assert ViewOptions.from_record(old, "old.pt", config) == ViewOptions(
        size=32, normalize="image", pool="cls", tile=16, stride=8, aggregate="mean", channels=("nucleus", "protein"),
        z="sum")
    bare = view_record({})  # a head trained on a bare .npy
    assert ViewOptions.from_record(bare, "head.pt", config) == ViewOptions(normalize="percentile", pool="mean")
    assert ViewOptions.from_record({}, "model.pt", config) == ViewOptions(size=64, normalize="percentile", pool="mean")
    with pytest.raises(ProtlocError, match="old.pt: its dataset normalization statistics are unusable"):
        ViewOptions.from_record({**old, "normalize": "dataset", "dataset_stats": {"channels": ["a"]}}, "old.pt")


def test_an_old_style_model_predicts_as_before(tmp_path):
    """A MODEL whose views lack the keys of later versions (cells, channel strategy, statistics) predicts as
    the same MODEL with a full record."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for k in range(8):
        write_image(folder / f"{k}.tif", rng.integers(0, 255 if k % 2 else 60, (2, 16, 16), dtype=np.uint8))
        rows.append(f"{k}.tif,{'bright' if k % 2 else 'dim'}")
    (folder / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    result = run(["embed", folder, "--weights", "random", *TINY, "-o", tmp_path / "e.npz", "-q"])
    assert result.exit_code == 0, result.output
    result = run(["finetune", tmp_path / "e.npz", "--labels", folder / "labels.csv", "--folds", "0",
                  "-o", tmp_path / "head.pt", "-q"])
    assert result.exit_code == 0, result.output
    new = run(["predict", folder, "--weights", tmp_path / "head.pt", "--workers", "0"])
    assert new.exit_code == 0, new.output
    ckpt = torch.load(tmp_path / "head.pt", weights_only=True)
    views = ckpt["classifier"]["views"]
    assert views["channel_strategy"]["strategy"] == "natural" and views["pool"] == "cls"
    for key in ("cells", "cell_size", "mask_outside", "border", "channel_strategy", "dataset_stats"):
        del views[key]
    torch.save(ckpt, tmp_path / "old.pt")
    old = run(["predict", folder, "--weights", tmp_path / "old.pt", "--workers", "0"])
    assert old.exit_code == 0, old.output
    assert old.stdout == new.stdout and len(old.stdout.splitlines()) == 9


def test_flags_given_on_the_command_line_set_the_view_and_nothing_else():
    seen = []

    @click.command()
    @view_options(inherit="the MODEL")
    @cell_options(inherit="the MODEL")
    @channel_options(inherit="the MODEL")
    @data_options
    @click.pass_context
    def command(ctx, **_):
        seen.append(view_flags(ctx))
        seen.append(view_from_flags(ctx, ViewOptions(tile=32, stride=16, aggregate="mean", z="sum", size=64)))

    result = CliRunner().invoke(command, ["--tile", "0", "--size", "0", "--channels", "a,b", "--model-channels", "c,d",
                                          "--mask-outside", "--series", "1"])
    assert result.exit_code == 0, result.output
    assert seen[0] == {"tile": None, "stride": None, "aggregate": None, "size": None, "channels": ("a", "b"),
                       "model_channels": ("c", "d"), "mask_outside": True, "series": 1}
    assert seen[1] == ViewOptions(channels=("a", "b"), model_channels=("c", "d"), mask_outside=True, series=1, z="sum")


def random_classifier(views: dict) -> Classifier:
    config = ViTConfig(arch="vit_tiny", patch=8, depth=1, normalize="percentile")
    ref = {"included": False, "weights": "random", "seed": 0, "config": config.to_dict()}
    return Classifier(Head(192, 2, "linear"), ["a", "b"], False, views, ref, {}, "model.pt")


def test_predict_views_as_the_model_recorded_but_never_its_masks(caplog):
    cells = ViewOptions(cells="train/masks", cell_size=32, aggregate="mean", normalize="image").to_record()
    model, view, _ = prediction_view(random_classifier(cells), {})
    assert model.dim == 192 and view == ViewOptions(cell_size=32, normalize="image")  # whole images, no aggregate
    assert "model.pt was trained on single cells (--cells train/masks)" in caplog.text
    _, view, _ = prediction_view(random_classifier(cells), {"cells": "new/masks"})
    assert (view.cells, view.cell_size, view.aggregate) == ("new/masks", 32, "mean")
    tiles = ViewOptions(tile=16, aggregate="mean").to_record()
    _, view, _ = prediction_view(random_classifier(tiles), {"cells": "new/masks"})  # cells replace the MODEL's tiles
    assert (view.tile, view.stride, view.cells) == (None, None, "new/masks")
    _, view, _ = prediction_view(random_classifier(view_record({})), {"size": 24})  # nothing recorded: the backbone's
    assert (view.size, view.normalize, view.pool) == (24, "percentile", "cls")


def test_embed_stats_of_several_ranks_merge_in_rank_order():
    first = EmbedStats(images=2, views=3, view_meta=[{"k": 0}], channel_maps={"a"}, skipped=[("x", "bad")],
                       data_wait_s=1.5)
    second = EmbedStats(images=1, views=2, view_meta=[{"k": 1}], channel_maps={"b", "a"}, skipped=[("y", "bad")],
                        data_wait_s=0.5)
    assert EmbedStats.merge([first, second]) == EmbedStats(
        images=3, views=5, view_meta=[{"k": 0}, {"k": 1}], channel_maps={"a", "b"},
        skipped=[("x", "bad"), ("y", "bad")], data_wait_s=1.5)
    assert EmbedStats.merge([first]) == first


def test_each_mode_knows_its_defaults_and_what_it_cannot_take():
    frozen = FinetuneConfig.for_mode(True, "mlp")
    full = FinetuneConfig.for_mode(False, "mlp", epochs=5, val_fraction=None)
    assert (frozen.epochs, frozen.min_steps, frozen.batch_size, frozen.val_fraction) == (100, 500, 256, 0.0)
    assert (full.epochs, full.min_steps, full.batch_size, full.val_fraction) == (5, 300, 32, 0.1)
    probe = FinetuneConfig.for_mode(True, "linear", val_fraction=0.2)
    assert probe.probe and probe.val_fraction == 0.0 and not full.probe
    cfg, view = full.with_view(ViewOptions(pool="mean"))
    assert (cfg.size, cfg.pool, view.size) == (224, "mean", 224)
    cfg, view = frozen.with_view(ViewOptions(size=None))
    assert view.size is None  # a frozen run embeds at native size unless told
    check_mode(True, ViewOptions(tile=16, channel_strategy="per-channel"))
    with pytest.raises(ProtlocError, match="--tile and --cells go with --freeze"):
        check_mode(False, ViewOptions(cells="masks"))
    with pytest.raises(ProtlocError, match="per-channel goes with --freeze"):
        check_mode(False, ViewOptions(channel_strategy="per-channel"))


def test_plot_shows_a_cell_as_embed_cut_it(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4000, (2, 40, 40), dtype=np.uint16)
    mask = np.zeros((40, 40), np.uint16)
    mask[8:16, 10:20], mask[22:30, 20:32], mask[0:5, 0:5] = 1, 2, 3  # cell 3 touches the border: skipped
    (tmp_path / "masks").mkdir()
    write_image(tmp_path / "a.tif", pixels)
    tifffile.imwrite(tmp_path / "masks" / "a.tif", mask)
    out = tmp_path / "cells.npz"
    result = run(["embed", tmp_path / "a.tif", "--weights", "random", *TINY, "--cells", tmp_path / "masks",
                  "--cell-size", "16", "--mask-outside", "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    emb = read_embeddings(str(out))
    assert [i.rsplit("#", 1)[1] for i in emb.ids] == ["cell=1", "cell=2"]
    for row, cell in enumerate(cut_cells(pixels, mask.astype(np.int64), 16, mask_outside=True)):
        shown, names = read_view(emb, row)
        np.testing.assert_array_equal(shown, cell.pixels.astype(np.float32))
        assert names == ["ch0", "ch1"]
