"""OME-Zarr input (protloc/source_zarr.py): images and HCS plates written with ome-zarr-py itself."""

import json
import shutil
import sys

import numpy as np
import pytest
import tifffile

zarr = pytest.importorskip("zarr")
from ome_zarr.format import FormatV04, FormatV05  # noqa: E402
from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata  # noqa: E402

from protloc.embeddings import read_embeddings  # noqa: E402
from protloc.errors import ProtlocError  # noqa: E402
from protloc.plot_data import read_view  # noqa: E402
from protloc.sources import discover, read_source  # noqa: E402
from test_cli import RANDOM, one_error_line, run  # noqa: E402

FORMATS = [FormatV04(), FormatV05()]
RNG = np.random.default_rng(0)


def omero(*labels):
    return {"channels": [{"label": label, "color": "FFFFFF", "active": True,
                          "window": {"start": 0, "end": 255, "min": 0, "max": 65535}} for label in labels]}


def write_zarr(path, data, axes, fmt, labels=None, levels=2):
    """An OME-Zarr image as ome-zarr-py writes it: `levels` levels, each half the size in y and x."""
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    extra = {"omero": omero(*labels)} if labels else {}
    write_image(data, group, axes=axes, fmt=fmt, scale_factors=[2 ** k for k in range(1, levels)], **extra)
    return str(path)


def write_plate(path, fmt, fields=2, size=16):
    """A 2-well plate (A/1, B/3) of `fields` fields each; returns {field path: pixels}."""
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_plate_metadata(root, ["A", "B"], ["1", "3"], ["A/1", "B/3"], fmt=fmt, name="screen 7")
    written = {}
    for well in ("A/1", "B/3"):
        group = root.require_group(well)
        write_well_metadata(group, [str(f) for f in range(fields)], fmt=fmt)
        for f in range(fields):
            data = RNG.integers(0, 255, (2, size, size), dtype=np.uint8)
            write_image(data, group.require_group(str(f)), axes="cyx", fmt=fmt, scale_factors=[],
                        omero=omero("DAPI", "GFP"))
            written[f"{path}/{well}/{f}"] = data
    return written


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"ngff{f.version}")
def test_image_read_level_by_level_z_projected_channels_named(tmp_path, fmt):
    data = RNG.integers(0, 4000, (2, 5, 32, 40), dtype=np.uint16)  # c, z, y, x
    path = write_zarr(tmp_path / "cells.zarr", data, "czyx", fmt, labels=["DAPI", "mNeonGreen"])
    [source] = discover([path])
    assert source.id == path and source.files == (path,)
    image = read_source(source)
    assert image.channel_names == ["DAPI", "mNeonGreen"] and image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, data.max(axis=1))
    np.testing.assert_allclose(read_source(source, z="mean").pixels, data.mean(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(read_source(source, z="middle").pixels, data[:, 2])
    assert read_source(source, level=1).pixels.shape == (2, 16, 20)
    with pytest.raises(ProtlocError, match=r"cells.zarr: has 2 resolution level\(s\) \(--zarr-level 0 to 1\); "
                                           r"there is no level 2$"):
        read_source(source, level=2)


def test_time_of_one_point_and_yx_only_images(tmp_path):
    fmt = FormatV04()
    data = RNG.integers(0, 255, (1, 3, 24, 24), dtype=np.uint8)
    image = read_source(discover([write_zarr(tmp_path / "t.zarr", data, "tcyx", fmt)])[0])
    np.testing.assert_array_equal(image.pixels, data[0])
    assert image.channel_names is None  # no omero metadata: unnamed, as a TIFF without names
    flat = RNG.random((24, 24), dtype=np.float32)
    np.testing.assert_array_equal(read_source(discover([write_zarr(tmp_path / "yx.zarr", flat, "yx", fmt)])[0])
                                  .pixels, flat[None])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"ngff{f.version}")
def test_plate_every_field_of_every_well_is_an_image(tmp_path, fmt):
    written = write_plate(tmp_path / "plate.zarr", fmt)
    sources = discover([str(tmp_path / "plate.zarr")])
    assert [s.id for s in sources] == list(written)
    assert sources[2].id.endswith("plate.zarr/B/3/0")
    assert sources[2].meta == {"plate": "screen 7", "well": "B3", "row": "B", "column": "3", "field": "0"}
    for s in sources:
        image = read_source(s)
        np.testing.assert_array_equal(image.pixels, written[s.id])
        assert image.channel_names == ["DAPI", "GFP"]


def test_folder_search_finds_zarr_images_beside_tiffs_without_looking_inside(tmp_path):
    fmt = FormatV05()
    for name in ("b.zarr", "sub/a.zarr"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_zarr(tmp_path / name, RNG.integers(0, 255, (2, 16, 16), dtype=np.uint8), "cyx", fmt)
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((2, 16, 16), np.uint8))
    assert [s.id for s in discover([str(tmp_path)])] == [str(tmp_path / n) for n in ("b.zarr", "c.tif", "sub/a.zarr")]
    # a folder not named .zarr but holding NGFF metadata is an image, not a folder to search
    shutil.move(tmp_path / "b.zarr", tmp_path / "acquisition")
    assert [s.id for s in discover([str(tmp_path / "acquisition")])] == [str(tmp_path / "acquisition")]


def attrs_file(path):
    """The file holding a v2 group's attributes."""
    return path / ".zattrs"


def level_path(path, level):
    return json.loads(attrs_file(path).read_text())["multiscales"][0]["datasets"][level]["path"]


def edit_attrs(path, change):
    meta = json.loads(attrs_file(path).read_text())
    change(meta)
    attrs_file(path).write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (lambda p: shutil.rmtree(p / level_path(p, 1)), r"x.zarr/\w+: level 1 of the multiscales metadata is missing"),
    (lambda p: edit_attrs(p, lambda m: m.pop("multiscales")), r"x.zarr: a zarr group without OME-Zarr metadata"),
    (lambda p: edit_attrs(p, lambda m: m["multiscales"][0].update(version="0.3")),
     r"x.zarr: OME-Zarr \(NGFF\) version 0.3; protloc reads 0.4 and 0.5"),
    (lambda p: edit_attrs(p, lambda m: m["omero"]["channels"].pop()),
     r"x.zarr: its omero metadata name 1 channel\(s\), but the image has 2"),
    (lambda p: edit_attrs(p, lambda m: m["multiscales"][0]["axes"].pop(0)),
     r"x.zarr/\w+: the multiscales metadata declare 2 axes for an array of shape \(2, 8, 8\)"),
])
def test_damaged_images_are_one_line_naming_them(tmp_path, damage, message):
    path = tmp_path / "x.zarr"
    write_zarr(path, RNG.integers(0, 255, (2, 16, 16), dtype=np.uint8), "cyx", FormatV04(), labels=["a", "b"])
    damage(path)
    with pytest.raises(ProtlocError, match=message):
        read_source(discover([str(path)])[0], level=1)


