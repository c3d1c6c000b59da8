"""What the command line's DATA arguments mean: a list of images to read, one `Source` each.

DATA is any mix of files, directories and `-` (paths read from stdin, one per line). Each input
format is one reader module behind the same few functions; this module only dispatches:

    protloc/source_manifest.py  a `.csv` / `.tsv` manifest: one image per row (its `path`, or one
                                column per named channel), other columns carried as `Source.meta`
    protloc/source_zarr.py      an OME-Zarr image or HCS plate (a folder named `*.zarr`, or one
                                holding NGFF metadata): one image, or one per field of every well
    protloc/source_tiff.py      any other file: a TIFF (companions of multi-file OME-TIFFs left
                                out; one-file-per-channel files grouped by --channel-suffixes)

Each module has `is_input(path)` (does it claim this DATA path), `found_in_folder(name)` (what a
folder search takes) and `sources(...)`; the image formats (TIFF, OME-Zarr) also `read(...)`.
A directory that no format claims is searched recursively (symbolic links to folders followed,
hidden entries skipped, sorted by path components) for TIFF files and `*.zarr` folders (not
searched inside). A file reached twice (a folder and a file in it, a relative and an absolute
path, a link; a manifest row and a file given) is one image, at its first place. Discovery only
lists images (reading metadata where a format needs it to know its images: OME-TIFF's first
IFD, OME-Zarr's plate and well metadata, a manifest's rows); the pixels are read later, one
image at a time, by `read_source`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TextIO

from protloc.errors import ProtlocError
from protloc.ids import check_image_id
from protloc.tiff import DEFAULT_MAX_PIXELS, Image, read_channel_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    id: str                                  # the normalized path, the stem of a channel group, a manifest's id
    files: tuple[str, ...]                   # one file (or OME-Zarr folder), or one per channel in name order
    channel_names: tuple[str, ...] | None    # canonical names of a per-channel source; None for one file
    # what the input says about the image beyond its pixels (a manifest's other columns, a plate's well),
    # carried into the embeddings' per-row metadata
    meta: dict[str, str] = field(default_factory=dict, compare=False)


# the reader modules import Source from here
from protloc import source_manifest, source_tiff, source_zarr  # noqa: E402

FORMATS = (source_manifest, source_zarr, source_tiff)  # the first whose is_input claims a path reads it


def discover(inputs: list[str], stdin: TextIO | None = None,
             channel_suffixes: list[str] | None = None) -> list[Source]:
    """Expand files, directories, manifests, OME-Zarr inputs and `-` into sources, in the order
    given (directories sorted); an image met twice is kept at its first position, with a warning."""
    if not inputs:
        raise ProtlocError("no input images given (name TIFF files, directories, manifests, OME-Zarr, or - for stdin)")
    entries: dict[str, str] = {}  # real path -> the path as first given, in order
    for item in inputs:
        if item == "-":
            lines = (stdin if stdin is not None else sys.stdin).read().splitlines()
            paths = [line.strip() for line in lines if line.strip()]
        else:
            paths = [item]
        for path in paths:
            for f in _expand(path):
                first = entries.setdefault(os.path.realpath(f), f)
                if first != f:
                    log.warning("%s: the same file as %s; read once", f, first)
    if not entries:
        raise ProtlocError("no input images given (stdin listed no paths)")
    suffixes = [s.strip().lstrip("_") for s in channel_suffixes or [] if s.strip().lstrip("_")]
    paths = list(entries.values())
    formats = [_format(p) for p in paths]
    # TIFFs are decided together (companions, channel groups): each source sits where its first file did
    position = {p: (i, 0) for i, p in enumerate(paths)}
    tiffs = source_tiff.sources([p for p, f in zip(paths, formats) if f is source_tiff], suffixes)
    keyed = [(min(position[f] for f in s.files), s) for s in tiffs]
    keyed += [((i, j), s) for i, (p, f) in enumerate(zip(paths, formats)) if f is not source_tiff
              for j, s in enumerate(f.sources(p))]
    sources, seen = [], {}
    for _, s in sorted(keyed, key=lambda k: k[0]):
        key = tuple(os.path.realpath(f) for f in s.files)
        if key in seen:
            log.warning("%s: the same image as %s; read once", s.id, seen[key])
            continue
        seen[key] = s.id
        check_image_id(s.id)
        sources.append(s)
    if not sources:
        raise ProtlocError(f"no input images in {', '.join(inputs)}")
    return sources


def inputs_digest(sources: list[Source], with_stat: bool = False) -> str:
    """A digest of the input list, in order: each source's id and files, and with `with_stat` each
    file's size and modification time (a file changed since gives another digest)."""
    h = hashlib.sha256()
    for s in sources:
        h.update(json.dumps([s.id, list(s.files)]).encode())
        if with_stat:
            h.update(json.dumps([[st.st_size, st.st_mtime_ns] for st in map(os.stat, s.files)]).encode())
    return h.hexdigest()


def read_source(src: Source, z: str = "max", axes: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                series: int | None = None, level: int = 0) -> Image:
    """Read the pixels of one source as a (C, Y, X) image, whatever its format: `level` is an
    OME-Zarr image's resolution level (0: full), `series` a TIFF's (protloc.tiff.read_tiff)."""
    if src.channel_names is None:
        reader = source_zarr if source_zarr.is_input(src.files[0]) else source_tiff
        return reader.read(src.files[0], z, axes, max_pixels, series, level)
    image = read_channel_files(src.id, list(src.files), z, axes, max_pixels, series)
    image.channel_names = list(src.channel_names)
    return image


def _format(path: str):
    return next(f for f in FORMATS if f.is_input(path))


def _expand(path: str) -> list[str]:
    """An input a format claims -> itself; another directory -> its TIFFs and OME-Zarr folders,
    recursively, sorted; a missing path is an error."""
    if not os.path.exists(path):
        raise ProtlocError(f"{path}: no such file or directory")
    if not os.path.isdir(path) or source_zarr.is_input(path):
        return [os.path.normpath(path)]
    found, seen = [], set()
    for root, dirs, names in os.walk(path, followlinks=True):
        seen.add(os.path.realpath(root))
        # hidden folders are pruned, and folders met before (a link back up would never end)
        dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in seen]
        images = [d for d in dirs if any(f.found_in_folder(d) for f in FORMATS if f is not source_tiff)]
        dirs[:] = [d for d in dirs if d not in images]  # an OME-Zarr folder is one input, not searched inside
        found += [os.path.join(root, n) for n in images + [n for n in names if source_tiff.found_in_folder(n)]
                  if not n.startswith(".")]
    if not found:
        raise ProtlocError(f"{path}: no .tif/.tiff files or .zarr images under this directory")
    # sort by path components, so a folder's files stay together ('a/x' before 'a-b/x')
    return sorted((os.path.normpath(f) for f in found), key=lambda f: f.split(os.sep))
