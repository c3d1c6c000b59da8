"""Streaming TIFF reader: any common microscopy TIFF layout -> one (C, Y, X) image.

Microscopy TIFFs come in many shapes: a plain 2-D plane, a channel stack, an RGB picture, a
z-stack of channels (OME-TIFF, ImageJ hyperstack, tifffile's own shaped files), or a MicroManager
acquisition whose pages are channel x z and only the per-page metadata says which is which.
`read_tiff` finds the axes (metadata first, the shape otherwise), projects Z away (max, mean or
the middle slice) and returns one channels-first array. Multi-page stacks are projected page by
page, so a large z-stack never sits in memory whole; only one file is read at a time and
nothing is cached.

Every failure a user can cause (a missing, truncated, empty or non-TIFF file, a time series, an
image larger than --max-pixels) becomes one `ProtlocError` line that names the file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import tifffile

from protloc.errors import ProtlocError

log = logging.getLogger(__name__)

Z_PROJECTIONS = ("max", "mean", "middle")
DEFAULT_MAX_PIXELS = 1 << 28

# tifffile axis letters -> what protloc does with them. S (samples, e.g. RGB) is a channel axis;
# every other letter (Q, I, R, ...) is unknown and resolved by the shape rules.
_ROLES = {"C": "C", "S": "C", "Z": "Z", "T": "T", "Y": "Y", "X": "X"}
_AXES_LETTERS = set("CSZTYXQI")
_MM_TAG = 51123  # MicroManagerMetadata, a JSON dict per page


@dataclass
class Image:
    pixels: np.ndarray                 # (C, Y, X), uint8, uint16 or float32
    channel_names: list[str] | None    # names stored in the file (OME Channel Name), raw
    source: str                        # the path, or the stem of one-file-per-channel images


def read_tiff(path, z: str = "max", axes: str | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> Image:
    """Read one TIFF as a (C, Y, X) image, Z projected with `z`; `axes` (e.g. "ZCYX") overrides
    the file's metadata."""
    path = os.fspath(path)
    if z not in Z_PROJECTIONS:
        raise ProtlocError(f"unknown z projection {z!r} (choose from {', '.join(Z_PROJECTIONS)})")
    try:
        with tifffile.TiffFile(path) as tif:
            pixels, names = _read(tif, path, z, axes, max_pixels)
    except ProtlocError:
        raise
    except FileNotFoundError:
        raise ProtlocError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ProtlocError(f"{path}: is a directory, not a TIFF file") from None
    except Exception as e:  # noqa: BLE001 - a damaged file can make any decoder raise anything
        log.debug("reading %s failed", path, exc_info=True)
        raise ProtlocError(f"{path}: not a readable TIFF ({_reason(e)})") from e
    return Image(pixels, names, path)


