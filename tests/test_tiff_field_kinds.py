"""TIFF kinds people who image cells report in public trackers, tried as a demanding new user would:
each is read as the file means it, or refused with one line that names the file.

First the kinds the reader got wrong (each test writes its inputs here): data cut short that a
decoder returns without a word, planes of another size or type in a multi-file image,
Micro-Manager coordinates as 2.0 writes them and RGB Micro-Manager pages, renamed OME-TIFFs, UUIDs
that name two files, channel names of another OME image, multi-file OME sets with an image per
file (Micro-Manager stage positions, wells), a file reached twice under two names, links to
folders, images without pixels, the same kinds in --cells masks. Then a table of the kinds that
already worked, so they stay working, and the whole lot through `protloc embed --on-error skip
--workers 2`."""

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from protloc import micromanager
from protloc.cells import read_mask
from protloc.errors import ProtlocError
from protloc.sources import discover
from protloc.tiff import read_tiff
from test_tiff_layouts import cut, mm_metas, rand, refused, write_described, write_mm

NS = 'xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"'
UUID = [f"urn:uuid:40000000-0000-0000-0000-00000000000{i}" for i in range(4)]


def ome(images, uuid=UUID[0]):
    """OME-XML of `images` (Pixels elements), the file's own UUID `uuid`."""
    body = "".join(f'<Image ID="Image:{i}">{px}</Image>' for i, px in enumerate(images))
    return f'<?xml version="1.0" encoding="UTF-8"?><OME {NS} UUID="{uuid}">{body}</OME>'


def pixels(tiffdata, nz=3, nc=2, ny=24, nx=28, order="XYZCT", index=0, names=None):
    channels = "".join(f'<Channel ID="Channel:{index}:{c}" SamplesPerPixel="1"'
                       + (f' Name="{names[c]}"' if names else "") + "/>" for c in range(nc))
    return (f'<Pixels ID="Pixels:{index}" DimensionOrder="{order}" Type="uint16" SizeX="{nx}" SizeY="{ny}" '
            f'SizeC="{nc}" SizeZ="{nz}" SizeT="1">{channels}{tiffdata}</Pixels>')


def tiffdata(file, uuid, count, **first):
    attrs = "".join(f' First{a}="{v}"' for a, v in first.items())
    return f'<TiffData{attrs} IFD="0" PlaneCount="{count}"><UUID FileName="{file}">{uuid}</UUID></TiffData>'


def binary_only(uuid, master, master_uuid=UUID[0]):
    return (f'<?xml version="1.0" encoding="UTF-8"?><OME {NS} UUID="{uuid}">'
            f'<BinaryOnly MetadataFile="{master}" UUID="{master_uuid}"/></OME>')


def per_channel_set(folder, zc, c0="a.ome.tif", c1="b.ome.tif", named=("a.ome.tif", "b.ome.tif"), uuids=UUID[:2]):
    """zc (Z, 2, Y, X): channel 0 and the XML in folder/c0, channel 1 in folder/c1 (BinaryOnly);
    the XML names the files `named` with `uuids`."""
    folder.mkdir(parents=True, exist_ok=True)
    nz, _, ny, nx = zc.shape
    xml = ome([pixels(tiffdata(named[0], uuids[0], nz, C=0) + tiffdata(named[1], uuids[1], nz, C=1), nz, 2, ny, nx)],
              UUID[0])
    return (write_described(folder / c0, zc[:, 0], xml),
            write_described(folder / c1, zc[:, 1], binary_only(UUID[1], named[0])))


