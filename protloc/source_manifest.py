"""CSV manifests: a spreadsheet of images, one row each, with metadata that travel with them.

A DATA argument ending in `.csv` (comma-separated) or `.tsv` (tab-separated) is a manifest. Its
first line (after lines beginning with `#`, which are skipped anywhere) is the header; each
other line is one image, given either

    by a `path` column     one file holding all channels (a TIFF, or an OME-Zarr image folder:
                           a plate's field is `plate.zarr/B/3/0`), or
    by channel columns     one single-channel TIFF per channel, the column named by its channel:
                           a canonical name or an alias (`nucleus,protein`, `dapi,gfp`,
                           protloc.channels), or SubCell's `r_image,y_image,b_image,g_image`
                           (microtubules, er, nucleus, protein); channels in column order.

Paths are relative to the manifest's folder (or absolute; `~` expanded). An optional `id`
column names the image (its rows' ids); without it, the id is the path as resolved (relative to
the working directory when the manifest's is), or, for channel columns, the first channel's
path without its TIFF extension. Every other column is carried verbatim (header name, value with
surrounding blanks stripped) into `Source.meta`, and from there into the embeddings' metadata.

Refused with one line naming the manifest and the line: no `path` and no channel columns, both,
a repeated column, a row with more fields than the header, an empty or missing file, a file
that is a folder or a plate rather than one image, a repeated id; a `path` column beside channel
columns that list files; without `path`, a column whose every value names an image file but
whose name is no known channel (it would pass silently as metadata: name it by its channel).
With a `path` column, a channel-named column that does not list files is metadata (`protein`
naming the gene).
"""

from __future__ import annotations

import csv
import os

from protloc import source_zarr
from protloc.channels import ALIASES, VOCABULARY, canonical
from protloc.errors import ProtlocError
from protloc.ids import TIFF_EXTENSIONS, stem
from protloc.sources import Source

__all__ = ["is_input", "found_in_folder", "sources"]

EXTENSIONS = {".csv": ",", ".tsv": "\t"}
SUBCELL = {"r_image": "microtubules", "y_image": "er", "b_image": "nucleus", "g_image": "protein"}
PATH, ID = "path", "id"


def is_input(path: str) -> bool:
    return not os.path.isdir(path) and os.path.splitext(path)[1].lower() in EXTENSIONS


def found_in_folder(name: str) -> bool:
    """Never: a folder search takes images, and a CSV beside them is usually a labels table."""
    return False


def channel_of(column: str) -> str | None:
    """The canonical channel a column names (`DAPI` -> nucleus, `g_image` -> protein), or None."""
    key = column.strip().lower()
    if key in SUBCELL:
        return SUBCELL[key]
    name = canonical(key)
    return name if name in VOCABULARY or key in ALIASES else None