def test_what_protloc_does_not_read_is_refused(tmp_path):
    fmt = FormatV04()
    movie = write_zarr(tmp_path / "movie.zarr", np.zeros((3, 2, 16, 16), np.uint8), "tcyx", fmt)
    with pytest.raises(ProtlocError, match=r"movie.zarr/\w+: axis 't' holds 3 points"):
        read_source(discover([movie])[0])
    image = discover([write_zarr(tmp_path / "i.zarr", np.zeros((2, 16, 16), np.uint8), "cyx", fmt)])[0]
    with pytest.raises(ProtlocError, match="i.zarr: an OME-Zarr image declares its axes; --axes applies to TIFFs"):
        read_source(image, axes="CYX")
    with pytest.raises(ProtlocError, match="i.zarr: an OME-Zarr image holds one image; --series applies to TIFFs"):
        read_source(image, series=1)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(ProtlocError, match="plain.zarr: a zarr group without OME-Zarr metadata"):
        discover([str(tmp_path / "plain.zarr")])
    write_plate(tmp_path / "plate.zarr", fmt)
    with pytest.raises(ProtlocError, match=r"plate.zarr/A/1: not an OME-Zarr image or plate: .*an HCS well"):
        discover([str(tmp_path / "plate.zarr" / "A" / "1")])
    shutil.rmtree(tmp_path / "plate.zarr" / "B")
    with pytest.raises(ProtlocError, match="plate.zarr: well 'B/3' listed in its plate metadata is missing"):
        discover([str(tmp_path / "plate.zarr")])


def test_without_zarr_the_error_names_the_extra(tmp_path, monkeypatch):
    path = write_zarr(tmp_path / "i.zarr", np.zeros((2, 16, 16), np.uint8), "cyx", FormatV04())
    monkeypatch.setitem(sys.modules, "zarr", None)  # as if not installed
    with pytest.raises(ProtlocError, match=r"i.zarr: reading OME-Zarr needs zarr: pip install 'protloc\[zarr\]'"):
        discover([path])


def test_embed_a_plate_field_by_field_and_plot_reads_a_field_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = write_plate("plate.zarr", FormatV05())
    result = run(["embed", "plate.zarr", *RANDOM, "-o", "emb.npz"])
    assert result.exit_code == 0, result.output
    emb = read_embeddings("emb.npz")
    assert emb.ids == list(written) and emb.x.shape[0] == 4
    pixels, names = read_view(emb, 3)  # re-read from the row id, as `plot neighbours` does
    np.testing.assert_array_equal(pixels, written["plate.zarr/B/3/1"])
    assert names == ["nucleus", "protein"]
    # a level that is not there: one line, nothing written
    one_error_line(run(["embed", "plate.zarr", *RANDOM, "-o", "bad.npz", "--zarr-level", "1"]),
                   "plate.zarr/A/1/0: has 1 resolution level(s)")
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"ngff{f.version}")
def test_a_damaged_chunk_is_one_line_never_zeros(tmp_path, fmt):
    path = tmp_path / "x.zarr"
    write_zarr(path, RNG.integers(0, 255, (2, 16, 16), dtype=np.uint8), "cyx", fmt, levels=1)
    chunks = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json"]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(ProtlocError, match=r"x.zarr/\w+: not a readable OME-Zarr array"):
        read_source(discover([str(path)])[0])