def image_per_file_set(folder, data, mm=False, binary=True):
    """data (files, C, Z, Y, X): one image per file, the XML (an Image per file) in the first file;
    the others BinaryOnly (or the full XML, own UUID, in every file); `mm`: Micro-Manager page tags."""
    folder.mkdir(parents=True, exist_ok=True)
    n, nc, nz, ny, nx = data.shape
    names = [f"exp_MMStack_Pos{k}.ome.tif" for k in range(n)]
    images = [pixels(tiffdata(names[k], UUID[k], nc * nz), nz, nc, ny, nx, index=k) for k in range(n)]
    paths = []
    for k in range(n):
        desc = ome(images, UUID[k]) if k == 0 or not binary else binary_only(UUID[k], names[0])
        planes = data[k].reshape(nc * nz, ny, nx)  # XYZCT: z fastest
        if mm:
            metas = [{"ChannelIndex": c, "SliceIndex": z, "FrameIndex": 0, "PositionIndex": k}
                     for c in range(nc) for z in range(nz)]
            with tifffile.TiffWriter(folder / names[k]) as w:
                for i, (plane, meta) in enumerate(zip(planes, metas)):
                    w.write(plane, description=desc if i == 0 else None, metadata=None,
                            extratags=[(micromanager.MM_TAG, "s", 0, json.dumps(meta), True)])
            paths.append(str(folder / names[k]))
        else:
            paths.append(write_described(folder / names[k], planes, desc))
    return paths


def ids(*inputs, stdin=None):
    return [s.id for s in discover([str(i) for i in inputs], stdin=io.StringIO(stdin) if stdin else None)]


# --- data cut short, planes that differ, no pixels ------------------------------------------------

@pytest.mark.parametrize("compression", ["jpeg", "zlib", "lzw", None])
def test_data_cut_short_is_refused_whatever_the_decoder(tmp_path, compression):
    """A JPEG decoder returns a cut strip without a word (the rest gray): the strip's byte count
    reaches past the end of the file, and that is what is checked, for every compression."""
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, rand((64, 64), np.uint8), compression=compression, metadata=None)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        keep = page.dataoffsets[-1] + page.databytecounts[-1] // 2
    assert keep < os.path.getsize(path)
    refused(cut(path, keep), "truncated or corrupt")


def test_offsets_and_counts_past_the_end_are_refused(tmp_path):
    """(An uncompressed strip with too large a byte count was read, since only its start is used.)"""
    data = rand((5, 32, 32))
    for name, tag, needle in [("count.tif", "StripByteCounts", "plane 2 of 5"),  # pages 2-5 share one array
                              ("offset.tif", "StripOffsets", "plane 3 of 5")]:
        path = tmp_path / name
        tifffile.imwrite(path, data, metadata={"axes": "CYX"}, rowsperstrip=8)
        with tifffile.TiffFile(path) as tif:
            where = tif.pages[2].tags[tag].valueoffset
        with open(path, "r+b") as f:
            f.seek(where + 2)
            f.write(b"\xff\x7f")
        refused(str(path), "truncated or corrupt", needle, "past the end of its file")


def test_planes_of_another_size_or_type_are_refused(tmp_path):
    zc = rand((3, 2, 24, 28))
    for name, other in [("type", zc[:, 1].astype(np.uint8)), ("size", rand((3, 20, 20)))]:
        master, companion = per_channel_set(tmp_path / name, zc)
        write_described(companion, other, binary_only(UUID[1], "a.ome.tif"))
        message = refused(master, "metadata and data disagree", f"(in {companion})")
        assert ("uint8" if name == "type" else "20 x 20") in message


def test_masks_cut_short_or_of_several_series_are_refused(tmp_path):
    """The same kinds in a --cells mask: a cut JPEG strip, and masks appended to one file (before:
    read as it came, and the first of them)."""
    path = tmp_path / "cut_mask.tif"
    tifffile.imwrite(path, rand((64, 64), np.uint8), compression="jpeg", metadata=None)
    with tifffile.TiffFile(path) as tif:
        keep = tif.pages[0].dataoffsets[-1] + tif.pages[0].databytecounts[-1] // 2
    with pytest.raises(ProtlocError, match=rf"^{path}: truncated or corrupt: the data of plane 1 of 1 end at"):
        read_mask(cut(path, keep), (64, 64), "image.tif", 10**6)
    path = tmp_path / "two_masks.tif"
    for seed in (0, 1):
        tifffile.imwrite(path, rand((64, 64), np.uint16, seed), append=True)
    with pytest.raises(ProtlocError, match=rf"^{path}: holds 2 image series; a mask is one 2-D label image$"):
        read_mask(str(path), (64, 64), "image.tif", 10**6)


