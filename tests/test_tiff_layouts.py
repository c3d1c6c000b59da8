"""Every TIFF read as the file means it, or refused with one line naming the file (issue 13, items 1-2).

Series (pages saved one by one, several real series, pyramids), axes without metadata (the shape
rule), what metadata declare against what the file holds (OME, ImageJ, tifffile's shaped JSON,
Micro-Manager), multi-file OME-TIFF (companions, missing files, discovery), and tifffile's own
messages turned into errors or warnings. Every input is written here, into tmp_path."""

import json
import logging
import os
import warnings

import numpy as np
import pytest
import tifffile

from protloc import axes, micromanager
from protloc.cells import read_mask
from protloc.data import ViewOptions, load_item, loader, usable
from protloc.errors import ProtlocError
from protloc.sources import discover, read_source
from protloc.tiff import read_tiff
from protloc.tiff_messages import TiffMessages


def rand(shape, dtype=np.uint16, seed=0):
    return np.random.default_rng(seed).integers(1, 1000, shape).astype(dtype)


def refused(path, *needles, **kw):
    """read_tiff raises one line that starts with the file and holds every needle."""
    with pytest.raises(ProtlocError) as e:
        read_tiff(path, **kw)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for needle in needles:
        assert needle in message, message
    return message


def cut(path, keep):
    """Truncate a file to `keep` bytes (an interrupted copy)."""
    os.truncate(path, keep)
    return str(path)


# --- series ------------------------------------------------------------------------------------

def write_appended(path, planes, **kw):
    """One page per call, as tifffile's append mode and scikit-image save stacks: one series per page."""
    for plane in planes:
        tifffile.imwrite(path, plane, append=True, **kw)
    return str(path)


@pytest.mark.parametrize("kw", [{}, {"metadata": None}])
def test_pages_saved_one_by_one_are_one_stack(tmp_path, kw):
    planes = rand((3, 32, 32))
    path = write_appended(tmp_path / "a.tif", planes, **kw)
    img = read_tiff(path)
    np.testing.assert_array_equal(img.pixels, planes)
    assert img.warnings == []


def test_several_series_default_first_with_warning_and_series_option(tmp_path):
    a, b = rand((2, 32, 32)), rand((3, 16, 16), seed=1)
    path = str(tmp_path / "two.tif")
    with tifffile.TiffWriter(path) as w:
        w.write(a, metadata={"axes": "CYX"})
        w.write(b, metadata={"axes": "CYX"}, photometric="minisblack")
    img = read_tiff(path)
    np.testing.assert_array_equal(img.pixels, a)
    assert img.warnings == [f"{path}: holds 2 image series; read series 0 (shape (2, 32, 32)); "
                            "choose another with --series K (0 to 1)"]
    second = read_tiff(path, series=1)
    np.testing.assert_array_equal(second.pixels, b)
    assert second.warnings == []
    refused(path, "has 2 image series", "there is no series 2", series=2)


def test_ome_multi_image_file(tmp_path):
    a, b = rand((2, 32, 32)), rand((2, 32, 32), seed=1)
    path = str(tmp_path / "two.ome.tif")
    with tifffile.TiffWriter(path, ome=True) as w:
        w.write(a, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}})
        w.write(b, metadata={"axes": "CYX", "Channel": {"Name": ["Hoechst", "mNG"]}})
    img = read_tiff(path)
    np.testing.assert_array_equal(img.pixels, a)
    assert img.channel_names == ["DAPI", "GFP"] and "holds 2 image series" in img.warnings[0]
    second = read_tiff(path, series=1)
    np.testing.assert_array_equal(second.pixels, b)
    assert second.channel_names == ["Hoechst", "mNG"]  # the names of the image read


def test_reduced_resolution_series_is_skipped(tmp_path):
    full = rand((2, 32, 32))
    path = str(tmp_path / "thumb_first.tif")
    with tifffile.TiffWriter(path) as w:
        w.write(full[:, ::2, ::2], subfiletype=1, metadata=None)  # a reduced-resolution image first
        w.write(full, metadata=None)
    img = read_tiff(path)
    np.testing.assert_array_equal(img.pixels, full)
    assert "read series 1" in img.warnings[0]
    # a pyramid in SubIFDs: level 0
    path = str(tmp_path / "pyramid.tif")
    with tifffile.TiffWriter(path) as w:
        w.write(full[0], subifds=1, metadata=None)
        w.write(full[0, ::2, ::2], subfiletype=1, metadata=None)
    np.testing.assert_array_equal(read_tiff(path).pixels, full[:1])


