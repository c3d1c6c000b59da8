"""Single cells from segmentation masks: which mask goes with an image, and one crop per cell.

`--cells MASKS` pairs every image with a label image (a mask: 0 is background, every other
value K is one cell, as Cellpose's `_cp_masks`, StarDist's labels or `protloc synth --masks`
write them). MASKS is

    a folder   the mask of image `dir/X.tif` (or of the one-file-per-channel image `dir/X`) is
               the TIFF in MASKS named X, X_mask, X_masks, X_cp_masks or X_labels (.tif or
               .tiff); exactly one of them must exist
    a pattern  holding {stem} (the image's file name without its TIFF extension, or the stem of
               a channel group) and optionally {dir} (the image's folder), e.g.
               '{dir}/{stem}_cp_masks.tif' or 'segmentation/{stem}*.tif'; after substitution
               it must name exactly one file (glob characters allowed)

A mask must be a 2-D integer label image of the image's height and width (integral float
values are accepted). A file among DATA that is the mask of another image is left out of the
images, so masks may sit beside the images (`X_cp_masks.tif` next to `X.tif`) or below them.

Each cell K of the mask, in ascending K, becomes one view `path#cell=K`: a size x size crop
whose centre pixel (size // 2, size // 2) is the cell's centroid rounded to the nearest pixel.
A cell cut by the image border (its mask touches the border, or its crop reaches past it) is
left out (border="skip") or kept with the part of the crop outside the image set to zero
(border="pad"). With `mask_outside`, every pixel of the crop not in cell K (background and
neighbouring cells) is set to zero as well. Zero is a stored pixel value, as when an image is
multiplied by the cell's mask; it is then normalized with the whole image's statistics, like
every pixel (the crops of an image share its normalization, as tiles do).

Per cell, the view's meta records `label` K, `centroid` (y, x) in image pixels (float), `bbox`
(y0, x0, y1, x1), half-open, and `origin`, the crop's top-left corner (y, x) in the image
(negative, or past the border, when padded).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import tifffile

from protloc.declared import check_planes
from protloc.errors import ProtlocError
from protloc.ids import TIFF_EXTENSIONS, file_stem
from protloc.sources import Source
from protloc.tiff_messages import TiffMessages

BORDERS = ("skip", "pad")
MASK_SUFFIXES = ("", "_mask", "_masks", "_cp_masks", "_labels")  # folder matching, in this order


def check_spec(spec: str) -> None:
    """MASKS must be a folder or a pattern naming files by {stem}."""
    if not os.path.isdir(spec) and "{stem}" not in spec:
        raise ProtlocError(f"{spec}: --cells needs a folder of masks or a pattern with {{stem}} (e.g. "
                           f"'masks/{{stem}}_cp_masks.tif'); this is neither")


def find_mask(image_id: str, spec: str) -> str:
    """The mask file of an image (protloc.sources.Source.id) under MASKS `spec`; never the image itself."""
    stem = file_stem(image_id)
    if os.path.isdir(spec):
        found = [p for s in MASK_SUFFIXES for e in TIFF_EXTENSIONS
                 if os.path.isfile(p := os.path.join(spec, stem + s + e))]
        wanted = os.path.join(spec, f"{stem}[{'|'.join(MASK_SUFFIXES[1:])}].tif")
    else:
        wanted = spec.replace("{dir}", os.path.dirname(image_id) or ".").replace("{stem}", stem)
        found = sorted(glob.glob(wanted)) if any(c in wanted for c in "*?[") else \
            [wanted] if os.path.isfile(wanted) else []
    found = [p for p in found if os.path.abspath(p) != os.path.abspath(image_id)]
    if not found:
        raise ProtlocError(f"{image_id}: no mask {wanted} (--cells)")
    if len(found) > 1:
        raise ProtlocError(f"{image_id}: several masks match: {', '.join(found[:3])} (--cells)")
    return os.path.normpath(found[0])


def image_sources(sources: list[Source], spec: str) -> list[Source]:
    """The sources that are images: one that is the mask of another is left out. Two images whose
    mask is one file (two images of one name, with a MASKS folder) are an error."""
    check_spec(spec)
    image_of: dict[str, str] = {}  # mask file -> the image it belongs to
    for s in sources:
        try:
            mask = os.path.abspath(find_mask(s.id, spec))
        except ProtlocError:
            continue  # an image without a mask fails (or is skipped) when it is read
        other = image_of.setdefault(mask, s.id)
        if other != s.id:
            raise ProtlocError(f"{s.id}: takes the mask {mask} of {other}; with images of one name in several "
                               "folders use a pattern with {dir} and {stem} for --cells")
    images = [s for s in sources if not any(os.path.abspath(f) in image_of for f in s.files)]
    if not images:
        raise ProtlocError(f"{spec}: every input image is a mask of --cells; give the images as DATA")
    return images


def read_mask(path: str, shape: tuple[int, int], image_id: str, max_pixels: int) -> np.ndarray:
    """A label image as (Y, X) int64, checked against the image's (Y, X) `shape`. A file of several
    series, or whose data are cut short, is refused like any other damage."""
    messages = TiffMessages(path)  # tifffile's complaints: a damaged mask is an error, never raw stderr
    try:
        with messages.capture(), tifffile.TiffFile(path) as tif:
            if len(tif.series) != 1:  # never a silent first one
                raise ProtlocError(f"{path}: holds {len(tif.series)} image series; a mask is one 2-D label image")
            declared = tif.series[0].shape
            if int(np.prod(declared)) > max_pixels:
                raise ProtlocError(f"{path}: mask of shape {declared} is larger than --max-pixels")
            check_planes(list(tif.series[0]), path, "its TIFF metadata")
            mask = np.squeeze(tif.series[0].asarray())
    except ProtlocError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file can make any decoder raise anything
        messages.raise_errors()
        raise ProtlocError(f"{path}: not a readable TIFF mask ({type(e).__name__}: {e})") from None
    messages.raise_errors()
    if mask.ndim != 2:
        raise ProtlocError(f"{path}: a mask must be one 2-D label image, got shape {mask.shape}")
    if mask.shape != tuple(shape):
        raise ProtlocError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} pixels but image {image_id} is "
                           f"{shape[0]}x{shape[1]}")
    if mask.dtype.kind == "f" and not (np.isfinite(mask).all() and (mask == np.round(mask)).all()):
        raise ProtlocError(f"{path}: a mask holds integer cell labels; found fractional values")
    if mask.dtype.kind not in "buif":
        raise ProtlocError(f"{path}: unsupported mask pixel type {mask.dtype}")
    mask = mask.astype(np.int64)
    if mask.min() < 0:
        raise ProtlocError(f"{path}: a mask holds labels >= 0 (0 = background); found {mask.min()}")
    return mask


@dataclass
class Cell:
    label: int
    pixels: np.ndarray  # (C, size, size), the image's dtype
    meta: dict  # label, centroid (y, x), bbox (y0, x0, y1, x1), origin (y, x)


def measure(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels (n,), centroids (n, 2) float, bboxes (n, 4) half-open) of the cells, ascending."""
    ys, xs = np.nonzero(mask)
    lab = mask[ys, xs]
    order = np.argsort(lab, kind="stable")
    ys, xs, lab = ys[order], xs[order], lab[order]
    labels, start, count = np.unique(lab, return_index=True, return_counts=True)
    if not len(labels):
        return labels, np.zeros((0, 2)), np.zeros((0, 4), np.int64)
    centroids = np.stack([np.add.reduceat(ys, start), np.add.reduceat(xs, start)], 1) / count[:, None]
    bboxes = np.stack([np.minimum.reduceat(ys, start), np.minimum.reduceat(xs, start),
                       np.maximum.reduceat(ys, start) + 1, np.maximum.reduceat(xs, start) + 1], 1)
    return labels, centroids, bboxes