def test_image_without_pixels_is_refused(tmp_path):
    path = tmp_path / "w0.tif"
    tifffile.imwrite(path, rand((8, 8)), metadata=None)
    with tifffile.TiffFile(path) as tif:
        where = tif.pages[0].tags["ImageWidth"].valueoffset
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(b"\0\0")
    refused(str(path), "holds an empty image (8 x 0 pixels)")


# --- Micro-Manager -------------------------------------------------------------------------------

@pytest.mark.parametrize("metas, needle", [
    ([{"ChannelIndex": 0, "FrameIndex": t} for t in range(4)], "has 4 time points"),  # no SliceIndex
    ([{"ChannelIndex": 0, "PositionIndex": p} for p in range(4)], "holds 4 stage positions"),
    ([{"ChannelIndex": 0, "Slice": 0, "Frame": t} for t in range(4)], "has 4 time points"),  # 2.0's keys
    ([{"ChannelIndex": 0, "SliceIndex": 0, "completeCoords": {"z": 0, "row": r}} for r in range(4)],
     "holds 4 values of the Micro-Manager axis 'row'"),
])
def test_micromanager_coordinates_as_written_are_never_merged(tmp_path, metas, needle):
    """Before: pages without SliceIndex were not Micro-Manager pages, and 4 time points became 4 channels."""
    refused(write_mm(tmp_path / "mm.tif", rand((4, 24, 28)), metas), needle)


def test_micromanager_2_keys_and_missing_coordinates(tmp_path):
    planes = rand((6, 24, 28))
    metas = [{"ChannelIndex": c, "Slice": z, "Frame": 0} for c in range(2) for z in range(3)]
    img = read_tiff(write_mm(tmp_path / "mm2.tif", planes, metas))
    np.testing.assert_array_equal(img.pixels, np.stack([planes[:3].max(0), planes[3:].max(0)]))
    path = str(tmp_path / "partial.tif")
    with tifffile.TiffWriter(path) as w:
        for i, plane in enumerate(planes[:3]):
            tags = [(micromanager.MM_TAG, "s", 0, json.dumps({"SliceIndex": i}), True)] if i != 1 else []
            w.write(plane, extratags=tags, metadata=None)
    refused(path, "corrupt Micro-Manager metadata: page 2 of 3 has no coordinates")


def write_mm_rgb(path, planes, metas):
    with tifffile.TiffWriter(path) as w:
        for plane, meta in zip(planes, metas):
            w.write(plane, photometric="rgb", metadata=None,
                    extratags=[(micromanager.MM_TAG, "s", 0, json.dumps(meta), True)])
    return str(path)


