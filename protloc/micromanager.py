"""Micro-Manager TIFFs: each page's own JSON metadata (tag 51123) says which channel, z-slice,
time point and stage position it holds: `ChannelIndex`, `SliceIndex`, `FrameIndex` and
`PositionIndex` (Micro-Manager 1.4; 2.0 also writes `Slice` and `Frame`, and `completeCoords`
with every axis of the acquisition, custom ones included). A coordinate a page does not carry is
0, as Micro-Manager saves it; pages may be gray or RGB.

`page_planes` turns that into the (channel, z-slice) of every page, and refuses what protloc
does not merge into one image or what does not add up:

- more than one time point or stage position, or more than one value of any other axis of
  `completeCoords`: one image per file;
- a (channel, slice) pair on two pages, or channels with different numbers of z-slices;
- a summary (the header Micro-Manager writes at the start of its files) whose channels x slices x
  frames differ from the pages of the file's position.

Reference: https://micro-manager.org/Micro-Manager_File_Formats
"""

from __future__ import annotations

import struct
from collections import Counter

import tifffile

from protloc.axes import positions, time_points
from protloc.declared import mismatch
from protloc.errors import ProtlocError

MM_TAG = 51123  # MicroManagerMetadata, a JSON dict per page
# the magic numbers at offset 8 of a Micro-Manager file (multipage TIFF, NDTiff); other TIFFs carry
# the per-page tag without the header, and tifffile's probe for it complains about them
_HEADERS = (54773648, 483729)
PROBE = "<tifffile.read_micromanager_metadata>"  # how tifffile's messages about that probe begin


def has_header(tif: tifffile.TiffFile) -> bool:
    """Whether the file starts with a Micro-Manager header (where a summary may be)."""
    fh = tif.filehandle
    try:
        fh.seek(8)
        return struct.unpack(tif.byteorder + "I", fh.read(4))[0] in _HEADERS
    except (OSError, struct.error):
        return False


def summary(tif: tifffile.TiffFile) -> dict | None:
    """The Summary of a file with a Micro-Manager header; None without one."""
    if not has_header(tif):
        return None
    meta = tifffile.read_micromanager_metadata(tif.filehandle, {"Summary"})
    found = meta.get("Summary")
    return found if isinstance(found, dict) else None


# coordinate -> its keys in a page's metadata, first found wins; `completeCoords` names them
# channel, z, time and position (Micro-Manager 2.0's Coords axes)
_COORDS = {"channel": ("ChannelIndex",), "z": ("SliceIndex", "Slice"), "time": ("FrameIndex", "Frame"),
           "position": ("PositionIndex",)}


def _metadata(page) -> dict | None:
    """A page's Micro-Manager metadata if they hold coordinates."""
    tag = page.tags.get(MM_TAG)
    meta = tag.value if tag is not None else None
    keys = ("completeCoords", *(k for ks in _COORDS.values() for k in ks))
    return meta if isinstance(meta, dict) and any(k in meta for k in keys) else None


def _coords(meta: dict, path: str) -> dict:
    """A page's coordinates: channel (None when absent), z, time, position and any other axis."""
    complete = meta.get("completeCoords")
    coords = dict(complete) if isinstance(complete, dict) else {}
    for axis, keys in _COORDS.items():
        coords[axis] = next((meta[k] for k in keys if k in meta), coords.get(axis))
    try:
        return {a: None if v is None and a == "channel" else int(v or 0) for a, v in coords.items()}
    except (TypeError, ValueError):
        raise ProtlocError(f"{path}: corrupt Micro-Manager metadata: coordinates {coords}") from None


def page_planes(pages, path: str, summary: dict | None = None) -> list[tuple[object, int]] | None:
    """(channel, z-slice) of each page, channels labelled as the file labels them; None when the
    pages carry no Micro-Manager coordinates (then the file is read like any other)."""
    metas = [_metadata(page) for page in pages]
    if all(m is None for m in metas):
        return None
    if any(m is None for m in metas):
        k = next(i for i, m in enumerate(metas) if m is None)
        raise ProtlocError(f"{path}: corrupt Micro-Manager metadata: page {k + 1} of {len(metas)} has no coordinates")
    coords = [_coords(m, path) for m in metas]
    for axis in dict.fromkeys(a for c in coords for a in c):
        values = {c.get(axis, 0) for c in coords}
        if axis in ("channel", "z") or len(values) == 1:
            continue
        if axis == "time":
            raise time_points(path, len(values))
        if axis == "position":
            raise positions(path, len(values), "stage positions (Micro-Manager PositionIndex)")
        raise ProtlocError(f"{path}: holds {len(values)} values of the Micro-Manager axis {axis!r}; "
                           "protloc reads one image per file")
    planes = [(c["channel"], c["z"]) for c in coords]
    if any(c is None for c, _ in planes):
        # no ChannelIndex: a new channel starts whenever SliceIndex restarts
        channel, previous, restarted = -1, None, []
        for _, s in planes:
            if previous is None or s <= previous:
                channel += 1
            previous = s
            restarted.append(channel)
        planes = [(c, s) for c, (_, s) in zip(restarted, planes)]
    repeated = [(plane, n) for plane, n in Counter(planes).items() if n > 1]
    if repeated:
        (c, s), n = repeated[0]
        raise ProtlocError(f"{path}: corrupt Micro-Manager metadata: {n} pages are channel {c}, slice {s}")
    slices = Counter(c for c, _ in planes)
    if len(set(slices.values())) > 1:
        counts = ", ".join(f"channel {c}: {n}" for c, n in slices.items())
        raise ProtlocError(f"{path}: truncated or corrupt: its Micro-Manager channels hold different numbers "
                           f"of z-slices ({counts})")
    if summary:
        _check_summary(summary, len(planes), path)
    return planes


def _check_summary(summary: dict, held: int, path: str) -> None:
    """The summary's channels x slices x frames against the pages of the file's one position (the
    summary is the same in every file of a dataset; each position is usually a file of its own)."""
    try:
        sizes = {k: int(summary.get(k, 1)) for k in ("Channels", "Slices", "Frames")}
    except (TypeError, ValueError):
        return  # no usable counts
    declared = sizes["Channels"] * sizes["Slices"] * sizes["Frames"]
    if declared != held:
        detail = " x ".join(f"{n} {k.lower()}" for k, n in sizes.items())
        raise mismatch(path, f"its Micro-Manager summary ({detail})", declared, held)
