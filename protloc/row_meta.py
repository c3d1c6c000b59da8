"""What each embedding row is, as per-row columns: AnnData's `obs` in .h5ad, `obs` in .npz.

    image                  the image id (the row id less its #tile=K / #cell=K: protloc/ids.py)
    path                   the image's file; a one-file-per-channel image's files joined by ';'
    view                   image | tile | cell
    view_index             tile rows: the tile's K (tile order, protloc/tiles.py); cell rows: the mask label K
    origin_y, origin_x     tile rows: the tile's top-left corner in the image (pixels)
    centroid_y, centroid_x cell rows: the cell's centroid in the image (pixels)
    bbox_y0 .. bbox_x1     cell rows: the cell's bounding box in the image (pixels; y0, x0 inclusive,
                           y1, x1 exclusive)
    every key of Source.meta (a manifest row's other columns, a plate field's well): strings, ""
    for rows whose image does not have it

Rows averaged over an image's tiles or cells (`--aggregate mean`) are image rows. The names above
are protloc's own: an input metadata key among them, or one AnnData cannot store, is refused
before any image is read (check_source_meta).
"""

from __future__ import annotations

from protloc.errors import ProtlocError
from protloc.ids import parse
from protloc.sources import Source

IMAGE, TILE, CELL = "image", "tile", "cell"
VIEW_COLUMNS = {TILE: ("origin_y", "origin_x"),
                CELL: ("centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")}
# protloc's own obs columns, and what predict adds; "id" names the index
RESERVED = ("id", "image", "path", "view", "view_index", *(c for cs in VIEW_COLUMNS.values() for c in cs),
            "predicted")


def check_source_meta(sources: list[Source]) -> None:
    """Refuse, before any image is read, input metadata whose column name protloc's own per-row
    columns use (one would overwrite the other), or that AnnData cannot store (empty, `_index`,
    or holding '/', which zarr refuses): every output format holds the same columns."""
    for src in sources:
        for key in src.meta:
            if key in RESERVED:
                raise ProtlocError(f"{src.id}: its metadata has '{key}', a column name protloc's output uses itself "
                                   f"({', '.join(RESERVED)}); rename it in the input")
            if not key.strip() or key == "_index" or "/" in key:
                shown = f"'{key}'" if key.strip() else "an unnamed column"
                raise ProtlocError(f"{src.id}: its metadata has {shown}, a column name AnnData cannot store (empty, "
                                   "_index, or with '/'); rename it in the input")


def row_columns(ids: list[str], sources: list[Source], view_meta: list[dict] | None = None) -> dict[str, list]:
    """The per-row columns of embedding rows `ids` (protloc.embed's order) of images `sources`:
    {column: [value per row]} (module doc). `view_meta`: protloc.embed.EmbedStats.view_meta, one
    entry per row when rows are tiles or cells (origin; centroid, bbox), else None."""
    by_id = {s.id: s for s in sources}
    rows = [parse(i) for i in ids]  # (image id, 'tile' | 'cell' | None, K | None)
    images = [by_id[image] for image, _, _ in rows]
    columns: dict[str, list] = {"image": [image for image, _, _ in rows],
                                "path": [";".join(s.files) for s in images],
                                "view": [kind or IMAGE for _, kind, _ in rows]}
    kinds = {kind for _, kind, _ in rows}
    if kinds - {None}:
        assert view_meta is not None and len(view_meta) == len(ids) and len(kinds) == 1, (kinds, len(ids))
        (kind,) = kinds
        columns["view_index"] = [k for _, _, k in rows]
        values = [m["origin"] if kind == TILE else [*m["centroid"], *m["bbox"]] for m in view_meta]
        for j, name in enumerate(VIEW_COLUMNS[kind]):
            columns[name] = [v[j] for v in values]
    keys = list(dict.fromkeys(k for s in sources for k in s.meta))
    for key in keys:
        columns[key] = [s.meta.get(key, "") for s in images]
    return columns