def test_micromanager_rgb_pages(tmp_path):
    """RGB pages were not Micro-Manager pages: their positions and time points were merged."""
    rgb = rand((4, 24, 28, 3), np.uint8)
    path = write_mm_rgb(tmp_path / "z.tif", rgb[:3], [{"ChannelIndex": 0, "SliceIndex": z} for z in range(3)])
    for z, want in [("max", rgb[:3].max(0)), ("middle", rgb[1]), ("mean", rgb[:3].mean(0))]:
        np.testing.assert_allclose(read_tiff(path, z=z).pixels, want.transpose(2, 0, 1), rtol=1e-6)
    metas = [{"ChannelIndex": 0, "SliceIndex": z % 2, "PositionIndex": z // 2} for z in range(4)]
    refused(write_mm_rgb(tmp_path / "pos.tif", rgb, metas), "holds 2 stage positions")
    metas = [{"ChannelIndex": c, "SliceIndex": 0} for c in range(2)]  # two RGB channels: 6 channels
    np.testing.assert_array_equal(read_tiff(write_mm_rgb(tmp_path / "c.tif", rgb[:2], metas)).pixels,
                                  rgb[:2].transpose(0, 3, 1, 2).reshape(6, 24, 28))


# --- OME-TIFF: files found by UUID -----------------------------------------------------------------

def test_renamed_ome_tiff_is_read(tmp_path):
    """Bio-Formats, Fiji and Micro-Manager name the file in its own TiffData; users rename files.
    The XML's own UUID is this file (as tifffile reads it): before, 'which is missing' was raised."""
    zc = rand((3, 2, 24, 28))
    xml = ome([pixels(tiffdata("as_written.ome.tif", UUID[0], 6), names=("DAPI", "GFP"))])
    path = write_described(tmp_path / "cell_01.ome.tif", zc.transpose(1, 0, 2, 3).reshape(6, 24, 28), xml)
    img = read_tiff(path)
    np.testing.assert_array_equal(img.pixels, zc.max(0))
    assert img.channel_names == ["DAPI", "GFP"] and img.warnings == []
    # a renamed master: its companion still names the old one
    master, companion = per_channel_set(tmp_path / "set", zc, c0="renamed.ome.tif", named=("a.ome.tif", "b.ome.tif"))
    np.testing.assert_array_equal(read_tiff(master).pixels, zc.max(0))
    assert ids(tmp_path / "set") == [master]  # the companion is read with it
    refused(companion, f"holds pixels of the multi-file OME-TIFF {tmp_path / 'set' / 'a.ome.tif'}, which is missing")


@pytest.mark.parametrize("uuids, shown", [((UUID[0], UUID[0]), UUID[0]), (("", ""), "(none)")])
def test_a_uuid_that_names_two_files_is_refused(tmp_path, uuids, shown):
    """tifffile finds a TiffData's file by its UUID: two files under one UUID (or none) were read
    from the first, channel 1 a copy of channel 0."""
    master, _ = per_channel_set(tmp_path / "set", rand((3, 2, 24, 28)), uuids=uuids)
    refused(master, "corrupt OME-XML", "a.ome.tif, b.ome.tif", f"the same UUID {shown}")


def test_channel_names_are_those_of_the_image_read(tmp_path):
    """tifffile leaves out Images without TiffData (MetadataOnly): before, the names (and the sizes
    an error quotes) were taken from the Image at the series' position, another image's."""
    data = rand((2, 24, 28))
    xml = ome([pixels("<MetadataOnly/>", 1, 2, names=("overview_a", "overview_b")),
               pixels('<TiffData IFD="0" PlaneCount="2"/>', 1, 2, index=1, names=("DAPI", "GFP"))])
    img = read_tiff(write_described(tmp_path / "a.ome.tif", data, xml))
    np.testing.assert_array_equal(img.pixels, data)
    assert img.channel_names == ["DAPI", "GFP"]
    xml = xml.replace('SizeZ="1"', 'SizeZ="2"').replace('PlaneCount="2"', 'PlaneCount="4"')
    refused(write_described(tmp_path / "b.ome.tif", data, xml), "(SizeZ x SizeC x SizeT = 2 x 2 x 1)",
            "declares 4 planes but the file holds 2")


# --- OME-TIFF sets with an image per file ----------------------------------------------------------

@pytest.mark.parametrize("layout", [dict(mm=True), dict(binary=True), dict(binary=False)],
                         ids=["micromanager-positions", "binary-only", "xml-in-each"])
def test_ome_image_per_file_sets(tmp_path, layout):
    """One Image per file: Micro-Manager's stage positions (the first file holds the OME-XML of all,
    the others point to it, BinaryOnly), wells, bfconvert's per-series files. Before: discovery
    left the other positions out, the XML's master warned of 2 series, a BinaryOnly file was
    refused, and with the XML in every file the second file's row held the first file's pixels."""
    data = rand((3, 2, 3, 24, 28))
    paths = image_per_file_set(tmp_path / "set", data, **layout)
    assert ids(tmp_path / "set") == paths
    for path, want in zip(paths, data):
        img = read_tiff(path)
        np.testing.assert_array_equal(img.pixels, want.max(1))
        assert img.warnings == []
    refused(paths[1], "has 1 image series", "no series 1", series=1)


@pytest.mark.parametrize("binary", [True, False])
def test_a_missing_file_of_another_image_is_not_this_files_error(tmp_path, binary):
    """Wells whose files are images of their own, two left out (failed wells): the others read, without
    a word about those (tifffile says it zero-filled them while it built every series)."""
    data = rand((4, 2, 3, 24, 28))
    paths = image_per_file_set(tmp_path / "wells", data, binary=binary)
    for gone in paths[2:]:
        os.remove(gone)
    for path, want in zip(paths[:2], data):
        img = read_tiff(path)
        np.testing.assert_array_equal(img.pixels, want.max(1))
        assert img.warnings == []


def test_set_files_that_cannot_be_read_say_why(tmp_path):
    zc = rand((3, 2, 24, 28))
    # the XML in a .companion.ome side file: every TIFF is BinaryOnly
    folder = tmp_path / "companion"
    folder.mkdir()
    (folder / "set.companion.ome").write_text(ome([pixels(tiffdata("c0.ome.tif", UUID[1], 3, C=0)
                                                          + tiffdata("c1.ome.tif", UUID[2], 3, C=1))]))
    c0 = write_described(folder / "c0.ome.tif", zc[:, 0], binary_only(UUID[1], "set.companion.ome"))
    refused(c0, f"its OME metadata are in {folder / 'set.companion.ome'}, which is not a TIFF")
    # a BinaryOnly file its master does not map: kept by discovery (before: left out without a word)
    folder = tmp_path / "stray"
    folder.mkdir()
    master = write_described(folder / "m.ome.tif", zc.transpose(1, 0, 2, 3).reshape(6, 24, 28),
                             ome([pixels(tiffdata("m.ome.tif", UUID[0], 6))]))
    stray = write_described(folder / "stray.ome.tif", zc[:, 1], binary_only(UUID[1], "m.ome.tif"))
    assert ids(folder) == [master, stray]
    refused(stray, f"the OME-XML in {master} maps none of the file's 3 pages")


# --- discovery ---------------------------------------------------------------------------------------

def test_one_file_reached_twice_is_one_image(tmp_path, monkeypatch, caplog):
    """A relative and an absolute path, or a link: one file, one row (before: two rows, or a
    multi-file set's companion given under another spelling than its master failed)."""
    monkeypatch.chdir(tmp_path)
    tifffile.imwrite(tmp_path / "a.tif", rand((2, 32, 32)))
    os.symlink(tmp_path / "a.tif", tmp_path / "link.tif")
    with caplog.at_level(logging.WARNING, logger="protloc"):
        assert ids("-", stdin=f"a.tif\n{tmp_path / 'a.tif'}\nlink.tif\n") == ["a.tif"]
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'a.tif'}: the same file as a.tif; read once",
                                                        "link.tif: the same file as a.tif; read once"]
    master, companion = per_channel_set(tmp_path / "set", rand((3, 2, 24, 28)))
    assert ids("-", stdin=f"{os.path.relpath(companion)}\n{master}\n") == [master]
    assert ids("set", tmp_path / "set") == [os.path.join("set", "a.ome.tif")]


