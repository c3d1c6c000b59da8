"""Fields of view as tiles: where the tiles of an image lie, and one mean row per image (of its
tiles, or of its cells: protloc/cells.py).

A large field (an OpenCell 1024 x 1024 projection) holds many cells; resizing it to the model's
224 pixels would blur them away. `--tile T --stride S` cuts it instead into T x T tiles whose
top-left corners lie on a grid of step S (default S = T: no overlap), row by row, left to
right; tile K is the K-th of that order. When the grid does not end at the image's border, one
more row (column) of tiles is placed flush with the bottom (right) border, overlapping its
neighbour, so every pixel is in some tile and every tile is full-size. An image smaller than T
in either dimension has no tiles (an error for that image).

Tiles are cut in the loader (protloc/data.py) from one decoded image at a time and carry their
image's normalization statistics. `mean_per_image` turns the stream of tile (or cell) rows
back into one row per image (`--aggregate mean`); an image's views arrive consecutively, so it
holds one running sum at a time.
"""

from __future__ import annotations

import numpy as np

from protloc.ids import image_of

AGGREGATIONS = ("mean",)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:  # the grid stops short of the border: one more, flush with it
        starts.append(length - tile)
    return starts


def tile_origins(height: int, width: int, tile: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the tiles of a height x width image, in tile order (row-major).

    Empty when the image is smaller than the tile in either dimension."""
    stride = stride or tile
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got {tile}, {stride}")
    if height < tile or width < tile:
        return []
    return [(y, x) for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]


def mean_per_image(stream):
    """(ids, vectors (B, D)) batches of tile or cell rows -> (image ids, mean vectors) batches, one
    row per image, in order. The views of an image must be consecutive (the loader yields them so)."""
    current, total, count = None, None, 0
    for ids, vectors in stream:
        done_ids, done_rows = [], []
        for row_id, vector in zip(ids, vectors):
            image = image_of(row_id)
            if image != current:
                if current is not None:
                    done_ids.append(current)
                    done_rows.append(total / count)
                current, total, count = image, vector.astype(np.float64), 0
            else:
                total = total + vector
            count += 1
        if done_ids:
            yield done_ids, np.stack(done_rows).astype(np.float32)
    if current is not None:
        yield [current], (total / count)[None].astype(np.float32)