def test_series_option_travels_through_view_options(tmp_path):
    a, b = rand((2, 32, 32)), rand((1, 24, 24), seed=1)
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as w:
        w.write(a, metadata={"axes": "CYX"})
        w.write(b, metadata={"axes": "CYX"}, photometric="minisblack")
    src = discover([str(path)])[0]
    item = load_item(0, src, ViewOptions(series=1, normalize="none"))
    np.testing.assert_array_equal(item.pixels, b)
    assert item.warnings == ()
    item = load_item(0, src, ViewOptions(normalize="none"))
    assert len(item.warnings) == 1 and "holds 2 image series" in item.warnings[0]
    np.testing.assert_array_equal(read_source(src, series=1).pixels, b)


# --- axes without metadata: the shape rule -----------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"metadata": None}])
def test_channels_last_with_many_channels(tmp_path, kw):
    data = rand((32, 40, 5))  # tifffile: 32 pages of 40 x 5 ('QYX' / 'IYX'), a guess
    path = str(tmp_path / "yxc5.tif")
    tifffile.imwrite(path, data, **kw)
    np.testing.assert_array_equal(read_tiff(path).pixels, data.transpose(2, 0, 1))
    np.testing.assert_array_equal(read_tiff(path, axes="YXC").pixels, data.transpose(2, 0, 1))


@pytest.mark.parametrize("shape, order", [
    ((30, 128, 128), "CYX"),  # 30 pages of 128 x 128: channels (as before)
    ((2, 64, 64), "CYX"),
    ((64, 64, 7), "YXC"),     # channels last, more than 4 of them
    ((3, 64, 64, 5), "ZYXC"),  # one before and one after Y, X
    ((3, 6, 64, 64), "CZYX"),  # dim0 <= 4 < dim1
    ((6, 3, 64, 64), "ZCYX"),
    ((40, 5), "YX"),          # 2-D: whatever the sizes
])
def test_shape_rule_reads(tmp_path, shape, order):
    data = rand(shape)
    path = str(tmp_path / "a.tif")
    tifffile.imwrite(path, data)  # shaped JSON without "axes"
    letters = "".join(a for a in "ZCYX" if a in order)
    expected = np.transpose(data, [order.index(a) for a in letters])  # -> (Z,) (C,) Y, X
    expected = expected.max(0) if "Z" in letters else expected
    expected = expected if "C" in letters else expected[None]
    np.testing.assert_array_equal(read_tiff(path).pixels, expected)


@pytest.mark.parametrize("shape", [(20, 30, 40), (8, 8, 8), (3, 4, 64, 64, 5), (2, 64, 64, 3, 3)])
def test_ambiguous_shape_asks_for_axes(tmp_path, shape):
    path = str(tmp_path / "a.tif")
    tifffile.imwrite(path, rand(shape))
    refused(path, f"shape {shape}", "--axes")


def test_axes_override_and_trusted_metadata(tmp_path):
    data = rand((20, 30, 40))
    path = str(tmp_path / "a.tif")
    tifffile.imwrite(path, data)
    np.testing.assert_array_equal(read_tiff(path, axes="ZYX").pixels, data.max(0, keepdims=True))
    # named axes are trusted even where the shape rule would refuse
    named = str(tmp_path / "named.tif")
    tifffile.imwrite(named, data, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_tiff(named).pixels, data)
    rgb = rand((8, 8, 3), np.uint8)  # samples are channels, however small the image
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_tiff(tmp_path / "rgb.tif").pixels, rgb.transpose(2, 0, 1))