def test_links_to_folders_are_followed_once(tmp_path):
    (tmp_path / "plates" / "p1").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "plates" / "p1" / "a.tif", rand((2, 32, 32)))
    (tmp_path / "input").mkdir()
    os.symlink(tmp_path / "plates" / "p1", tmp_path / "input" / "p1")
    os.symlink(tmp_path / "input", tmp_path / "input" / "p1_loop")  # a link back up ends, once
    assert ids(tmp_path / "input") == [str(tmp_path / "input" / "p1" / "a.tif")]


# --- the kinds that already worked -------------------------------------------------------------------

def _appended(path, data, **kw):
    for plane in data:
        tifffile.imwrite(path, plane, append=True, **kw)


def _writer_loop(path, data, **kw):
    with tifffile.TiffWriter(path) as w:
        for plane in data:
            w.write(plane, **kw)


def _hand_ome(order):
    """Planes of a (Z=3, C=2) image stored in DimensionOrder `order` (the letter after XY varies
    fastest), one TiffData."""
    def write(path, zc):
        slowest_first = order[:1:-1]  # XYCZT -> TZC
        sizes = {"Z": 3, "C": 2, "T": 1}
        planes = [zc[i[slowest_first.index("Z")], i[slowest_first.index("C")]]
                  for i in np.ndindex(*(sizes[a] for a in slowest_first))]
        write_described(path, np.stack(planes), ome([pixels("<TiffData/>", order=order)]))
    return write


ZC = rand((3, 2, 24, 28), seed=3)   # Z C Y X
RGB = rand((3, 24, 28, 3), np.uint8, seed=4)

