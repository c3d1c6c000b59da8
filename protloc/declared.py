"""What a TIFF's metadata declare against what the file holds: agree, or the file is refused.

tifffile builds an image from metadata and reads what it can: planes a truncated file lost
come back as zeros, extra planes are dropped, a companion file that is missing is zero-filled.
Each check here compares one kind of declaration with the pages actually present and raises a
ProtlocError naming the file and both counts:

- tifffile's shaped JSON (`{"shape": [...]}` on a series' first page) against the pages that follow it;
- ImageJ `images=` and channels x slices x frames against the file's pages;
- OME-XML: the files its TiffData name exist and have a UUID each, every page of the file is
  mapped to an image, and the chosen image has a page for every plane that SizeZ x SizeC x SizeT declare;
- any series tifffile built: no plane missing (None), without data (zero byte counts) or with data
  past the end of its file (a cut file: some decoders, JPEG's among them, return what they got
  without a word), and every plane of one size and type (a companion file may differ).

Micro-Manager's per-page indices are checked in micromanager.py.
"""

from __future__ import annotations

import functools
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
    """Each UUID of the OME-XML names one file, and the files that hold planes of `path`'s images exist."""
    shared = ome.shared_uuid()
    if shared is not None:
        uuid, names = shared
        raise ProtlocError(f"{path}: corrupt OME-XML: its TiffData give the files {', '.join(names)} the same UUID "
                           f"{uuid} (a UUID names one file)")
    for f in ome.partners(path):
        if not os.path.exists(f):
            raise ProtlocError(f"{path}: its OME-XML puts planes in {f}, which is missing "
                               "(a multi-file OME-TIFF: keep its files together)")


def check_ome_pages(ome: OmeXml, all_series: list, path: str, held: int) -> None:
    """Every one of the `held` pages of `path` belongs to an OME image (else the XML declares fewer
    planes than held)."""
    me = os.path.realpath(path)
    mapped = {p.index for s in all_series if s.kind == "ome" for p in s if p is not None and file_of(p) == me}
    xml = "its OME-XML" if ome.path == path else f"the OME-XML in {ome.path}"
    if not mapped:
        raise ProtlocError(f"{path}: {xml} maps none of the file's {held} pages to an image "
                           "(corrupt OME-XML, or a layout tifffile cannot read)")
    if held > len(mapped):
        raise mismatch(path, f"{xml} (TiffData)", len(mapped), held)


def check_planes(pages: list, path: str, what: str) -> None:
    """Every plane a series calls for is present, with its data inside its file (tifffile fills
    missing ones with zeros), and of one size and type."""
    present = [p for p in pages if p is not None and sum(p.databytecounts) > 0]
    if len(present) < len(pages):
        raise mismatch(path, what, len(pages), len(present))
    first, count = present[0], len(present)
    for i, p in enumerate(present, 1):
        size = p.parent.filehandle.size
        end = max(o + n for o, n in zip(p.dataoffsets, p.databytecounts))
        if end > size:
            raise ProtlocError(f"{path}: truncated or corrupt: the data of plane {i} of {count}{_in(p, path)} end at "
                               f"byte {end:,}, past the end of its file ({size:,} bytes)")
        if (p.shape, p.dtype) != (first.shape, first.dtype):
            raise ProtlocError(f"{path}: metadata and data disagree: plane {i} of {count}{_in(p, path)} is "
                               f"{_kind(p)}, plane 1 is {_kind(first)}")


def file_of(page) -> str:
    """The real path of the file a page lies in (a page of a multi-file OME-TIFF may be in another)."""
    return _realpath(page.parent.filehandle.path)


_realpath = functools.lru_cache(maxsize=256)(os.path.realpath)  # looked up once per file, not per page


def _in(page, path) -> str:
    return "" if file_of(page) == os.path.realpath(path) else f" (in {page.parent.filehandle.path})"


def _kind(page) -> str:
    return f"{' x '.join(map(str, page.shape))} {page.dtype}"
