"""TIFF input: which TIFF files are images, and how one-file-per-channel files group into one.

A file reached among DATA is one image, usually; with `--channel-suffixes gfp,rfp`, the files
`X_gfp.tif` and `X_rfp.tif` are grouped into one image `X` whose channels are named from the
suffixes. A multi-file OME-TIFF image is one image: a file that holds part of an image another
input reads is left out (a BinaryOnly companion whose MetadataFile is given and holds planes of
its image, or a file whose image an earlier input's OME-XML spreads over both); a file of the set
that holds whole images of its own (Micro-Manager's stage positions, a plate's wells) stays an
image. Discovery only lists files (and reads the first IFD of `.ome.tif` files); the pixels are
read later by protloc/tiff.py.
"""

from __future__ import annotations

import os

from protloc.channels import canonical
from protloc.errors import ProtlocError
from protloc.ids import OME_EXTENSIONS, TIFF_EXTENSIONS, group_stem
from protloc.ome import read_ome_xml
from protloc.sources import Source
from protloc.tiff import Image, read_tiff

__all__ = ["is_input", "found_in_folder", "sources", "read"]


def is_input(path: str) -> bool:
    """Every file is read as a TIFF unless another format claims it (tiff.py refuses what it is not)."""
    return not os.path.isdir(path)


def found_in_folder(name: str) -> bool:
    """A file name a folder search takes as a TIFF image."""
    return name.lower().endswith(TIFF_EXTENSIONS)


def sources(files: list[str], channel_suffixes: list[str]) -> list[Source]:
    """The images among TIFF `files` (distinct, in discovery order): companions left out, and with
    `channel_suffixes` grouped into one source per stem."""
    files = _without_companions(files)
    return _group(files, channel_suffixes) if channel_suffixes else [Source(f, (f,), None) for f in files]


def read(path: str, z: str, axes: str | None, max_pixels: int, series: int | None, level: int) -> Image:
    """One TIFF as a (C, Y, X) image (protloc.tiff.read_tiff); `level` is OME-Zarr's, not a TIFF's
    (a TIFF pyramid's levels are series: --series)."""
    return read_tiff(path, z, axes, max_pixels, series)


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
    out = []
    for stem, group in groups.items():
        for k, s in enumerate(suffixes):
            if k not in group:
                raise ProtlocError(f"{stem}: missing the _{s} file ({flag})")
        out.append(Source(stem, tuple(group[k] for k in range(len(suffixes))), names))
    return out