def cut_cells(pixels: np.ndarray, mask: np.ndarray, size: int, mask_outside: bool = False,
              border: str = "skip") -> list[Cell]:
    """The crops of the cells of `mask` from the (C, Y, X) image, ascending by label."""
    if border not in BORDERS:
        raise ValueError(f"unknown border {border!r}")
    _, height, width = pixels.shape
    out = []
    for label, (cy, cx), bbox in zip(*measure(mask)):
        y0, x0 = int(np.floor(cy + 0.5)) - size // 2, int(np.floor(cx + 0.5)) - size // 2
        cut = (bbox[0] == 0 or bbox[1] == 0 or bbox[2] == height or bbox[3] == width
               or y0 < 0 or x0 < 0 or y0 + size > height or x0 + size > width)
        if cut and border == "skip":
            continue
        # the part of the crop inside the image: rows sy0:sy1 of the image go to rows dy0: of the crop
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y0 + size, height), min(x0 + size, width)
        crop = np.zeros((pixels.shape[0], size, size), pixels.dtype)
        crop[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = pixels[:, sy0:sy1, sx0:sx1]
        if mask_outside:
            inside = np.zeros((size, size), bool)
            inside[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = mask[sy0:sy1, sx0:sx1] == label
            crop[:, ~inside] = 0
        out.append(Cell(int(label), crop, {"label": int(label), "centroid": [float(cy), float(cx)],
                                           "bbox": [int(v) for v in bbox], "origin": [y0, x0]}))
    return out
