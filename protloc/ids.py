"""Row ids and stems: how an embedding row names its image, tile or cell, and a file name its image.

An image's id is its file's path as given (normalized), or the stem `dir/X` of a one-file-per-
channel image (`dir/X_gfp.tif`, `dir/X_rfp.tif`), a plate field's path `plate.zarr/B/3/0`, or a
manifest row's `id` (protloc/source_manifest.py). A tile's row is `ID#tile=K` (tile order,
protloc/tiles.py), a cell's `ID#cell=K` (mask label K, protloc/cells.py). Only a fragment at the
very end is one: `a#1.tif#tile=0` is tile 0 of `a#1.tif`; an image id ending like one is refused.
A stem is a path less its TIFF extension (.tif, .tiff, .ome.tif, .ome.tiff, any case).
"""

from __future__ import annotations

import os
import re

from protloc.errors import ProtlocError

TILE, CELL = "tile", "cell"
FRAGMENT = re.compile(r"#(tile|cell)=(\d+)$")
TIFF_EXTENSIONS = (".tif", ".tiff")  # any case; they cover .ome.tif / .ome.tiff
OME_EXTENSIONS = (".ome.tif", ".ome.tiff")


def tile_id(image_id: str, k: int) -> str:
    """The row id of tile k of an image: `dir/a.tif`, 3 -> `dir/a.tif#tile=3`."""
    return f"{image_id}#{TILE}={k}"


def cell_id(image_id: str, label: int) -> str:
    """The row id of the cell of mask label `label`: `dir/a.tif`, 7 -> `dir/a.tif#cell=7`."""
    return f"{image_id}#{CELL}={label}"


def parse(row_id: str) -> tuple[str, str | None, int | None]:
    """`dir/a.tif#cell=3` -> (`dir/a.tif`, 'cell', 3); an image's own row -> (id, None, None)."""
    m = FRAGMENT.search(row_id)
    return (row_id[:m.start()], m.group(1), int(m.group(2))) if m else (row_id, None, None)


def split_fragment(row_id: str) -> tuple[str, str]:
    """`dir/a.tif#cell=3` -> (`dir/a.tif`, `#cell=3`); an image's own row -> (id, "")."""
    m = FRAGMENT.search(row_id)
    return (row_id[:m.start()], m.group()) if m else (row_id, "")


def image_of(row_id: str) -> str:
    """`dir/a.tif#tile=3` (or `#cell=3`) -> `dir/a.tif`: the image of a row; an image's own row as it is."""
    return split_fragment(row_id)[0]


def check_image_id(image_id: str) -> None:
    """Refuse an image whose id ends like a tile or cell fragment (`x#tile=3`): its rows would be
    taken for tile 3 of the image `x`."""
    if FRAGMENT.search(image_id):
        raise ProtlocError(f"{image_id}: an image name ending in #tile=K or #cell=K would read as a tile or cell "
                           "of another image; rename the file")


def stem(path: str) -> str:
    """The path without its TIFF extension: 'd/X_gfp.OME.TIF' -> 'd/X_gfp'; another path as it is."""
    lower = path.lower()
    ext = next((e for e in OME_EXTENSIONS + TIFF_EXTENSIONS if lower.endswith(e)), "")
    return path[:len(path) - len(ext)]


def file_stem(image_id: str) -> str:
    """The file name of an image without its TIFF extension: 'd/X.tif' -> 'X' (a group stem 'd/X' -> 'X')."""
    return os.path.basename(stem(image_id))


def group_stem(path: str, suffixes: list[str]) -> tuple[str, int] | None:
    """A file of a one-file-per-channel image -> (its group's stem, the index of its suffix):
    'd/X_gfp.tif', ['rfp', 'gfp'] -> ('d/X', 1). Suffixes match in any case; None when the name
    ends in none of them, or is nothing but one. A name without a TIFF extension loses its own."""
    base = stem(path) if path.lower().endswith(TIFF_EXTENSIONS) else os.path.splitext(path)[0]
    matching = [i for i, s in enumerate(suffixes) if base.lower().endswith("_" + s.lower())]
    if not matching:
        return None
    k = max(matching, key=lambda i: len(suffixes[i]))  # with 'rfp' and 'b_rfp', 'a_b_rfp' is the 'b_rfp' of 'a'
    cut = len(suffixes[k]) + 1
    return None if len(os.path.basename(base)) == cut else (base[:-cut], k)
