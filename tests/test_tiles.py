"""Fields of view as tiles: the tile grid, tile rows from embed, and one mean row per image."""

import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from protloc.cli import main
from protloc.data import ViewOptions, loader
from protloc.ids import image_of
from protloc.sources import discover
from protloc.synth import write_dataset
from protloc.tiles import mean_per_image, tile_origins

RANDOM = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


@given(height=st.integers(1, 70), width=st.integers(1, 70), tile=st.integers(1, 40), stride=st.integers(1, 40))
@settings(max_examples=300, deadline=None)
def test_tiles_cover_the_image_as_documented(height, width, tile, stride):
    origins = tile_origins(height, width, tile, stride)
    if height < tile or width < tile:
        assert origins == []
        return
    ys, xs = sorted({y for y, _ in origins}), sorted({x for _, x in origins})
    assert origins == [(y, x) for y in ys for x in xs]  # row by row, left to right
    for starts, length in ((ys, height), (xs, width)):
        assert starts[0] == 0 and starts[-1] == length - tile  # full-size tiles, the last flush with the border
        grid = list(range(0, length - tile + 1, stride))
        assert starts[:len(grid)] == grid and len(starts) - len(grid) <= 1  # the grid, plus at most the flush one
    if stride <= tile:  # no gaps: every pixel is in some tile
        covered = np.zeros((height, width), bool)
        for y, x in origins:
            covered[y:y + tile, x:x + tile] = True
        assert covered.all()


def test_default_stride_is_the_tile_and_image_ids():
    assert tile_origins(1024, 1024, 256) == [(y, x) for y in (0, 256, 512, 768) for x in (0, 256, 512, 768)]
    assert tile_origins(100, 60, 50, 40) == [(0, 0), (0, 10), (40, 0), (40, 10), (50, 0), (50, 10)]
    assert image_of("d/a.tif#tile=12") == "d/a.tif" and image_of("d/a.tif") == "d/a.tif"


def test_mean_per_image_across_batch_boundaries():
    rng = np.random.default_rng(0)
    ids = [f"a#tile={k}" for k in range(3)] + ["b#tile=0"] + [f"c#tile={k}" for k in range(4)]
    x = rng.normal(size=(len(ids), 5)).astype(np.float32)
    stream = [(ids[:2], x[:2]), (ids[2:5], x[2:5]), (ids[5:], x[5:])]
    out = list(mean_per_image(iter(stream)))
    got_ids = [i for batch, _ in out for i in batch]
    got = np.concatenate([v for _, v in out])
    assert got_ids == ["a", "b", "c"]
    np.testing.assert_allclose(got, np.stack([x[:3].mean(0), x[3], x[4:].mean(0)]), rtol=1e-6)


def test_loader_cuts_tiles_with_the_images_statistics(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 4000, (2, 40, 48)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", pixels)
    sources = discover([str(tmp_path / "a.tif")])
    whole = next(loader(sources, ViewOptions(), workers=0))
    tiles = list(loader(sources, ViewOptions(tile=32, stride=16, size=16), workers=0))
    assert [t.id for t in tiles] == [f"{whole.id}#tile={k}" for k in range(4)]
    assert [t.meta["origin"] for t in tiles] == [[0, 0], [0, 16], [8, 0], [8, 16]]
    assert all(t.pixels.shape == (2, 16, 16) for t in tiles)  # --size resizes each tile
    np.testing.assert_array_equal(tiles[0].scale, whole.scale)
    unresized = list(loader(sources, ViewOptions(tile=32, stride=16), workers=0))
    np.testing.assert_array_equal(unresized[3].pixels, pixels[:, 8:40, 16:48])


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    out = tmp_path_factory.mktemp("fields")
    write_dataset(out, n=4, size=64, seed=5, fields_per_protein=2)
    return out


def test_embed_tile_rows_meta_and_aggregate_mean(fields, tmp_path):
    tiles, mean = tmp_path / "tiles.npz", tmp_path / "mean.npz"
    result = run(["embed", fields, *RANDOM, "--tile", "32", "--stride", "24", "-o", tiles, "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    assert "embedded 4 image(s) as 36 tile(s)" in result.stderr
    with np.load(tiles) as z:
        x, ids, meta, obs = z["embeddings"], list(z["ids"]), json.loads(str(z["meta"])), json.loads(str(z["obs"]))
    images = sorted(str(p) for p in fields.glob("*.tif"))
    assert x.shape == (36, 192)
    assert ids == [f"{im}#tile={k}" for im in images for k in range(9)]
    assert meta["tile"] == 32 and meta["stride"] == 24 and meta["aggregate"] is None
    assert [[y, x] for y, x in zip(obs["origin_y"], obs["origin_x"])] == \
        [[y, x] for _ in images for y in (0, 24, 32) for x in (0, 24, 32)]
    assert obs["view"] == ["tile"] * 36 and obs["view_index"] == list(range(9)) * 4

    result = run(["embed", fields, *RANDOM, "--tile", "32", "--stride", "24", "--aggregate", "mean", "-o", mean])
    assert result.exit_code == 0, result.output
    with np.load(mean) as z:
        assert list(z["ids"]) == images and "origin_y" not in json.loads(str(z["obs"]))
        np.testing.assert_allclose(z["embeddings"], x.reshape(4, 9, 192).mean(1), atol=1e-5)


def test_tile_errors(fields, tmp_path):
    assert run(["embed", fields, *RANDOM, "--stride", "8", "-o", tmp_path / "e.npy"]).exit_code == 2
    assert run(["embed", fields, *RANDOM, "--aggregate", "mean", "-o", tmp_path / "e.npy"]).exit_code == 2
    result = run(["embed", fields, *RANDOM, "--tile", "128", "-o", tmp_path / "e.npy"])
    assert result.exit_code == 1 and "smaller than one 128x128 tile" in result.stderr
    assert "field_00000.tif" in result.stderr and not (tmp_path / "e.npy").exists()


def test_opencell_fields_as_tiles(shared_data, tmp_path):
    """Real 1024 x 1024 OpenCell Hoechst fields: 16 tiles of 256, or 9 of 384 (the last flush)."""
    image = shared_data / "opencell_hoechst" / "FOV_00007_RAW.tif"
    args = ["embed", image, "--weights", "random", "--arch", "vit_tiny", "--patch", "16", "--depth", "1",
            "--workers", "0"]
    assert run([*args, "--tile", "256", "-o", tmp_path / "a.npz"]).exit_code == 0
    with np.load(tmp_path / "a.npz") as z:
        meta, obs = json.loads(str(z["meta"])), json.loads(str(z["obs"]))
        assert z["embeddings"].shape == (16, 192) and z["ids"][5] == f"{image}#tile=5"
    assert (obs["origin_y"][5], obs["origin_x"][5]) == (256, 256) and meta["config"]["channels"] == ["ch0"]
    assert run([*args, "--tile", "384", "--size", "128", "-o", tmp_path / "b.npz"]).exit_code == 0
    with np.load(tmp_path / "b.npz") as z:
        obs = json.loads(str(z["obs"]))
        assert list(zip(obs["origin_y"], obs["origin_x"])) == [(y, x) for y in (0, 384, 640) for x in (0, 384, 640)]
