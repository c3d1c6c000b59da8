"""protloc.tiff: every supported layout, the Z projections, dtypes, compression, and one-line
errors for damaged or unsupported files; plus the real OpenCell files when ../shared/data exists."""

import numpy as np
import pytest
import tifffile

from protloc.errors import ProtlocError
from protloc.tiff import Image, read_channel_files, read_tiff
from protloc import tiff as tiff_module


def rand(shape, dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 200, shape).astype(dtype)


def write(tmp_path, name, data, **kw):
    path = tmp_path / name
    tifffile.imwrite(path, data, **kw)
    return str(path)


# --- layouts -----------------------------------------------------------------------------------

def test_yx(tmp_path):
    data = rand((20, 30))
    img = read_tiff(write(tmp_path, "a.tif", data))
    assert isinstance(img, Image)
    assert img.pixels.shape == (1, 20, 30) and img.pixels.dtype == np.uint16
    np.testing.assert_array_equal(img.pixels[0], data)
    assert img.channel_names is None and img.source.endswith("a.tif")


@pytest.mark.parametrize("n", [2, 3, 5])
def test_cyx_unnamed(tmp_path, n):
    data = rand((n, 20, 30))
    img = read_tiff(write(tmp_path, "a.tif", data))
    np.testing.assert_array_equal(img.pixels, data)


@pytest.mark.parametrize("kw", [{"photometric": "rgb"}, {}, {"metadata": None}])
def test_yxc(tmp_path, kw):
    data = rand((20, 30, 3), np.uint8)
    img = read_tiff(write(tmp_path, "a.tif", data, **kw))
    np.testing.assert_array_equal(img.pixels, data.transpose(2, 0, 1))


def test_rgb_planar(tmp_path):
    data = rand((3, 20, 30), np.uint8)
    img = read_tiff(write(tmp_path, "a.tif", data, photometric="rgb", planarconfig="separate"))
    np.testing.assert_array_equal(img.pixels, data)


def test_yxc_four_samples(tmp_path):
    data = rand((20, 30, 4), np.uint16)
    img = read_tiff(write(tmp_path, "a.tif", data, metadata=None))
    np.testing.assert_array_equal(img.pixels, data.transpose(2, 0, 1))


@pytest.mark.parametrize("kw", [{"metadata": {"axes": "CZYX"}}, {}])
def test_czyx(tmp_path, kw):
    data = rand((2, 5, 24, 24))  # unnamed: dim0 <= 4 < dim1 -> CZYX (both small next to Y, X)
    img = read_tiff(write(tmp_path, "a.tif", data, **kw))
    np.testing.assert_array_equal(img.pixels, data.max(1))


@pytest.mark.parametrize("kw", [{"metadata": {"axes": "ZCYX"}}, {}, {"ome": True, "metadata": {"axes": "ZCYX"}},
                                {"imagej": True, "metadata": {"axes": "ZCYX"}}])
def test_zcyx(tmp_path, kw):
    data = rand((5, 2, 24, 24))
    img = read_tiff(write(tmp_path, "a.tif", data, **kw))
    np.testing.assert_array_equal(img.pixels, data.max(0))


def test_zyx_and_single_channel_hyperstack(tmp_path):
    data = rand((6, 16, 16))
    img = read_tiff(write(tmp_path, "a.tif", data, metadata={"axes": "ZYX"}))
    np.testing.assert_array_equal(img.pixels, data.max(0, keepdims=True))
    data5 = rand((1, 6, 2, 16, 16))  # T = 1 is squeezed
    img = read_tiff(write(tmp_path, "b.tif", data5, imagej=True, metadata={"axes": "TZCYX"}))
    np.testing.assert_array_equal(img.pixels, data5[0].max(0))