WORKED = [  # (name, write(path, data), data, the (C, Y, X) a correct reader returns (max over Z), or an error)
    ("append_default.tif", _appended, ZC[:, 0], ZC[:, 0]),
    ("append_no_metadata.tif", lambda p, d: _appended(p, d, metadata=None), ZC[:, 0], ZC[:, 0]),
    ("append_zlib_tiled.tif", lambda p, d: _appended(p, d, compression="zlib", tile=(16, 16)), ZC[:, 0], ZC[:, 0]),
    ("writer_loop.tif", _writer_loop, ZC[:, 0], ZC[:, 0]),
    ("writer_contiguous.tif", lambda p, d: _writer_loop(p, d, contiguous=True), ZC[:, 0], ZC[:, 0]),
    ("ij_zcyx.tif", lambda p, d: tifffile.imwrite(p, d, imagej=True, metadata={"axes": "ZCYX"}), ZC, ZC.max(0)),
    ("ij_tzcyx_t1.tif", lambda p, d: tifffile.imwrite(p, d[None], imagej=True, metadata={"axes": "TZCYX"}), ZC,
     ZC.max(0)),
    ("ij_zyx.tif", lambda p, d: tifffile.imwrite(p, d[:, 0], imagej=True, metadata={"axes": "ZYX"}), ZC,
     ZC[:, :1].max(0)),
    ("ij_zrgb.tif", lambda p, d: tifffile.imwrite(p, d, imagej=True, photometric="rgb", metadata={"axes": "ZYXS"}),
     RGB, RGB.max(0).transpose(2, 0, 1)),
    ("ij_time.tif", lambda p, d: tifffile.imwrite(p, d[:, 0], imagej=True, metadata={"axes": "TYX"}), ZC,
     "has 3 time points"),
    ("ome_czyx.ome.tif", lambda p, d: tifffile.imwrite(p, d.transpose(1, 0, 2, 3), ome=True,
                                                       metadata={"axes": "CZYX"}), ZC, ZC.max(0)),
    ("ome_bigtiff_zstd.ome.tif", lambda p, d: tifffile.imwrite(p, d, ome=True, bigtiff=True, tile=(16, 16),
                                                               compression="zstd", metadata={"axes": "ZCYX"}),
     ZC, ZC.max(0)),
    ("ome_XYCZT.ome.tif", _hand_ome("XYCZT"), ZC, ZC.max(0)),
    ("ome_XYZTC.ome.tif", _hand_ome("XYZTC"), ZC, ZC.max(0)),
    ("ome_XYTCZ.ome.tif", _hand_ome("XYTCZ"), ZC, ZC.max(0)),
    ("ome_rgb.ome.tif", lambda p, d: tifffile.imwrite(p, d[0], ome=True, photometric="rgb"), RGB,
     RGB[0].transpose(2, 0, 1)),
    ("ome_time.ome.tif", lambda p, d: tifffile.imwrite(p, d, ome=True, metadata={"axes": "TCYX"}), ZC,
     "has 3 time points"),
    ("yxc2.tif", lambda p, d: tifffile.imwrite(p, d[0].transpose(1, 2, 0)), ZC, ZC[0]),
    ("yxc7.tif", lambda p, d: tifffile.imwrite(p, d.reshape(6, 24, 28).transpose(1, 2, 0), metadata=None), ZC,
     ZC.reshape(6, 24, 28)),
    ("samples5.tif", lambda p, d: tifffile.imwrite(p, d.reshape(6, 24, 28)[:5].transpose(1, 2, 0),
                                                   photometric="minisblack", planarconfig="contig"), ZC,
     ZC.reshape(6, 24, 28)[:5]),
    ("rgba.tif", lambda p, d: tifffile.imwrite(p, np.concatenate([d[0], d[1, ..., :1]], -1), photometric="rgb",
                                               extrasamples=["unassalpha"]), RGB,
     np.concatenate([RGB[0], RGB[1, ..., :1]], -1).transpose(2, 0, 1)),
    ("one_pixel_wide.tif", lambda p, d: tifffile.imwrite(p, d[0, 0, :, :1]), ZC, ZC[0, :1, :, :1]),
    ("int16.tif", lambda p, d: tifffile.imwrite(p, d[0].astype(np.int16)), ZC, ZC[0].astype(np.float32)),
    ("mm_cz.tif", lambda p, d: write_mm(p, d.transpose(1, 0, 2, 3).reshape(6, 24, 28), mm_metas(2, 3)), ZC,
     ZC.max(0)),
    ("mm_zc_interleaved.tif", lambda p, d: write_mm(p, d.reshape(6, 24, 28), [
        {"ChannelIndex": c, "SliceIndex": z} for z in range(3) for c in range(2)]), ZC, ZC.max(0)),
    ("ij_images_more.tif", lambda p, d: write_described(p, d[:, 0], "ImageJ=1.53t\nimages=6\nslices=6\n"), ZC,
     "declares 6 planes but the file holds 3"),
    ("zero_length.tif", lambda p, d: open(p, "wb").close(), ZC, "not a readable TIFF"),
    ("ifd_loop.tif", lambda p, d: _loop(p, d.reshape(6, 24, 28)), ZC, "truncated or corrupt"),
]


