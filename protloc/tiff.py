"""Streaming TIFF reader: any common microscopy TIFF -> one (C, Y, X) image, read as the file
means it, or refused with one line that names the file.

Microscopy TIFFs come in many shapes: a plain 2-D plane, a channel stack, an RGB picture, a
z-stack of channels (OME-TIFF, ImageJ hyperstack, tifffile's own shaped files), a multi-file
OME-TIFF whose planes lie in companion files, or a Micro-Manager acquisition whose pages are
channel x z and only the per-page metadata says which is which. `read_tiff`:

- picks what to read: the one tifffile series; pages saved one by one (one series per page, as
  append mode and scikit-image write them) as one stack; of several real series (OME images,
  pyramids, shapes that differ) `series` K, by default the first full-resolution one, with a
  warning naming how many there are. A file of a multi-file OME-TIFF set holds the images with
  planes in it (other files of the set are images of their own, or parts of its images); a
  BinaryOnly file that holds whole images is read through the XML of the file it names;
- checks what the metadata declare against what the file holds (declared.py, micromanager.py)
  and what tifffile said while reading (tiff_messages.py);
- finds the axes (axes.py: trusted metadata first, the shape rule otherwise), projects Z away
  (max, mean or the middle slice) and returns one channels-first array.

Multi-page stacks are projected page by page, so a large z-stack never sits in memory whole; only
one file (with its companions) is read at a time and nothing is cached. Every failure a user can
cause becomes one `ProtlocError` line that names the file; warnings travel on `Image.warnings`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import tifffile

from protloc import declared, micromanager
from protloc.axes import layout, trusted
from protloc.errors import ProtlocError
from protloc.ome import OmeXml
from protloc.tiff_messages import TiffMessages

log = logging.getLogger(__name__)

Z_PROJECTIONS = ("max", "mean", "middle")
DEFAULT_MAX_PIXELS = 1 << 28


@dataclass
class Image:
    pixels: np.ndarray                 # (C, Y, X), uint8, uint16 or float32
    channel_names: list[str] | None    # names stored in the file (OME Channel Name), raw
    source: str                        # the path, or the stem of one-file-per-channel images
    warnings: list[str] = field(default_factory=list)  # one line each, `FILE: what`, for the user


def read_tiff(path, z: str = "max", axes: str | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS, series: int | None = None) -> Image:
    """Read one TIFF as a (C, Y, X) image, Z projected with `z`; `axes` (e.g. "ZCYX") overrides
    the file's metadata, `series` picks one of tifffile's series (default: see the module doc).
    Raises ProtlocError naming the file for anything the file does not hold as it declares."""
    path = os.fspath(path)
    if z not in Z_PROJECTIONS:
        raise ProtlocError(f"unknown z projection {z!r} (choose from {', '.join(Z_PROJECTIONS)})")
    messages = TiffMessages(path)
    try:
        with messages.capture(), tifffile.TiffFile(path) as tif:
            pixels, names, notes = _read(tif, path, z, axes, max_pixels, series, messages)
    except ProtlocError:
        raise
    except FileNotFoundError:
        raise ProtlocError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ProtlocError(f"{path}: is a directory, not a TIFF file") from None
    except Exception as e:  # noqa: BLE001 - a damaged file can make any decoder raise anything
        log.debug("reading %s failed", path, exc_info=True)
        messages.raise_errors()
        raise ProtlocError(f"{path}: not a readable TIFF ({_reason(e)})") from e
    messages.raise_errors()
    return Image(pixels, names, path, notes + messages.warnings)


def read_channel_files(stem: str, paths: list[str], z: str = "max", axes: str | None = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS, series: int | None = None) -> Image:
    """One single-channel file per channel (HPA `_blue/_green/...`), stacked in the given order.
    The caller names the channels (from the file suffixes), so `channel_names` is None."""
    if not paths:
        raise ProtlocError(f"{stem}: no channel files")
    planes, notes = [], []
    for p in paths:
        img = read_tiff(p, z, axes, max_pixels, series)
        c, y, x = img.pixels.shape
        if c != 1:
            raise ProtlocError(f"{p}: has {c} channels, but each file of a one-file-per-channel "
                               f"image ({stem}) must hold one")
        if planes and (y, x) != planes[0].shape:
            y0, x0 = planes[0].shape
            raise ProtlocError(f"{p}: is {y}x{x} pixels but {paths[0]} is {y0}x{x0}; the channel "
                               f"files of {stem} must have the same size")
        planes.append(img.pixels[0])
        notes += img.warnings
    return Image(convert(np.stack(planes), stem), None, stem, notes)


# ---------------------------------------------------------------------------------------------
# what to read


@dataclass
class _Planes:
    """What is read of a file: the pages of one tifffile series, or one-page series stacked."""
    pages: list             # TiffPage / TiffFrame / None per plane, in order
    shape: tuple[int, ...]  # tifffile's (squeezed) shape and axis letters
    letters: str
    full_shape: tuple[int, ...]  # ... and unsqueezed, for --axes that name size-1 axes
    full_letters: str
    from_metadata: bool     # the letters come from real metadata (axes.trusted)
    series: tifffile.TiffPageSeries  # the series (the first one of a stack)
    index: int              # its position in tif.series
    stacked: bool = False

    @classmethod
    def of(cls, index, series):  # index: the series' position in tif.series
        return cls(list(series), tuple(series.shape), series.axes, tuple(series.get_shape(False)),
                   series.get_axes(False), trusted(series), series, index)

    @classmethod
    def stack(cls, all_series):
        first = all_series[0]
        return cls([s.keyframe for s in all_series], (len(all_series), *first.shape), "Q" + first.axes,
                   (len(all_series), *first.get_shape(False)), "Q" + first.get_axes(False), trusted(first),
                   first, 0, stacked=True)

    def read(self, cache) -> np.ndarray:
        """The whole array, of shape `full_shape`."""
        if self.stacked:
            return np.stack([_decode(p, cache).reshape(self.full_shape[1:]) for p in self.pages])
        cache.open(self.series.keyframe.parent.filehandle)
        return self.series.asarray().reshape(self.full_shape)


def _saved_page_by_page(all_series) -> bool:
    """Several one-page series of one shape and type from formats that start a series per write
    (tifffile's append mode, scikit-image): one stack, not several images."""
    first = all_series[0]
    return len(all_series) > 1 and all(
        s.kind in ("shaped", "generic", "uniform") and len(s) == 1 and s.shape == first.shape
        and s.dtype == first.dtype and not s.keyframe.is_reduced for s in all_series)


def _choose(all_series, path, index) -> tuple[_Planes, list[str]]:
    """The planes to read of the file's series ((position in tif.series, series) pairs), and a
    warning when the file holds others; `index` (--series) counts the file's series."""
    n = len(all_series)
    if n == 0:
        raise ProtlocError(f"{path}: not a readable TIFF (no image in it)")
    if index is not None:
        if not 0 <= index < n:
            raise _no_series(path, index, n)
        return _Planes.of(*all_series[index]), []
    if _saved_page_by_page([s for _, s in all_series]):
        return _Planes.stack([s for _, s in all_series]), []
    k = next((k for k, (_, s) in enumerate(all_series) if not s.keyframe.is_reduced), 0)  # skip reduced levels
    chosen = _Planes.of(*all_series[k])
    if n == 1:
        return chosen, []
    return chosen, [f"{path}: holds {n} image series; read series {k} (shape {chosen.shape}); "
                    f"choose another with --series K (0 to {n - 1})"]


def _no_series(path, index, n):
    return ProtlocError(f"{path}: has {n} image series (--series 0 to {n - 1}); there is no series {index}")


# ---------------------------------------------------------------------------------------------
# reading


def _read(tif, path, z, axes, max_pixels, series, messages):
    """-> ((C, Y, X) array of a kept dtype, channel names or None, warnings)."""
    if tif.is_micromanager and not micromanager.has_header(tif):
        messages.ignore(micromanager.PROBE)  # tifffile looks for a header this file never had
    if axes is None and tif.is_micromanager:
        planes = micromanager.page_planes(tif.pages, path, micromanager.summary(tif))
        if planes is not None:  # one image, whatever tifffile's series say
            if series not in (None, 0):
                raise _no_series(path, series, 1)
            messages.raise_errors()
            return convert(_read_micromanager(tif.pages, path, z, max_pixels, planes), path), None, []
    ome = OmeXml.of(tif.pages.first.description, path) if tif.is_ome else None
    master = ome.master() if ome is not None else None
    if master is None:
        return _read_series(tif, path, ome, z, axes, max_pixels, series, messages)
    # pixels only: the OME-XML of the set is in its master file
    if not os.path.exists(master):
        raise ProtlocError(f"{path}: holds pixels of the multi-file OME-TIFF {master}, which is missing "
                           "(its metadata are there)")
    try:
        root = tifffile.TiffFile(master)
    except tifffile.TiffFileError:
        raise ProtlocError(f"{path}: its OME metadata are in {master}, which is not a TIFF (an OME companion file); "
                           "protloc reads multi-file OME-TIFFs whose metadata are in one of their TIFFs") from None
    with root:
        root_ome = OmeXml.of(root.pages.first.description, master)
        if root_ome is None or root_ome.master() is not None:
            raise ProtlocError(f"{path}: its OME metadata should be in {master}, which holds none")
        if os.path.realpath(master) in map(os.path.realpath, root_ome.partners(path)):
            raise ProtlocError(f"{path}: is a companion of the multi-file OME-TIFF {master} (it holds pixels "
                               "only of an image whose metadata are there): give that file instead")
        return _read_series(root, path, root_ome, z, axes, max_pixels, series, messages, held=len(tif.pages))


def _read_series(tif, path, ome, z, axes, max_pixels, series, messages, held=None):
    """Read `path` through tifffile's series of `tif` (the file itself, or the master file of a
    multi-file OME-TIFF that holds `path`'s metadata; then `held` is the number of pages of `path`)."""
    if ome is not None:
        declared.check_ome_files(ome, path)
        # a missing file of another image of the set is not this file's error (tifffile reports it
        # while it builds every series; the planes of the image read are checked below)
        others = ome.missing_elsewhere(path)
        for name in others:
            messages.ignore(f"OME series failed to read {name!r}")
        if others:
            messages.ignore(f"OME series failed to read {len(others)} files")
    all_series = list(enumerate(tif.series))
    if ome is not None:
        declared.check_ome_pages(ome, tif.series, path, len(tif.pages) if held is None else held)
        # the images with planes in this file (a set's other files are images, or parts, of their own)
        me = os.path.realpath(path)
        all_series = [(i, s) for i, s in all_series if any(p is not None and declared.file_of(p) == me for p in s)]
    if held is None and tif.is_shaped:
        declared.check_shaped(tif, path)
    chosen, notes = _choose(all_series, path, series)
    what = f"its {chosen.series.kind or 'TIFF'} metadata"
    if held is None and tif.is_imagej:
        declared.check_imagej(tif, chosen.series, path)
    image = ome.image(chosen.index) if ome is not None else None
    if ome is not None:
        sizes = ome.sizes(image) if image is not None else None
        xml = "its OME-XML" if held is None else f"the OME-XML in {ome.path}"
        what = f"{xml} ({sizes})" if sizes else xml
    declared.check_planes(chosen.pages, path, what)
    messages.raise_errors()  # a damaged file is named as such before its axes are guessed

    shape, letters = chosen.shape, chosen.letters
    if axes is not None:
        letters = axes.strip().upper()
        if len(letters) != len(shape):
            # the user may name size-1 axes that tifffile squeezed away (ImageJ 'TZCYX' with T=1)
            full = [(n, a) for n, a in zip(chosen.full_shape, chosen.full_letters) if n > 1 or a in letters]
            if len(full) == len(letters):
                shape = tuple(n for n, _ in full)
    check_size(path, math.prod(shape), max_pixels)
    roles = layout(path, shape, letters, chosen.from_metadata, explicit=axes is not None)
    cache = tifffile.FileCache()  # companion files of a multi-file OME-TIFF are reopened as needed
    try:
        pixels = _project_pages(chosen.pages, shape, roles, z, cache)
        if pixels is None:  # pages do not map onto whole leading axes: read the series at once
            pixels = _project_array(chosen.read(cache).reshape(shape), roles, z)
    finally:
        cache.clear()
    pixels = convert(pixels, path)
    names = ome.channel_names(image, pixels.shape[0]) if image is not None else None
    return pixels, names, notes


def _decode(page, cache) -> np.ndarray:
    """One page's pixels; its file (perhaps a companion that tifffile closed) opened through `cache`."""
    fh = page.parent.filehandle
    cache.open(fh)
    try:
        return page.asarray()
    finally:
        cache.close(fh)


def _to_zcyx(a, roles):
    """Array with one role per dimension -> (nZ, nC, Y, X); several C axes are flattened."""
    order = [i for r in "ZCYX1" for i, ri in enumerate(roles) if ri == r]
    nz = math.prod(n for n, r in zip(a.shape, roles) if r == "Z")
    nc = math.prod(n for n, r in zip(a.shape, roles) if r == "C")
    ny, nx = a.shape[roles.index("Y")], a.shape[roles.index("X")]
    return a.transpose(order).reshape(nz, nc, ny, nx)


def _project_array(data, roles, z):
    """Project a whole (already read) array."""
    stack = _to_zcyx(data, roles)
    proj = Projection(z if "Z" in roles else "max", stack.shape[1], stack.shape[0])
    for zi in range(stack.shape[0]):
        if proj.wants(zi):
            for c in range(stack.shape[1]):
                proj.add(c, stack[zi, c])
    return proj.result()


def _project_pages(pages, shape, roles, z, cache):
    """Project page by page when the pages are exactly the leading (Z / C) axes, the common
    case for multi-page stacks; None when they are not (then the caller reads the series)."""
    n = len(pages)
    if n < 2:
        return None
    k = next((k for k in range(1, len(shape)) if math.prod(shape[:k]) == n), None)
    if k is None or any(r not in "ZC1" for r in roles[:k]) or "Z" in roles[k:]:
        return None
    lead, lead_roles, page_shape = shape[:k], roles[:k], shape[k:]
    if any(math.prod(p.shape) != math.prod(page_shape) for p in (pages[0], pages[-1])):
        return None
    nz = math.prod(s for s, r in zip(lead, lead_roles) if r == "Z")
    c_dims = [i for i, r in enumerate(lead_roles) if r == "C"]
    c_lead = tuple(lead[i] for i in c_dims)
    nc_page = math.prod(s for s, r in zip(page_shape, roles[k:]) if r == "C")
    proj = Projection(z if "Z" in roles else "max", math.prod(c_lead) * nc_page, nz)
    for i, page in enumerate(pages):
        idx = np.unravel_index(i, lead)
        zi = next((int(idx[j]) for j, r in enumerate(lead_roles) if r == "Z"), 0)
        if not proj.wants(zi):
            continue  # 'middle' decodes only the middle slice's pages
        ci = int(np.ravel_multi_index([idx[j] for j in c_dims], c_lead)) if c_dims else 0
        block = _to_zcyx(_decode(page, cache).reshape(page_shape), roles[k:])[0]
        for c in range(nc_page):
            proj.add(ci * nc_page + c, block[c])
    return proj.result()


def _read_micromanager(pages, path, z, max_pixels, planes=None):
    """Pages grouped by channel (in order of first appearance), projected over z-slices; an RGB
    page's samples are channels of their own. `planes` is each page's (channel, slice)
    (micromanager.page_planes), None to find them here. None when the pages lack the metadata."""
    planes = planes if planes is not None else micromanager.page_planes(pages, path)
    if planes is None:
        return None
    channels = list(dict.fromkeys(c for c, _ in planes))
    shape = tuple(pages[0].shape)  # (Y, X), or with samples (Y, X, S) or (S, Y, X)
    n_samples = pages[0].samplesperpixel if len(shape) == 3 else 1
    check_size(path, len(planes) * math.prod(shape), max_pixels)
    slices = {c: sorted(s for cc, s in planes if cc == c) for c in channels}
    middle = {c: s[len(s) // 2] for c, s in slices.items()}
    has_z = any(len(s) > 1 for s in slices.values())
    proj = Projection(z if has_z else "max", len(channels) * n_samples, 1)
    for page, (c, s) in zip(pages, planes):
        if z == "middle" and s != middle[c]:
            continue
        plane = page.asarray()
        if plane.shape != shape:
            raise ProtlocError(f"{path}: MicroManager pages differ in size ({plane.shape} vs {shape})")
        block = np.moveaxis(plane, page.axes.index("S"), 0) if n_samples > 1 else plane.reshape(1, *plane.shape[-2:])
        for k in range(n_samples):  # (S, Y, X)
            proj.add(channels.index(c) * n_samples + k, block[k])
    return proj.result()


class Projection:
    """Running Z projection of C channels, one (Y, X) plane at a time."""

    def __init__(self, mode, n_channels, n_z):
        self.mode, self.n_z = mode, n_z
        self.acc = [None] * n_channels
        self.count = [0] * n_channels

    def wants(self, zi):
        return self.mode != "middle" or zi == self.n_z // 2

    def add(self, c, plane):
        if self.mode == "mean":  # float64 sums: exact for integer stacks of any realistic depth
            self.acc[c] = plane.astype(np.float64) if self.acc[c] is None else self.acc[c] + plane
        elif self.acc[c] is None:
            self.acc[c] = np.array(plane, copy=True)
        elif self.mode == "max":
            np.maximum(self.acc[c], plane, out=self.acc[c])
        self.count[c] += 1

    def result(self):
        if any(a is None for a in self.acc):
            raise ValueError("some channels have no planes")
        if self.mode == "mean":
            return np.stack([a / n for a, n in zip(self.acc, self.count)]).astype(np.float32)
        return np.stack(self.acc)


# ---------------------------------------------------------------------------------------------
# helpers


def convert(a, source):
    """Keep uint8 / uint16 / float32 (native byte order); bool -> uint8; other numbers -> float32.
    An image without pixels (a width or height of 0 in a damaged header) is refused."""
    if a.size == 0:
        raise ProtlocError(f"{source}: holds an empty image ({' x '.join(map(str, a.shape[-2:]))} pixels)")
    kind, size = a.dtype.kind, a.dtype.itemsize
    if kind == "b":
        out = a.astype(np.uint8)
    elif kind == "u" and size in (1, 2):
        out = a.astype(np.uint8 if size == 1 else np.uint16, copy=False)
    elif kind in "uif":
        out = a.astype(np.float32, copy=False)
    else:
        raise ProtlocError(f"{source}: unsupported pixel type {a.dtype}")
    return np.ascontiguousarray(out)


def check_size(path, n_pixels, max_pixels):
    if max_pixels is not None and n_pixels > max_pixels:
        raise ProtlocError(f"{path}: declares {n_pixels:,} pixels, more than --max-pixels {max_pixels:,}")


def _reason(e):
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