def sources(manifest: str) -> list[Source]:
    """One source per row of the manifest, in its order (see the module doc)."""
    base = os.path.dirname(manifest)
    header, rows = _read(manifest)
    lower = [h.lower() for h in header]
    channels = [(k, channel_of(h)) for k, h in enumerate(header) if channel_of(h) is not None]
    has_path = PATH in lower
    if has_path:  # a channel-named column is metadata here (a `protein` column naming the gene), unless it lists files
        clash = [header[k] for k, _ in channels if _lists_images(rows, k)]
        if clash:
            raise ProtlocError(f"{manifest}: has both a 'path' column and channel columns listing files "
                               f"({', '.join(clash)}); give one or the other")
        channels = []
    elif not channels:
        raise ProtlocError(f"{manifest}: no 'path' column and no channel columns (nucleus, protein, ... or SubCell's "
                           f"r_image, y_image, b_image, g_image); its columns are {', '.join(header)}")
    names = [c for _, c in channels]
    if len(set(names)) != len(names):
        raise ProtlocError(f"{manifest}: columns {', '.join(header[k] for k, _ in channels)} name the same channel "
                           f"twice ({', '.join(names)})")
    files_at = [lower.index(PATH)] if has_path else [k for k, _ in channels]
    id_at = lower.index(ID) if ID in lower else None
    meta_at = [k for k in range(len(header)) if k not in files_at and k != id_at]
    if not has_path:  # a column of files whose name is no channel would pass silently as metadata
        unnamed = [header[k] for k in meta_at if _lists_images(rows, k)]
        if unnamed:
            raise ProtlocError(f"{manifest}: column {unnamed[0]!r} lists image files, but is no channel name protloc "
                               f"knows ({', '.join(VOCABULARY)}, or an alias such as dapi, gfp); name the column by "
                               "its channel")

    out, line_of_id = [], {}
    for line, row in rows:
        where = f"{manifest}: line {line}"
        files = []
        for k in files_at:
            value = row[k].strip()
            if not value:
                raise ProtlocError(f"{where}: no file in column {header[k]!r}")
            path = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
            if not os.path.exists(path):
                raise ProtlocError(f"{where}: {path}: no such file or directory (column {header[k]!r})")
            if os.path.isdir(path) and not source_zarr.is_input(path):
                raise ProtlocError(f"{where}: {path}: a folder; a manifest row names one image file")
            files.append(path)
        if has_path and source_zarr.is_input(files[0]):
            found = source_zarr.sources(files[0])
            if [s.id for s in found] != [files[0]]:
                raise ProtlocError(f"{where}: {files[0]}: a plate of {len(found)} images; a manifest row names "
                                   f"one image (a field: {found[0].id})")
        image_id = row[id_at].strip() if id_at is not None and row[id_at].strip() else \
            files[0] if has_path else stem(files[0])
        if image_id in line_of_id:
            raise ProtlocError(f"{where}: id {image_id} repeats line {line_of_id[image_id]}")
        line_of_id[image_id] = line
        meta = {header[k]: row[k].strip() for k in meta_at}
        out.append(Source(image_id, tuple(files), None if has_path else tuple(names), meta))
    if not out:
        raise ProtlocError(f"{manifest}: no rows (a header and no images)")
    return out


def _read(manifest: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, fields)]) of a manifest, comment and blank lines skipped, every row as
    wide as the header (short rows padded with empty fields)."""
    delimiter = EXTENSIONS[os.path.splitext(manifest)[1].lower()]
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            lines = [(n, line) for n, line in enumerate(f.read().splitlines(), 1)
                     if line.strip() and not line.lstrip().startswith("#")]
        parsed = [(n, next(csv.reader([line], delimiter=delimiter, strict=True))) for n, line in lines]
    except (OSError, UnicodeDecodeError) as e:
        raise ProtlocError(f"{manifest}: cannot read the manifest ({e})") from None
    except csv.Error as e:
        raise ProtlocError(f"{manifest}: not a valid {'CSV' if delimiter == ',' else 'TSV'} manifest ({e})") from None
    if not parsed:
        raise ProtlocError(f"{manifest}: an empty manifest (no header line)")
    header = [h.strip() for h in parsed[0][1]]
    if "" in header:
        raise ProtlocError(f"{manifest}: line {parsed[0][0]}: column {header.index('') + 1} of the header has no name")
    lowered = [h.lower() for h in header]
    if repeated := next((h for h in header if lowered.count(h.lower()) > 1), None):
        raise ProtlocError(f"{manifest}: line {parsed[0][0]}: column {repeated!r} repeats")
    rows = []
    for n, fields in parsed[1:]:
        if len(fields) > len(header):
            raise ProtlocError(f"{manifest}: line {n}: {len(fields)} fields, but the header has {len(header)} columns")
        rows.append((n, fields + [""] * (len(header) - len(fields))))
    return header, rows


def _lists_images(rows, k: int) -> bool:
    """Whether every value of column k names an image file (a TIFF or an OME-Zarr folder)."""
    values = [row[k].strip().lower() for _, row in rows]
    return bool(values) and all(v.endswith(TIFF_EXTENSIONS + (source_zarr.EXTENSION,)) for v in values)
