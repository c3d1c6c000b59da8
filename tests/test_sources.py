"""protloc.sources: DATA arguments -> sources (files, directories, stdin, channel-suffix groups)."""

import io
import os

import numpy as np
import pytest
import tifffile

from protloc.errors import ProtlocError
from protloc.sources import Source, discover, read_source


def touch(root, *names, data=None):
    """Write small valid TIFFs at root/name; returns their paths as strings."""
    out = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, np.zeros((4, 5), np.uint16) if data is None else data)
        out.append(str(path))
    return out


def ids(sources):
    return [s.id for s in sources]


def test_directory_recursive_sorted_hidden_skipped(tmp_path):
    touch(tmp_path, "b/2.tif", "b/1.TIF", "a.tiff", "a/z.ome.tif", "a-b/y.tif",
          ".hidden/x.tif", "b/.x.tif", "c/.d/e.tif")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "img.png").write_bytes(b"")
    got = discover([str(tmp_path)])
    rel = [os.path.relpath(s.id, tmp_path) for s in got]
    assert rel == ["a/z.ome.tif", "a-b/y.tif", "a.tiff", "b/1.TIF", "b/2.tif"]
    assert all(s.files == (s.id,) and s.channel_names is None for s in got)


def test_files_in_order_normalized_and_deduplicated(tmp_path):
    a, b = touch(tmp_path, "d/a.tif", "d/b.tif")
    other = tmp_path / "other.png"  # a named file is taken as a TIFF whatever its extension
    other.write_bytes(b"")
    got = discover([b, str(other), str(tmp_path / "d" / ".." / "d" / "a.tif"), str(tmp_path / "d"), b])
    assert ids(got) == [b, str(other), a]
    assert isinstance(got[0], Source)


def test_stdin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    touch(tmp_path, "x/1.tif", "x/2.tif", "y.tif")
    stdin = io.StringIO("\ny.tif\n  \nx\n./y.tif\n")
    assert ids(discover(["x/2.tif", "-"], stdin=stdin)) == ["x/2.tif", "y.tif", "x/1.tif"]


def test_errors(tmp_path):
    with pytest.raises(ProtlocError, match="no input images"):
        discover([])
    with pytest.raises(ProtlocError, match="no input images"):
        discover(["-"], stdin=io.StringIO("\n\n"))
    missing = str(tmp_path / "nope.tif")
    with pytest.raises(ProtlocError, match=f"^{missing}: no such file or directory$"):
        discover([missing])
    (tmp_path / "empty").mkdir()
    touch(tmp_path, "empty/.hidden.tif")
    with pytest.raises(ProtlocError) as e:
        discover([str(tmp_path / "empty") + "/"])
    assert str(e.value) == f"{tmp_path}/empty/: no .tif/.tiff files or .zarr images under this directory"
    with pytest.raises(ProtlocError, match="nope.tif: no such file"):
        discover(["-"], stdin=io.StringIO(missing + "\n"))


def test_channel_suffix_groups(tmp_path):
    d = tmp_path / "d"
    touch(tmp_path, "d/B_rfp.tif", "d/A_rfp.tiff", "d/A_GFP.TIF", "d/B_gfp.ome.tif", "d/x_rfp_1_gfp.tif",
          "d/x_rfp_1_rfp.tif")
    got = discover([str(d / "B_rfp.tif"), str(d)], channel_suffixes=["gfp", "rfp"])
    assert ids(got) == [str(d / "B"), str(d / "A"), str(d / "x_rfp_1")]
    assert got[0].files == (str(d / "B_gfp.ome.tif"), str(d / "B_rfp.tif"))
    assert got[1].files == (str(d / "A_GFP.TIF"), str(d / "A_rfp.tiff"))
    assert all(s.channel_names == ("protein", "cytosol") for s in got)
    hpa = discover([str(d)], channel_suffixes=["_rfp", "gfp"])  # a leading '_' is allowed
    assert hpa[0].files == (str(d / "A_rfp.tiff"), str(d / "A_GFP.TIF"))
    assert hpa[0].channel_names == ("cytosol", "protein")


def test_channel_suffix_errors(tmp_path):
    touch(tmp_path, "g/A_gfp.tif", "g/A_rfp.tif", "g/B_gfp.tif")
    with pytest.raises(ProtlocError) as e:
        discover([str(tmp_path / "g")], channel_suffixes=["gfp", "rfp"])
    assert str(e.value) == f"{tmp_path}/g/B: missing the _rfp file (--channel-suffixes gfp,rfp)"
    touch(tmp_path, "h/A_gfp.tif", "h/A_dapi.tif")
    with pytest.raises(ProtlocError, match=r"h/A_dapi.tif: file name does not end in _gfp or _rfp"):
        discover([str(tmp_path / "h")], channel_suffixes=["gfp", "rfp"])
    touch(tmp_path, "i/A_gfp.tif", "i/A_gfp.tiff", "i/A_rfp.tif")
    with pytest.raises(ProtlocError, match=r"i/A: two _gfp files"):
        discover([str(tmp_path / "i")], channel_suffixes=["gfp", "rfp"])
    touch(tmp_path, "j/_gfp.tif")
    with pytest.raises(ProtlocError, match=r"j/_gfp.tif: file name does not end in _gfp"):
        discover([str(tmp_path / "j")], channel_suffixes=["gfp"])
    with pytest.raises(ProtlocError, match="a suffix repeats"):
        discover([str(tmp_path / "g")], channel_suffixes=["gfp", "GFP"])
    with pytest.raises(ProtlocError, match="name the same channel twice"):
        discover([str(tmp_path / "g")], channel_suffixes=["gfp", "green"])


def test_read_source(tmp_path):
    a = np.arange(20, dtype=np.float32).reshape(4, 5)
    touch(tmp_path, "X_blue.tif", data=a)
    touch(tmp_path, "X_green.tif", data=a + 1)
    single = discover([str(tmp_path / "X_blue.tif")])[0]
    img = read_source(single)
    assert img.channel_names is None and img.source == single.id
    np.testing.assert_array_equal(img.pixels, a[None])
    group = discover([str(tmp_path)], channel_suffixes=["green", "blue"])[0]
    img = read_source(group)
    assert img.channel_names == ["protein", "nucleus"] and img.source == str(tmp_path / "X")
    np.testing.assert_array_equal(img.pixels, np.stack([a + 1, a]))


def test_yeast_crops(shared_data):
    sources = discover([str(shared_data / "yeast_crops")], channel_suffixes=["gfp", "rfp"])
    assert len(sources) == 1131
    shapes = set()
    for src in sources:
        img = read_source(src)
        shapes.add((img.pixels.shape, img.pixels.dtype.name, tuple(img.channel_names)))
    assert shapes == {((2, 64, 64), "float32", ("protein", "cytosol"))}


def test_hpa_cells(shared_data):
    sources = discover([str(shared_data / "hpa_cells")], channel_suffixes=["blue", "green", "red"])
    assert len(sources) == 62
    for src in sources:
        img = read_source(src)
        assert img.pixels.shape == (3, 128, 128) and img.pixels.dtype == np.float32
        assert img.channel_names == ["nucleus", "protein", "microtubules"]


def test_opencell_directories(shared_data):
    sources = discover([str(shared_data / "opencell_hoechst"), str(shared_data / "opencell_atl2")])
    assert len(sources) == 8 and sources[-1].id.endswith("A1_1_ATL2__mock.ome.tif")
    assert read_source(sources[-1]).pixels.shape == (2, 103, 103)