def read_channel_files(stem: str, paths: list[str], z: str = "max", axes: str | None = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> Image:
    """One single-channel file per channel (HPA `_blue/_green/...`), stacked in the given order.
    The caller names the channels (from the file suffixes), so `channel_names` is None."""
    if not paths:
        raise ProtlocError(f"{stem}: no channel files")
    planes = []
    for p in paths:
        img = read_tiff(p, z, axes, max_pixels)
        c, y, x = img.pixels.shape
        if c != 1:
            raise ProtlocError(f"{p}: has {c} channels, but each file of a one-file-per-channel "
                               f"image ({stem}) must hold one")
        if planes and (y, x) != planes[0].shape:
            y0, x0 = planes[0].shape
            raise ProtlocError(f"{p}: is {y}x{x} pixels but {paths[0]} is {y0}x{x0}; the channel "
                               f"files of {stem} must have the same size")
        planes.append(img.pixels[0])
    return Image(_convert(np.stack(planes), stem), None, stem)


# ---------------------------------------------------------------------------------------------
# reading


def _read(tif, path, z, axes, max_pixels):
    """-> ((C, Y, X) array of a kept dtype, channel names or None)."""
    if axes is None and tif.is_micromanager:
        # MicroManager files often carry a broken summary that tifffile warns about; the
        # per-page metadata is what we use, so the warnings are noise here.
        with _quiet_tifffile():
            pixels = _read_micromanager(tif, path, z, max_pixels)
        if pixels is not None:
            return _convert(pixels, path), None
    series = tif.series[0]
    shape, letters = tuple(series.shape), series.axes
    if axes is not None:
        letters = axes.strip().upper()
        if len(letters) != len(shape):
            # the user may name size-1 axes that tifffile squeezed away (ImageJ 'TZCYX' with T=1)
            full = [(n, a) for n, a in zip(series.get_shape(False), series.get_axes(False))
                    if n > 1 or a in letters]
            if len(full) == len(letters):
                shape = tuple(n for n, _ in full)
    _check_size(path, math.prod(shape), max_pixels)
    roles = _layout(path, shape, letters, explicit=axes is not None)
    pixels = _project_pages(series, shape, roles, z)
    if pixels is None:  # pages do not map onto whole leading axes: read the series at once
        data = series.asarray().reshape(shape)
        pixels = _project_array(data, roles, z)
    pixels = _convert(pixels, path)
    return pixels, _ome_channel_names(tif, pixels.shape[0])


def _layout(path, shape, letters, explicit):
    """One role per dimension: 'Z', 'C', 'Y', 'X', or '1' (size 1, squeezed away)."""
    if explicit:
        bad = sorted(set(letters) - _AXES_LETTERS)
        if bad or len(letters) != len(shape):
            why = f"unknown letter(s) {''.join(bad)}" if bad else f"the image has {len(shape)} dimensions {shape}"
            raise ProtlocError(f"{path}: --axes {letters} does not fit: {why}")
    elif len(letters or "") != len(shape):
        letters = "Q" * len(shape)
    roles = [_ROLES.get(a, "?") for a in letters]
    for i, n in enumerate(shape):
        if roles[i] == "T" and n > 1:
            raise ProtlocError(f"{path}: has {n} time points; protloc reads one time point per file")
        if n == 1 and roles[i] not in "YX":
            roles[i] = "1"
    unknown = [i for i, r in enumerate(roles) if r == "?"]
    named_ok = roles.count("Y") == 1 and roles.count("X") == 1 and roles.count("Z") <= 1
    if explicit and not named_ok:
        raise ProtlocError(f"{path}: --axes {letters} must name Y and X once and Z at most once")
    if named_ok and len(unknown) <= 1:
        if not unknown:
            return roles
        # one unknown axis next to named ones ('QYX', 'ZQYX'): it is whichever of C, Z is missing
        for missing in "CZ":
            if missing not in roles:
                roles[unknown[0]] = missing
                return roles
    return _shape_rules(path, shape)


def _shape_rules(path, shape):
    """Axes from the shape alone: YX; YXC (RGB-like: last <= 4 < first) or CYX; ZCYX, or CZYX
    when dim0 <= 4 < dim1."""
    dims = [i for i, n in enumerate(shape) if n != 1]
    if len(dims) < 2:  # a 1-pixel-wide image: keep the last two dimensions as Y, X
        dims = list(range(len(shape)))[-2:]
    roles = ["1"] * len(shape)
    sizes = [shape[i] for i in dims]
    if len(dims) == 2:
        named = "YX"
    elif len(dims) == 3:
        named = "YXC" if sizes[2] <= 4 < sizes[0] else "CYX"
    elif len(dims) == 4:
        named = "CZYX" if sizes[0] <= 4 < sizes[1] else "ZCYX"
    else:
        raise ProtlocError(f"{path}: cannot tell the axes of shape {tuple(shape)}; name them with --axes")
    for i, r in zip(dims, named):
        roles[i] = r
    return roles


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
    proj = _Projection(z if "Z" in roles else "max", stack.shape[1], stack.shape[0])
    for zi in range(stack.shape[0]):
        if proj.wants(zi):
            for c in range(stack.shape[1]):
                proj.add(c, stack[zi, c])
    return proj.result()


def _project_pages(series, shape, roles, z):
    """Project page by page when the pages are exactly the leading (Z / C) axes, the common
    case for multi-page stacks; None when they are not (then the caller reads the series)."""
    pages = series.pages
    n = len(pages)
    if n < 2 or any(p is None for p in pages):
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
    proj = _Projection(z if "Z" in roles else "max", math.prod(c_lead) * nc_page, nz)
    for i, page in enumerate(pages):
        idx = np.unravel_index(i, lead)
        zi = next((int(idx[j]) for j, r in enumerate(lead_roles) if r == "Z"), 0)
        if not proj.wants(zi):
            continue  # 'middle' decodes only the middle slice's pages
        ci = int(np.ravel_multi_index([idx[j] for j in c_dims], c_lead)) if c_dims else 0
        block = _to_zcyx(page.asarray().reshape(page_shape), roles[k:])[0]
        for c in range(nc_page):
            proj.add(ci * nc_page + c, block[c])
    return proj.result()


def _read_micromanager(tif, path, z, max_pixels):
    """Pages grouped by ChannelIndex (in order of first appearance), projected over SliceIndex.
    None when the pages lack the metadata (then the file is read like any other)."""
    keys = []
    for page in tif.pages:
        tag = page.tags.get(_MM_TAG)
        meta = tag.value if tag is not None else None
        if not isinstance(meta, dict) or "SliceIndex" not in meta or len(page.shape) != 2:
            return None
        keys.append((meta.get("ChannelIndex"), int(meta["SliceIndex"]), meta.get("FrameIndex", 0)))
    frames = {f for _, _, f in keys}
    if len(frames) > 1:
        raise ProtlocError(f"{path}: has {len(frames)} time points; protloc reads one time point per file")
    if any(c is None for c, _, _ in keys):
        # no ChannelIndex: a new channel starts whenever SliceIndex restarts at 0
        channel, previous, restarted = -1, None, []
        for _, s, _ in keys:
            if previous is None or s <= previous:
                channel += 1
            previous = s
            restarted.append(channel)
        keys = [(c, s, f) for c, (_, s, f) in zip(restarted, keys)]
    channels = list(dict.fromkeys(c for c, _, _ in keys))
    y, x = tif.pages[0].shape
    _check_size(path, len(keys) * y * x, max_pixels)
    slices = {c: sorted({s for cc, s, _ in keys if cc == c}) for c in channels}
    middle = {c: s[len(s) // 2] for c, s in slices.items()}
    has_z = any(len(s) > 1 for s in slices.values())
    proj = _Projection(z if has_z else "max", len(channels), 1)
    for page, (c, s, _) in zip(tif.pages, keys):
        if z == "middle" and s != middle[c]:
            continue
        plane = page.asarray()
        if plane.shape != (y, x):
            raise ProtlocError(f"{path}: MicroManager pages differ in size ({plane.shape} vs {(y, x)})")
        proj.add(channels.index(c), plane)
    return proj.result()


class _Projection:
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


def _convert(a, source):
    """Keep uint8 / uint16 / float32 (native byte order); bool -> uint8; other numbers -> float32."""
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


def _ome_channel_names(tif, n_channels):
    """OME Channel Names of the first image, raw as stored; None unless one per channel."""
    if not tif.is_ome or not tif.ome_metadata:
        return None
    try:
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        image = image[0] if isinstance(image, list) else image
        channels = image["Pixels"]["Channel"]
    except (KeyError, IndexError, TypeError, ValueError) as e:  # malformed XML: just no names
        log.debug("no OME channel names: %s", e)
        return None
    channels = channels if isinstance(channels, list) else [channels]
    names = [c.get("Name") if isinstance(c, dict) else None for c in channels]
    if len(names) != n_channels or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def _check_size(path, n_pixels, max_pixels):
    if max_pixels is not None and n_pixels > max_pixels:
        raise ProtlocError(f"{path}: declares {n_pixels:,} pixels, more than --max-pixels {max_pixels:,}")


def _reason(e):
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet_tifffile():
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