def _loop(path, data):
    """Pages whose last IFD points back to the second."""
    tifffile.imwrite(path, data, metadata=None)
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        second, last = pages[1].offset, pages[-1]
        where = last.offset + 2 + 12 * len(last.tags)
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(second.to_bytes(4, "little"))


@pytest.mark.parametrize("name, write, data, want", WORKED, ids=[w[0] for w in WORKED])
def test_kinds_that_already_worked(tmp_path, name, write, data, want):
    path = tmp_path / name
    write(path, data)
    if isinstance(want, str):
        refused(str(path), want)
    else:
        img = read_tiff(path)
        assert img.pixels.dtype == want.dtype and img.warnings == []
        np.testing.assert_array_equal(img.pixels, want)


# --- end to end --------------------------------------------------------------------------------------

def test_embed_a_folder_of_field_kinds_with_workers(tmp_path):
    """`protloc embed DIR --on-error skip --workers 2`: exit 0, one line per bad file, no traceback
    and no raw warning, rows for the good files only, each file once."""
    folder = tmp_path / "field"
    folder.mkdir()
    good = []
    for i, (name, write, data, want) in enumerate(WORKED):
        write(folder / f"{i:02d}_{name}", data)
        if not isinstance(want, str) and want.shape[-1] >= 8:
            good.append(str(folder / f"{i:02d}_{name}"))
        elif not isinstance(want, str):
            os.remove(folder / f"{i:02d}_{name}")  # smaller than a patch: another check's business
    bad = [str(folder / f"{i:02d}_{w[0]}") for i, w in enumerate(WORKED) if isinstance(w[3], str)]
    positions = image_per_file_set(folder / "zz_positions", rand((2, 2, 3, 24, 28)), mm=True)
    per_channel_set(folder / "zz_set", rand((3, 2, 24, 28)))
    cmd = [sys.executable, "-m", "protloc", "embed", "-", "--weights", "random", "--arch", "vit_tiny", "--patch", "8",
           "--depth", "1", "--channel-strategy", "replicate", "--on-error", "skip", "--workers", "2",
           "-o", tmp_path / "e.npy", "--ids", tmp_path / "ids.txt"]
    stdin = f"{good[0]}\n{folder}\n{os.path.relpath(folder / 'zz_set', tmp_path)}\n"  # the set twice
    proc = subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = (tmp_path / "ids.txt").read_text().split()
    assert rows == good + positions + [str(folder / "zz_set" / "a.ome.tif")]
    assert np.load(tmp_path / "e.npy").shape == (len(rows), 192)
    lines = proc.stderr.splitlines()
    assert all(line.startswith("protloc: ") for line in lines), proc.stderr
    skipped = [line for line in lines if line.startswith("protloc: warning: skipped ")]
    assert [line.split()[3].rstrip(":") for line in skipped] == bad, proc.stderr
    twice = [line for line in lines if "the same file as" in line]  # the set's two files, given twice
    assert len(twice) == 2 and len([line for line in lines if "warning" in line]) == len(bad) + 2, proc.stderr