def test_shape_rule_and_positions_in_axes_module():
    assert axes.shape_rule("f", (32, 40, 5)) == ["Y", "X", "C"]
    assert axes.shape_rule("f", (5, 1, 32, 40)) == ["C", "1", "Y", "X"]
    assert axes.shape_rule("f", (3, 32, 40, 3), samples=[3]) == ["Z", "Y", "X", "C"]
    with pytest.raises(ProtlocError, match=r"^f: cannot tell the axes of shape \(9, 32, 32\)"):
        axes.shape_rule("f", (9, 32, 32))
    with pytest.raises(ProtlocError, match="^f: holds 2 stage positions .axis R of its metadata.; "
                                           "protloc reads one position per file"):
        axes.layout("f", (2, 3, 32, 32), "RZYX")
    assert axes.layout("f", (1, 3, 32, 32), "RZYX") == ["1", "Z", "Y", "X"]


# --- declared vs held --------------------------------------------------------------------------

def imagej_description(**fields):
    return "ImageJ=1.11a\n" + "".join(f"{k}={v}\n" for k, v in fields.items())


def write_described(path, data, description):
    with tifffile.TiffWriter(path) as w:
        w.write(data, description=description, metadata=None, photometric="minisblack")
    return str(path)


def test_truncated_imagej_hyperstack(tmp_path):
    data = rand((4, 2, 32, 32))  # Z C Y X
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    cut(path, os.path.getsize(path) // 2)
    refused(str(path), "truncated or corrupt", "ImageJ", "declares 8 planes", "holds 1")


def test_imagej_declared_against_held(tmp_path):
    planes = rand((4, 32, 32))
    more = write_described(tmp_path / "more.tif", planes, imagej_description(images=8, channels=2, slices=4,
                                                                            hyperstack="true"))
    refused(more, "truncated or corrupt", "2 channels x 4 slices", "declares 8 planes but the file holds 4")
    fewer = write_described(tmp_path / "fewer.tif", planes, imagej_description(images=2, channels=2,
                                                                              hyperstack="true"))
    refused(fewer, "metadata and data disagree", "declares 2 planes but the file holds 4")
    odd = write_described(tmp_path / "odd.tif", planes, imagej_description(images=4, channels=3, slices=2,
                                                                          hyperstack="true"))
    refused(odd, "corrupt ImageJ metadata: images=4 but 3 channels x 2 slices")
    ok = write_described(tmp_path / "ok.tif", planes, imagej_description(images=4, channels=2, slices=2,
                                                                        hyperstack="true"))
    np.testing.assert_array_equal(read_tiff(ok).pixels, planes.reshape(2, 2, 32, 32).max(0))


def test_ome_declared_against_held(tmp_path):
    data = rand((2, 2, 32, 32))  # Z C Y X
    tifffile.imwrite(tmp_path / "ok.ome.tif", data, ome=True, metadata={"axes": "ZCYX"})
    xml = tifffile.TiffFile(tmp_path / "ok.ome.tif").pages.first.description
    planes = data.reshape(4, 32, 32)
    more = write_described(tmp_path / "more.ome.tif", planes, xml.replace('SizeZ="2"', 'SizeZ="4"'))
    refused(more, "truncated or corrupt", "OME-XML (SizeZ x SizeC x SizeT = 4 x 2 x 1)",
            "declares 8 planes but the file holds 4")
    fewer = write_described(tmp_path / "fewer.ome.tif", planes,
                            xml.replace('SizeZ="2"', 'SizeZ="1"').replace('PlaneCount="4"', 'PlaneCount="2"'))
    refused(fewer, "metadata and data disagree", "declares 2 planes but the file holds 4")
    path = tmp_path / "ok.ome.tif"
    refused(cut(path, os.path.getsize(path) - 100), "truncated or corrupt")


def test_shaped_declared_against_held(tmp_path):
    planes = rand((3, 32, 32))
    path = str(tmp_path / "short.tif")
    with tifffile.TiffWriter(path) as w:
        for i, plane in enumerate(planes):  # the JSON on the first page says 4 planes; 3 follow
            w.write(plane, description='{"shape": [2, 2, 32, 32], "axes": "ZCYX"}' if i == 0 else None,
                    metadata=None)
    refused(path, "truncated or corrupt", "shape (2, 2, 32, 32)", "declares 4 pages but the file holds 3")
    data = rand((4, 2, 32, 32))
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, data, metadata={"axes": "ZCYX"})
    refused(cut(path, os.path.getsize(path) * 3 // 4), "truncated or corrupt")


def test_missing_planes_are_never_zero_filled(tmp_path):
    """Whatever the format, a plane the metadata call for and the file lacks is an error, not zeros."""
    data = rand((2, 3, 32, 32))
    for name, kw in [("a.ome.tif", {"ome": True}), ("b.tif", {"imagej": True}), ("c.tif", {})]:
        path = tmp_path / name
        tifffile.imwrite(path, data, metadata={"axes": "ZCYX"}, **kw)
        with tifffile.TiffFile(path) as tif:
            last = tif.pages[-1]
            keep = last.dataoffsets[0] + 10  # the last plane's data cut short
        with pytest.raises(ProtlocError) as e:
            read_tiff(cut(path, keep))
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


# --- multi-file OME-TIFF -----------------------------------------------------------------------

def write_multifile_ome(folder, data, binary_only=True, names=("DAPI", "GFP")):
    """data (Z, C, Y, X): channel c in folder/field_C{c}.ome.tif; the master (C0) holds the OME-XML,
    the companions `BinaryOnly` (or, binary_only=False, the full XML again, as some writers do)."""
    folder.mkdir(parents=True, exist_ok=True)
    nz, nc, ny, nx = data.shape
    uuid = [f"urn:uuid:00000000-0000-0000-0000-00000000000{c + 1}" for c in range(nc)]
    channels = "".join(f'<Channel ID="Channel:0:{c}" Name="{names[c]}" SamplesPerPixel="1"/>' for c in range(nc))
    tiffdata = "".join(f'<TiffData FirstC="{c}" FirstZ="0" FirstT="0" IFD="0" PlaneCount="{nz}">'
                       f'<UUID FileName="field_C{c}.ome.tif">{uuid[c]}</UUID></TiffData>' for c in range(nc))
    ns = 'xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"'
    pixels = (f'<Image ID="Image:0" Name="field"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint16" '
              f'SizeX="{nx}" SizeY="{ny}" SizeC="{nc}" SizeZ="{nz}" SizeT="1">{channels}{tiffdata}</Pixels></Image>')
    paths = []
    for c in range(nc):
        if c == 0 or not binary_only:
            xml = f'<?xml version="1.0" encoding="UTF-8"?><OME {ns} UUID="{uuid[c]}">{pixels}</OME>'
        else:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><OME {ns} UUID="{uuid[c]}">'
                   f'<BinaryOnly MetadataFile="field_C0.ome.tif" UUID="{uuid[0]}"/></OME>')
        paths.append(write_described(folder / f"field_C{c}.ome.tif", data[:, c], xml))
    return paths


@pytest.mark.parametrize("nz", [1, 3])
def test_multifile_ome_is_one_image(tmp_path, nz):
    data = rand((nz, 2, 32, 32))
    master, companion = write_multifile_ome(tmp_path / "mf", data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tifffile's "reading array from closed file" would raise here
        img = read_tiff(master)
    np.testing.assert_array_equal(img.pixels, data.max(0))
    assert img.channel_names == ["DAPI", "GFP"] and img.warnings == []
    assert [s.id for s in discover([str(tmp_path / "mf")])] == [master]  # the companion is not an image
    refused(companion, "is a companion of the multi-file OME-TIFF", master, "give that file instead")


def test_multifile_ome_missing_companion(tmp_path):
    master, companion = write_multifile_ome(tmp_path / "mf", rand((1, 2, 32, 32)))
    os.remove(companion)
    refused(master, f"puts planes in {companion}, which is missing")


def test_multifile_ome_full_xml_in_every_file(tmp_path):
    data = rand((2, 2, 32, 32))
    master, other = write_multifile_ome(tmp_path / "mf", data, binary_only=False)
    assert [s.id for s in discover([str(tmp_path / "mf")])] == [master]
    assert [s.id for s in discover([other, master])] == [other]  # whichever comes first reads both
    for path in (master, other):
        np.testing.assert_array_equal(read_tiff(path).pixels, data.max(0))


def test_discovery_keeps_a_companion_given_without_its_master(tmp_path):
    master, companion = write_multifile_ome(tmp_path / "mf", rand((1, 2, 32, 32)))
    plain = str(tmp_path / "plain.ome.tif")
    tifffile.imwrite(plain, rand((2, 32, 32)), ome=True, metadata={"axes": "CYX"})
    assert [s.id for s in discover([companion, plain])] == [companion, plain]
    assert [s.id for s in discover([companion, master])] == [master]
    item = load_item(0, discover([companion])[0], ViewOptions())
    assert master in item.error


# --- Micro-Manager -----------------------------------------------------------------------------

def write_mm(path, planes, metas):
    """Micro-Manager-like pages: each with its JSON metadata in tag 51123 (no file header)."""
    with tifffile.TiffWriter(path) as w:
        for plane, meta in zip(planes, metas):
            w.write(plane, extratags=[(micromanager.MM_TAG, "s", 0, json.dumps(meta), True)], metadata=None)
    return str(path)


def mm_metas(channels, slices, positions=1, frames=1):
    return [{"ChannelIndex": c, "SliceIndex": s, "FrameIndex": t, "PositionIndex": p}
            for p in range(positions) for t in range(frames) for c in range(channels) for s in range(slices)]


def test_micromanager_one_position(tmp_path):
    planes = rand((6, 32, 32))
    path = write_mm(tmp_path / "mm.tif", planes, mm_metas(2, 3))
    img = read_tiff(path)
    np.testing.assert_array_equal(img.pixels, np.stack([planes[:3].max(0), planes[3:].max(0)]))
    assert img.warnings == []  # tifffile's probe for a Micro-Manager header the file lacks is not a warning
    refused(path, "there is no series 1", series=1)


def test_micromanager_positions_refused(tmp_path):
    path = write_mm(tmp_path / "mm.tif", rand((12, 32, 32)), mm_metas(2, 3, positions=2))
    message = refused(path)
    assert message == (f"{path}: holds 2 stage positions (Micro-Manager PositionIndex); "
                       "protloc reads one position per file")


def test_micromanager_pages_that_do_not_add_up(tmp_path):
    metas = mm_metas(2, 3)
    metas[4]["SliceIndex"] = 0  # channel 1, slice 0 twice
    refused(write_mm(tmp_path / "dup.tif", rand((6, 32, 32)), metas), "2 pages are channel 1, slice 0")
    uneven = mm_metas(2, 3)[:5]  # channel 1 lost its last slice
    refused(write_mm(tmp_path / "uneven.tif", rand((5, 32, 32)), uneven),
            "truncated or corrupt", "different numbers of z-slices (channel 0: 3, channel 1: 2)")
    refused(write_mm(tmp_path / "t.tif", rand((12, 32, 32)), mm_metas(2, 3, frames=2)), "has 2 time points")


class Page:
    def __init__(self, meta):
        self.shape = (4, 4)
        self.tags = {micromanager.MM_TAG: type("Tag", (), {"value": meta})()}


def test_micromanager_summary_against_pages():
    pages = [Page(m) for m in mm_metas(2, 3)]
    summary = {"Channels": 2, "Slices": 3, "Frames": 1, "Positions": 4}  # one file per position: fine
    assert micromanager.page_planes(pages, "mm.tif", summary) == [(c, s) for c in range(2) for s in range(3)]
    with pytest.raises(ProtlocError, match=r"^mm.tif: truncated or corrupt: its Micro-Manager summary \(2 channels "
                                           r"x 5 slices x 1 frames\) declares 10 planes but the file holds 6$"):
        micromanager.page_planes(pages, "mm.tif", {**summary, "Slices": 5})


def test_micromanager_header_check(tmp_path):
    path = write_mm(tmp_path / "mm.tif", rand((2, 8, 8)), mm_metas(1, 2))
    with tifffile.TiffFile(path) as tif:
        assert not micromanager.has_header(tif) and micromanager.summary(tif) is None


# --- tifffile's messages -----------------------------------------------------------------------

def test_tifffile_warning_becomes_one_file_warning(tmp_path):
    data = rand((2, 32, 32))
    path = write_described(tmp_path / "order.tif", data, imagej_description(images=2, channels=2, order="xyz",
                                                                           hyperstack="true"))
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # whatever a caller set, warnings are seen
    try:
        img = read_tiff(path)
    finally:
        logging.getLogger("tifffile").setLevel(logging.NOTSET)
    np.testing.assert_array_equal(img.pixels, data)
    assert img.warnings == [f"{path}: ImageJ series of unknown order 'xyz' (tifffile)"]
    assert logging.getLogger("tifffile").propagate and not logging.getLogger("tifffile").handlers


def test_messages_classified(tmp_path):
    messages = TiffMessages("f.tif")
    logger = logging.getLogger("tifffile")
    with messages.capture():
        logger.warning("<tifffile.TiffFile 'f.tif'> something odd")
        logger.warning("<tifffile.TiffFile 'f.tif'> something odd")  # a repeat counts once
        warnings.warn("reading array from closed file", UserWarning)
        warnings.warn("old API", DeprecationWarning)  # not about the file
    assert messages.warnings == ["f.tif: something odd (tifffile)", "f.tif: UserWarning: reading array from "
                                 "closed file (tifffile)"]
    messages.raise_errors()  # nothing to raise
    for text, level in [("OME series is missing 4 frames. Missing data are zeroed", logging.WARNING),
                        ("invalid page offset 16736", logging.ERROR)]:
        messages = TiffMessages("f.tif")
        with messages.capture():
            logger.log(level, f"<tifffile.TiffPages @8> {text}")
        with pytest.raises(ProtlocError, match=rf"^f.tif: truncated or corrupt TIFF \(tifffile: {text[:20]}"):
            messages.raise_errors()


def test_python_warning_while_reading_is_captured(tmp_path, monkeypatch):
    path = str(tmp_path / "a.tif")
    tifffile.imwrite(path, rand((32, 32)))
    original = tifffile.TiffPageSeries.asarray

    def warn_then_read(self, *args, **kwargs):
        warnings.warn("something about this page", UserWarning)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", warn_then_read)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing escapes the reader
        img = read_tiff(path)
    assert img.warnings == [f"{path}: UserWarning: something about this page (tifffile)"]


def test_damaged_mask_is_an_error_not_raw_stderr(tmp_path, capfd):
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, np.ones((2, 32, 32), np.uint16), metadata=None)  # its second IFD will be cut off
    with tifffile.TiffFile(path) as tif:
        keep = tif.pages[1].offset
    with pytest.raises(ProtlocError, match=rf"^{path}: truncated or corrupt TIFF \(tifffile: invalid page offset"):
        read_mask(cut(path, keep), (32, 32), "image.tif", 10**6)
    assert capfd.readouterr().err == ""


def test_warnings_logged_once_per_image_by_the_consumer(tmp_path, caplog):
    path = tmp_path / "order.tif"
    write_described(path, rand((2, 64, 64)), imagej_description(images=2, channels=2, order="xyz", hyperstack="true"))
    views = list(loader(discover([str(path)]), ViewOptions(tile=32), workers=0))
    assert len(views) == 4 and [len(v.warnings) for v in views] == [1, 0, 0, 0]  # on the first view only
    with caplog.at_level(logging.WARNING, logger="protloc"):
        assert all(usable(v, "fail") for v in views)
    assert [r.getMessage() for r in caplog.records] == [f"{path}: ImageJ series of unknown order 'xyz' (tifffile)"]


# --- real files (../shared/data) ---------------------------------------------------------------

def test_real_files_read_without_warnings(shared_data):
    for folder, suffixes, want in [("hpa_dictionary", None, ((3, 820, 820), np.uint8)),
                                   ("opencell_atl2", None, ((2, 103, 103), np.uint16)),
                                   ("opencell_hoechst", None, ((1, 1024, 1024), np.uint16)),
                                   ("yeast_crops", ["gfp", "rfp"], ((2, 64, 64), np.float32)),
                                   ("hpa_cells", ["blue", "green", "red"], ((3, 128, 128), np.float32))]:
        sources = discover([str(shared_data / folder)], channel_suffixes=suffixes)
        for src in sources[:3]:
            img = read_source(src)
            assert (img.pixels.shape, img.pixels.dtype) == want and img.warnings == [], (src.id, img.warnings)
    names = read_source(discover([str(shared_data / "hpa_dictionary")])[0]).channel_names
    assert names == ["microtubules", "protein", "nucleus"]