def test_explicit_axes_override(tmp_path):
    data = rand((4, 3, 16, 16))  # by shape: ZCYX (4 z, 3 channels)
    path = write(tmp_path, "a.tif", data)
    np.testing.assert_array_equal(read_tiff(path).pixels, data.max(0))
    np.testing.assert_array_equal(read_tiff(path, axes="CZYX").pixels, data.max(1))
    np.testing.assert_array_equal(read_tiff(path, axes="czyx").pixels, data.max(1))
    # the user may also name the size-1 axes that tifffile squeezed away
    data5 = rand((1, 3, 2, 8, 8))
    path5 = write(tmp_path, "b.tif", data5, imagej=True, metadata={"axes": "TZCYX"})
    np.testing.assert_array_equal(read_tiff(path5, axes="TZCYX").pixels, data5[0].max(0))
    np.testing.assert_array_equal(read_tiff(path5, axes="TCZYX").pixels, data5[0].max(1))
    with pytest.raises(ProtlocError, match="a.tif: --axes ZYX does not fit"):
        read_tiff(path, axes="ZYX")
    with pytest.raises(ProtlocError, match="a.tif: --axes ZZYX must name"):
        read_tiff(path, axes="ZZYX")


def test_ome_channel_names(tmp_path):
    data = rand((2, 16, 16))
    path = write(tmp_path, "a.ome.tif", data, ome=True,
                 metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    img = read_tiff(path)
    assert img.channel_names == ["DAPI", "GFP"]  # raw, not canonical
    np.testing.assert_array_equal(img.pixels, data)


def test_ome_without_names(tmp_path):
    img = read_tiff(write(tmp_path, "a.ome.tif", rand((2, 16, 16)), ome=True, metadata={"axes": "CYX"}))
    assert img.channel_names is None


# --- Z projections -----------------------------------------------------------------------------

@pytest.mark.parametrize("nz", [4, 5])
@pytest.mark.parametrize("kw", [{"metadata": {"axes": "ZCYX"}}, {"imagej": True, "metadata": {"axes": "ZCYX"}}])
def test_projections(tmp_path, nz, kw):
    data = rand((nz, 3, 8, 9))
    path = write(tmp_path, "a.tif", data, **kw)
    img = read_tiff(path, z="max")
    assert img.pixels.dtype == np.uint16
    np.testing.assert_array_equal(img.pixels, data.max(0))
    img = read_tiff(path, z="mean")
    assert img.pixels.dtype == np.float32
    np.testing.assert_allclose(img.pixels, data.mean(0), rtol=1e-6)
    img = read_tiff(path, z="middle")
    assert img.pixels.dtype == np.uint16
    np.testing.assert_array_equal(img.pixels, data[nz // 2])


def test_projection_page_by_page_equals_whole_array(tmp_path):
    # multi-page stacks are projected page by page; both paths must agree
    data = rand((5, 2, 8, 8))
    path = write(tmp_path, "a.tif", data, metadata={"axes": "ZCYX"})
    for z, want in [("max", data.max(0)), ("mean", data.mean(0)), ("middle", data[2])]:
        got = tiff_module._project_array(data, ["Z", "C", "Y", "X"], z)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(read_tiff(path, z=z).pixels, want, rtol=1e-6)


def test_projection_of_a_single_page_stack(tmp_path):
    # one page holding all planes (here 3 planar samples, read as Z): the whole-array path
    data = rand((3, 8, 8), np.uint8)
    path = write(tmp_path, "a.tif", data, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_tiff(path, axes="ZYX").pixels, data.max(0, keepdims=True))
    np.testing.assert_array_equal(read_tiff(path, axes="ZYX", z="middle").pixels, data[1:2])


def test_no_z_keeps_dtype_for_mean(tmp_path):
    img = read_tiff(write(tmp_path, "a.tif", rand((2, 8, 8))), z="mean")
    assert img.pixels.dtype == np.uint16


def test_bad_projection_name(tmp_path):
    with pytest.raises(ProtlocError, match="unknown z projection 'median'"):
        read_tiff(write(tmp_path, "a.tif", rand((8, 8))), z="median")


# --- dtypes and compression --------------------------------------------------------------------

@pytest.mark.parametrize("dtype, want", [(np.uint8, np.uint8), (np.uint16, np.uint16), (np.float32, np.float32),
                                         (np.float64, np.float32), (np.int16, np.float32),
                                         (np.uint32, np.float32), (np.float16, np.float32)])
def test_dtypes(tmp_path, dtype, want):
    data = rand((2, 8, 8), dtype)
    img = read_tiff(write(tmp_path, "a.tif", data))
    assert img.pixels.dtype == want
    np.testing.assert_array_equal(img.pixels, data.astype(want))


def test_bool_and_big_endian(tmp_path):
    img = read_tiff(write(tmp_path, "a.tif", rand((8, 8)) > 100))
    assert img.pixels.dtype == np.uint8
    data = rand((8, 8))
    img = read_tiff(write(tmp_path, "b.tif", data, byteorder=">"))
    assert img.pixels.dtype == np.dtype(np.uint16) and img.pixels.dtype.isnative
    np.testing.assert_array_equal(img.pixels[0], data)


def test_nan_kept(tmp_path):
    data = rand((8, 8), np.float32)
    data[1, 2], data[3, 4] = np.nan, np.inf
    img = read_tiff(write(tmp_path, "a.tif", data))
    assert np.isnan(img.pixels[0, 1, 2]) and np.isinf(img.pixels[0, 3, 4])


@pytest.mark.parametrize("compression", ["zlib", "lzw", "zstd"])
def test_compressed(tmp_path, compression):
    data = rand((3, 2, 16, 16))
    path = write(tmp_path, "a.tif", data, compression=compression, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(read_tiff(path).pixels, data.max(0))


# --- errors ------------------------------------------------------------------------------------

def test_time_series_refused(tmp_path):
    path = write(tmp_path, "t.tif", rand((3, 5, 8, 8)), metadata={"axes": "TZYX"})
    with pytest.raises(ProtlocError, match=r"t.tif: has 3 time points; protloc reads one time point per file"):
        read_tiff(path)


def test_max_pixels_checked_before_decoding(tmp_path, monkeypatch):
    path = write(tmp_path, "big.tif", rand((4, 100, 100)), metadata={"axes": "ZYX"})

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixel data decoded before the size check")

    for cls in (tifffile.TiffPage, tifffile.TiffFrame, tifffile.TiffPageSeries):
        monkeypatch.setattr(cls, "asarray", no_decoding)
    with pytest.raises(ProtlocError) as e:
        read_tiff(path, max_pixels=10_000)
    assert str(e.value) == f"{path}: declares 40,000 pixels, more than --max-pixels 10,000"


def test_max_pixels_allows_at_limit(tmp_path):
    assert read_tiff(write(tmp_path, "a.tif", rand((10, 10))), max_pixels=100).pixels.shape == (1, 10, 10)


def one_line_error(path, match):
    with pytest.raises(ProtlocError) as e:
        read_tiff(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and match in message, message


def test_truncated(tmp_path):
    path = write(tmp_path, "cut.tif", rand((4, 64, 64)), compression="zlib", metadata={"axes": "ZYX"})
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    one_line_error(path, "truncated or corrupt")


def test_truncated_header(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, rand((16, 16)))
    path.write_bytes(path.read_bytes()[:6])
    one_line_error(str(path), "not a readable TIFF")


def test_empty_text_missing_directory(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    one_line_error(str(tmp_path / "empty.tif"), "not a readable TIFF")
    (tmp_path / "text.tif").write_text("hello, this is not a TIFF\nsecond line\n")
    one_line_error(str(tmp_path / "text.tif"), "not a readable TIFF")
    one_line_error(str(tmp_path / "missing.tif"), "no such file")
    (tmp_path / "dir.tif").mkdir()
    one_line_error(str(tmp_path / "dir.tif"), "is a directory")


def test_garbage_after_header(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "junk.tif"
    path.write_bytes(b"II*\x00" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    one_line_error(str(path), "not a readable TIFF")


# --- one file per channel ----------------------------------------------------------------------

def test_read_channel_files(tmp_path):
    a, b = rand((8, 9), np.float32, 1), rand((8, 9), np.float32, 2)
    pa, pb = write(tmp_path, "x_gfp.tif", a), write(tmp_path, "x_rfp.tif", b)
    img = read_channel_files("x", [pb, pa])
    assert img.source == "x" and img.channel_names is None
    np.testing.assert_array_equal(img.pixels, np.stack([b, a]))
    # a z-stack per channel is projected first
    pz = write(tmp_path, "z_gfp.tif", rand((5, 8, 9)), metadata={"axes": "ZYX"})
    assert read_channel_files("z", [pz, pa]).pixels.shape == (2, 8, 9)


def test_read_channel_files_errors(tmp_path):
    pa = write(tmp_path, "x_gfp.tif", rand((8, 9)))
    pb = write(tmp_path, "x_rfp.tif", rand((8, 10)))
    with pytest.raises(ProtlocError, match=r"x_rfp.tif: is 8x10 pixels but .*x_gfp.tif is 8x9"):
        read_channel_files("x", [pa, pb])
    pc = write(tmp_path, "y_gfp.tif", rand((2, 8, 9)))
    with pytest.raises(ProtlocError, match=r"y_gfp.tif: has 2 channels"):
        read_channel_files("y", [pc])
    with pytest.raises(ProtlocError, match=r"missing.tif: no such file"):
        read_channel_files("x", [pa, str(tmp_path / "missing.tif")])


# --- MicroManager ------------------------------------------------------------------------------

class FakePage:
    def __init__(self, data, meta):
        self.data, self.shape = data, data.shape
        self.tags = {51123: type("Tag", (), {"value": meta})()}

    def asarray(self):
        return self.data


def test_micromanager_channels_inferred_from_slice_restarts():
    planes = rand((6, 8, 8))
    pages = [FakePage(planes[i], {"SliceIndex": i % 3}) for i in range(6)]
    tif = type("Tif", (), {"pages": pages})()
    out = tiff_module._read_micromanager(tif.pages, "mm.tif", "max", 10**6)
    np.testing.assert_array_equal(out, np.stack([planes[:3].max(0), planes[3:].max(0)]))
    out = tiff_module._read_micromanager(tif.pages, "mm.tif", "middle", 10**6)
    np.testing.assert_array_equal(out, planes[[1, 4]])


def test_micromanager_channel_index_and_frames():
    planes = rand((4, 8, 8))
    metas = [{"SliceIndex": 0, "ChannelIndex": 1}, {"SliceIndex": 0, "ChannelIndex": 0},
             {"SliceIndex": 1, "ChannelIndex": 1}, {"SliceIndex": 1, "ChannelIndex": 0}]
    tif = type("Tif", (), {"pages": [FakePage(p, m) for p, m in zip(planes, metas)]})()
    out = tiff_module._read_micromanager(tif.pages, "mm.tif", "mean", 10**6)
    np.testing.assert_allclose(out, np.stack([planes[[0, 2]].mean(0), planes[[1, 3]].mean(0)]))
    for m, f in zip(metas, [0, 0, 1, 1]):
        m["FrameIndex"] = f
    with pytest.raises(ProtlocError, match="mm.tif: has 2 time points"):
        tiff_module._read_micromanager(tif.pages, "mm.tif", "max", 10**6)


def test_opencell_micromanager(shared_data, caplog):
    path = shared_data / "opencell_atl2" / "A1_1_ATL2__mock.ome.tif"
    with caplog.at_level("WARNING"):
        img = read_tiff(path)
    assert not [r for r in caplog.records if r.name == "tifffile"]  # broken summary: silenced
    assert img.pixels.shape == (2, 103, 103) and img.pixels.dtype == np.uint16
    pages = tifffile.imread(path, key=range(102))
    np.testing.assert_array_equal(img.pixels[0], pages[:51].max(0))
    np.testing.assert_array_equal(img.pixels[1], pages[51:].max(0))
    assert img.pixels[0].mean() > img.pixels[1].mean()  # Hoechst first: bright nuclei
    np.testing.assert_array_equal(read_tiff(path, z="middle").pixels, pages[[25, 76]])
    np.testing.assert_allclose(read_tiff(path, z="mean").pixels,
                               np.stack([pages[:51].mean(0), pages[51:].mean(0)]), rtol=1e-6)


def test_opencell_hoechst(shared_data):
    paths = sorted((shared_data / "opencell_hoechst").glob("*.tif"))
    assert len(paths) == 7
    img = read_tiff(paths[0])
    assert img.pixels.shape == (1, 1024, 1024) and img.pixels.dtype == np.uint16


def test_unsupported_pixel_type(tmp_path):
    path = write(tmp_path, "c.tif", np.ones((4, 4), np.complex64))
    with pytest.raises(ProtlocError, match=r"c.tif: unsupported pixel type complex64"):
        read_tiff(path)
