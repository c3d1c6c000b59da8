"""Micro-Manager TIFFs: each page's own JSON metadata (tag 51123) says which channel, z-slice,
time point and stage position it holds.

`page_planes` turns that into the (channel, z-slice) of every page, and refuses what protloc
does not merge into one image or what does not add up:

- more than one time point (FrameIndex) or stage position (PositionIndex): one image per file;
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


def page_planes(pages, path: str, summary: dict | None = None) -> list[tuple[object, int]] | None:
    """(channel, z-slice) of each page, channels labelled as the file labels them; None when the
    pages lack per-page metadata (then the file is read like any other)."""
    keys = []
    for page in pages:
        tag = page.tags.get(MM_TAG)
        meta = tag.value if tag is not None else None
        if not isinstance(meta, dict) or "SliceIndex" not in meta or len(page.shape) != 2:
            return None
        keys.append((meta.get("ChannelIndex"), int(meta["SliceIndex"]), meta.get("FrameIndex", 0),
                     meta.get("PositionIndex", 0)))
    frames = {k[2] for k in keys}
    if len(frames) > 1:
        raise time_points(path, len(frames))
    places = {k[3] for k in keys}
    if len(places) > 1:
        raise positions(path, len(places), "stage positions (Micro-Manager PositionIndex)")
    planes = [(c, s) for c, s, _, _ in keys]
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
