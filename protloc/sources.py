"""What the command line's DATA arguments mean: a list of images to read, one row each.

DATA is any mix of TIFF files, directories (searched recursively, symbolic links to folders
followed, sorted, hidden entries skipped) and `-` (paths read from stdin, one per line). A file
reached twice (a folder and a file in it, a relative and an absolute path, a link) is one image,
at its first place. Each image becomes a `Source`: usually one file, or, with
`--channel-suffixes gfp,rfp`, the files `X_gfp.tif` and `X_rfp.tif` grouped into one image `X`
whose channels are named from the suffixes. A multi-file OME-TIFF image is one image: a file
that holds part of an image another input reads is left out (a BinaryOnly companion whose
MetadataFile is given and holds planes of its image, or a file whose image an earlier input's
OME-XML spreads over both); a file of the set that holds whole images of its own (Micro-
Manager's stage positions, a plate's wells) stays an image. Discovery only lists files (and
reads the first IFD of `.ome.tif` files); the pixels are read later, one image at a time, by
`read_source`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TextIO

from protloc.channels import canonical
from protloc.errors import ProtlocError
from protloc.ids import OME_EXTENSIONS, TIFF_EXTENSIONS, check_image_id, group_stem
from protloc.ome import read_ome_xml
from protloc.tiff import DEFAULT_MAX_PIXELS, Image, read_channel_files, read_tiff

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Source:
    id: str                                  # the normalized path, or the stem of a channel group
    files: tuple[str, ...]                   # one file, or one per channel in suffix order
    channel_names: tuple[str, ...] | None    # canonical names from the suffixes; None for single files
    # what the input says about the image beyond its pixels (a manifest's other columns, a plate's well),
    # carried into the embeddings' per-row metadata
    meta: dict[str, str] = field(default_factory=dict, compare=False)


def discover(inputs: list[str], stdin: TextIO | None = None,
             channel_suffixes: list[str] | None = None) -> list[Source]:
    """Expand files, directories and `-` into sources, in the order given (directories sorted);
    a path met twice is kept at its first position."""
    if not inputs:
        raise ProtlocError("no input images given (name TIFF files, directories, or - for stdin)")
    files: dict[str, str] = {}  # real path -> the path as first given, in order
    for item in inputs:
        if item == "-":
            lines = (stdin if stdin is not None else sys.stdin).read().splitlines()
            paths = [line.strip() for line in lines if line.strip()]
        else:
            paths = [item]
        for path in paths:
            for f in _expand(path):
                first = files.setdefault(os.path.realpath(f), f)
                if first != f:
                    log.warning("%s: the same file as %s; read once", f, first)
    if not files:
        raise ProtlocError("no input images given (stdin listed no paths)")
    files = dict.fromkeys(_without_companions(list(files.values())))
    suffixes = [s.strip().lstrip("_") for s in channel_suffixes or [] if s.strip().lstrip("_")]
    sources = _group(list(files), suffixes) if suffixes else [Source(f, (f,), None) for f in files]
    for s in sources:
        check_image_id(s.id)
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


def read_source(src: Source, z: str = "max", axes: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, series: int | None = None) -> Image:
    """Read the pixels of one source as a (C, Y, X) image."""
    if src.channel_names is None:
        return read_tiff(src.files[0], z, axes, max_pixels, series)
    image = read_channel_files(src.id, list(src.files), z, axes, max_pixels, series)
    image.channel_names = list(src.channel_names)
    return image


def _expand(path: str) -> list[str]:
    """A file -> itself (whatever its extension); a directory -> its TIFFs, recursively, sorted."""
    if os.path.isdir(path):
        found, seen = [], set()
        for root, dirs, names in os.walk(path, followlinks=True):
            seen.add(os.path.realpath(root))
            # hidden folders are pruned, and folders met before (a link back up would never end)
            dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in seen]
            found += [os.path.join(root, n) for n in names
                      if not n.startswith(".") and n.lower().endswith(TIFF_EXTENSIONS)]
        if not found:
            raise ProtlocError(f"{path}: no .tif/.tiff files under this directory")
        # sort by path components, so a folder's files stay together ('a/x' before 'a-b/x')
        return sorted((os.path.normpath(f) for f in found), key=lambda f: f.split(os.sep))
    if not os.path.exists(path):
        raise ProtlocError(f"{path}: no such file or directory")
    return [os.path.normpath(path)]


def _without_companions(files: list[str]) -> list[str]:
    """The files less those whose multi-file OME-TIFF image another input reads (see the module doc)."""
    real = os.path.realpath
    xml = {f: read_ome_xml(f) if f.lower().endswith(OME_EXTENSIONS) else None for f in files}
    # a BinaryOnly file is read by whichever input (its master, renamed or not) spreads its image over it
    read_by_others = {real(p) for f, ome in xml.items() if ome is not None and ome.master() is None
                      for p in ome.partners(f)}
    kept, covered = [], set()
    for f in files:
        ome = xml[f]
        if ome is None:
            kept.append(f)
        elif ome.master() is not None:  # pixels only
            if real(f) not in read_by_others:
                kept.append(f)
        elif real(f) not in covered:  # else an earlier input reads it with its own planes
            kept.append(f)
            covered.update(real(p) for p in ome.partners(f))
    return kept


def _group(files: list[str], suffixes: list[str]) -> list[Source]:
    """Group `<stem>_<suffix>.tif` files into one source per stem, channels in suffix order."""
    flag = f"--channel-suffixes {','.join(suffixes)}"
    lowered = [s.lower() for s in suffixes]
    if len(set(lowered)) != len(lowered):
        raise ProtlocError(f"{flag}: a suffix repeats")
    names = tuple(canonical(s) for s in suffixes)
    if len(set(names)) != len(names):
        raise ProtlocError(f"{flag}: suffixes name the same channel twice ({', '.join(names)})")
    groups: dict[str, dict[int, str]] = {}  # stem -> {suffix index: file}, in discovery order
    for f in files:
        if (found := group_stem(f, suffixes)) is None:
            expected = " or ".join("_" + s for s in suffixes)
            raise ProtlocError(f"{f}: file name does not end in {expected} ({flag})")
        stem, k = found
        group = groups.setdefault(stem, {})
        if k in group:
            raise ProtlocError(f"{stem}: two _{suffixes[k]} files ({group[k]}, {f})")
        group[k] = f
    sources = []
    for stem, group in groups.items():
        for k, s in enumerate(suffixes):
            if k not in group:
                raise ProtlocError(f"{stem}: missing the _{s} file ({flag})")
        sources.append(Source(stem, tuple(group[k] for k in range(len(suffixes))), names))
    return sources
