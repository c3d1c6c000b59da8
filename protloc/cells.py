"""Single cells from segmentation masks: which mask goes with an image, and one crop per cell.

`--cells MASKS` pairs every image with a label image (a mask: 0 is background, every other
value K is one cell, as Cellpose, StarDist or `protloc synth --masks` write them). MASKS is

    a folder   the mask of image `dir/X.tif` (or of the one-file-per-channel image `dir/X`) is
               the file in MASKS named (MASK_NAMES, the usual segmenters' outputs)
                   X, X_mask, X_masks, X_labels  .tif / .tiff   (protloc synth, hand-made)
                   X_cp_masks  .tif / .tiff / .png             (Cellpose: --save_tif, --save_png)
                   X_seg.npy                                   (Cellpose's GUI file)
                   X.stardist  .tif / .tiff                    (StarDist's stardist-predict2d)
               exactly one of them must exist
    {dir}      the same names in each image's own folder (masks beside the images); `{dir}/seg`
               in a folder below each image's
    a pattern  holding {stem} (the image's file name without its TIFF extension, or the stem of
               a channel group) and optionally {dir} (the image's folder), e.g.
               '{dir}/{stem}_cp_masks.png' or 'segmentation/{stem}*.tif'; after substitution
               it must name exactly one file (glob characters allowed)

A mask file is a TIFF, a PNG (decoded with imagecodecs; Cellpose writes 16-bit PNGs) or
Cellpose's `_seg.npy`: a pickled dict, loaded with numpy's allow_pickle for files of that name
only (unpickling runs code a file holds: load only `_seg.npy` files you trust), whose `masks` is
the label image.

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
import struct
from dataclasses import dataclass

import imagecodecs
import numpy as np
import tifffile

from protloc.declared import check_planes
from protloc.errors import ProtlocError
from protloc.ids import TIFF_EXTENSIONS, file_stem
from protloc.sources import Source
from protloc.tiff_messages import TiffMessages

BORDERS = ("skip", "pad")
# what a mask of image X is named in a MASKS folder, after X (see the module doc)
MASK_NAMES = (*(s + e for s in ("", "_mask", "_masks", "_labels", "_cp_masks", ".stardist") for e in TIFF_EXTENSIONS),
              "_cp_masks.png", "_seg.npy")
CELLPOSE_SEG = "_seg.npy"  # Cellpose's GUI file: a pickled dict (read_mask)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_spec(spec: str) -> None:
    """MASKS must be a folder, {dir} (each image's folder), or a pattern naming files by {stem}."""
    if not os.path.isdir(spec) and "{stem}" not in spec and "{dir}" not in spec:
        raise ProtlocError(f"{spec}: --cells needs a folder of masks, {{dir}} for masks beside the images, or a "
                           f"pattern with {{stem}} (e.g. 'masks/{{stem}}_cp_masks.tif'); this is none of them")


def find_mask(image_id: str, spec: str) -> str:
    """The mask file of an image (protloc.sources.Source.id) under MASKS `spec`; never the image itself."""
    stem = file_stem(image_id)
    if "{stem}" not in spec:  # a folder, or a folder per image ({dir})
        folder = spec.replace("{dir}", os.path.dirname(image_id) or ".")
        found = [p for name in MASK_NAMES if os.path.isfile(p := os.path.join(folder, stem + name))]
        wanted = os.path.join(folder, f"{stem}{{{','.join(MASK_NAMES)}}}")
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
    """A label image (TIFF, PNG or Cellpose `_seg.npy`) as (Y, X) int64, checked against the image's
    (Y, X) `shape`. A file of several series, or whose data are cut short, is refused like any other damage."""
    if path.endswith(CELLPOSE_SEG):
        mask = _read_cellpose_seg(path)
    elif path.lower().endswith(".png"):
        mask = _read_png(path, max_pixels)
    else:
        mask = _read_tiff_mask(path, max_pixels)
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


def _read_tiff_mask(path: str, max_pixels: int) -> np.ndarray:
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
    return mask


def _read_png(path: str, max_pixels: int) -> np.ndarray:
    """A PNG label image (Cellpose's `_cp_masks.png`: 16-bit grey), its size checked before decoding."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != PNG_SIGNATURE or len(data) < 24:
        raise ProtlocError(f"{path}: not a PNG file")
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    if width * height > max_pixels:
        raise ProtlocError(f"{path}: mask of {height}x{width} pixels is larger than --max-pixels")
    try:
        return np.squeeze(imagecodecs.png_decode(data))
    except Exception as e:  # noqa: BLE001 - a damaged file can make the decoder raise anything
        raise ProtlocError(f"{path}: not a readable PNG mask ({type(e).__name__}: {e})") from None


def _read_cellpose_seg(path: str) -> np.ndarray:
    """The `masks` of Cellpose's GUI file (np.save of a dict: a pickle, so only for this file name)."""
    try:
        seg = np.load(path, allow_pickle=True)
        seg = seg.item() if seg.dtype == object and seg.shape == () else seg
    except Exception as e:  # noqa: BLE001 - a damaged file can make numpy or pickle raise anything
        raise ProtlocError(f"{path}: not a readable Cellpose _seg.npy file ({type(e).__name__}: {e})") from None
    if not isinstance(seg, dict) or not isinstance(seg.get("masks"), np.ndarray):
        raise ProtlocError(f"{path}: a Cellpose _seg.npy file holds a dict with 'masks'; this one does not")
    return np.squeeze(seg["masks"])


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
