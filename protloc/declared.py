"""What a TIFF's metadata declare against what the file holds: agree, or the file is refused.

tifffile builds an image from metadata and reads what it can: planes a truncated file lost
come back as zeros, extra planes are dropped, a companion file that is missing is zero-filled.
Each check here compares one kind of declaration with the pages actually present and raises a
ProtlocError naming the file and both counts:

- tifffile's shaped JSON (`{"shape": [...]}` on a series' first page) against the pages that follow it;
- ImageJ `images=` and channels x slices x frames against the file's pages;
- OME-XML: the files its TiffData name exist, every page is mapped to an image, and the chosen
  image has a page for every plane that SizeZ x SizeC x SizeT declare;
- any series tifffile built: no plane missing (None) or without data (zero byte counts).

Micro-Manager's per-page indices are checked in micromanager.py.
"""

from __future__ import annotations

import math
import os

import tifffile
from tifffile.tifffile import shaped_description_metadata  # not re-exported at the top level

from protloc.errors import ProtlocError
from protloc.ome import OmeXml


def mismatch(path: str, what: str, declared: int, held: int, unit: str = "planes") -> ProtlocError:
    """`FILE: truncated or corrupt: WHAT declares N planes but the file holds M` (or, holding more, 'disagree')."""
    why = "truncated or corrupt" if held < declared else "metadata and data disagree"
    return ProtlocError(f"{path}: {why}: {what} declares {declared} {unit} but the file holds {held}")


def check_shaped(tif: tifffile.TiffFile, path: str) -> None:
    """Each shaped series' JSON shape against its pages (those up to the next series' first page)."""
    pages = tif.pages
    total = len(pages)
    starts = []
    for i in range(total):
        page = pages[i]
        text = page.shaped_description if isinstance(page, tifffile.TiffPage) else None
        if text:
            starts.append((i, page, text))
    for k, (i, page, text) in enumerate(starts):
        try:
            meta = shaped_description_metadata(text)
            size = math.prod(int(n) for n in meta["shape"])
        except (ValueError, KeyError, TypeError):
            continue  # not tifffile's JSON after all: tifffile reads the file its own way
        plane = math.prod(page.shape)
        if plane == 0 or size % plane:
            continue  # tifffile reports a shape that does not fit its page
        declared = size // plane
        if meta.get("truncated"):  # one IFD; the planes follow its data contiguously
            held = (tif.filehandle.size - page.dataoffsets[0]) // max(page.nbytes, 1) if page.dataoffsets else 0
            held = min(held, declared)
        else:
            held = (starts[k + 1][0] if k + 1 < len(starts) else total) - i
        if held != declared:
            raise mismatch(path, f"its tifffile metadata (shape {tuple(meta['shape'])})", declared, held, "pages")


def check_imagej(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries, path: str) -> None:
    """ImageJ `images=` and channels x slices x frames against the file's pages."""
    meta = tif.imagej_metadata
    if not meta:
        return
    try:
        c, z, t = (int(meta.get(k, 1)) for k in ("channels", "slices", "frames"))
        images = int(meta["images"]) if "images" in meta else None
    except (TypeError, ValueError):
        return  # tifffile reports metadata it cannot parse
    detail = " x ".join(f"{n} {name}" for n, name in ((c, "channels"), (z, "slices"), (t, "frames")) if n > 1)
    samples = tif.pages.first.samplesperpixel
    declared = z * t if c > 1 and samples == c else c * z * t  # channels stored as each page's samples
    if images is not None and images not in (declared, c * z * t):
        raise ProtlocError(f"{path}: corrupt ImageJ metadata: images={images} but {detail or '1 image'}")
    if declared == 1 and images is None:
        return  # a plain image, or a stack that declares nothing
    if series.kind == "imagej" and series.is_truncated:
        return  # one IFD, planes stored contiguously after it: tifffile checked that they are all there
    held = len(tif.pages)
    if held != declared:
        raise mismatch(path, f"its ImageJ metadata ({detail or f'images={images}'})", declared, held)


def check_ome_files(ome: OmeXml, path: str) -> None:
    """A BinaryOnly companion is not an image of its own; every file the OME-XML names must exist."""
    master = ome.master()
    if master is not None:
        raise ProtlocError(f"{path}: is a companion of the multi-file OME-TIFF {master} (it holds pixels only, "
                           "its metadata are there): give that file instead")
    for f in ome.files():
        if not os.path.exists(f):
            raise ProtlocError(f"{path}: its OME-XML puts planes in {f}, which is missing "
                               "(a multi-file OME-TIFF: keep its files together)")


def check_ome_pages(tif: tifffile.TiffFile, all_series: list, path: str) -> None:
    """Every page of the file belongs to an OME image (else the XML declares fewer planes than held)."""
    mapped = {p.index for s in all_series if s.kind == "ome" for p in s if p is not None and p.parent is tif}
    held = len(tif.pages)
    if not mapped:
        raise ProtlocError(f"{path}: its OME-XML maps none of the file's {held} pages to an image "
                           "(corrupt OME-XML, or a layout tifffile cannot read)")
    if held > len(mapped):
        raise mismatch(path, "its OME-XML (TiffData)", len(mapped), held)


def check_planes(pages: list, path: str, what: str) -> None:
    """Every plane a series calls for is present, with data (tifffile fills missing ones with zeros)."""
    held = sum(1 for p in pages if p is not None and sum(p.databytecounts) > 0)
    if held < len(pages):
        raise mismatch(path, what, len(pages), held)
