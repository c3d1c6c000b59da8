"""Embeddings files: one interface over the formats, each format its own module.

    .npy           float32 (N, D) rows only; ids in a text file beside it (`--ids`)   protloc/emb_npy.py
    .npz           embeddings, ids, meta (JSON), obs (JSON: per-row columns)          protloc/emb_npz.py
    .h5ad / .zarr  AnnData: X, obs (indexed by the ids), uns["protloc"] = meta        protloc/emb_anndata.py

The format is chosen by the file's extension on writing, and by its extension (else its first
bytes) on reading; `-` is an .npy or .npz on stdin/stdout. Whatever the format, a file reads as
one `Embeddings`: a 2-D array of finite values, one unique id per row, the run's meta and the
per-row columns (protloc.row_meta), so an .npz and an .h5ad of one run give the same results.
Adding a format is adding a module with EXTENSIONS, MAGIC, write() and read() to FORMATS.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from protloc import emb_anndata, emb_npy, emb_npz
from protloc.errors import ProtlocError
from protloc.output import atomic_path

FORMATS = (emb_npy, emb_npz, emb_anndata)
EXTENSIONS = tuple(ext for fmt in FORMATS for ext in fmt.EXTENSIONS)
CHUNK_BYTES = 1 << 22

log = logging.getLogger(__name__)


def format_of(path: str):
    """The format module whose extension `path` has (any case; a trailing / allowed), else None."""
    lower = path.lower().rstrip("/")
    return next((fmt for fmt in FORMATS if lower.endswith(fmt.EXTENSIONS)), None)


def is_embeddings(paths) -> bool:
    """Whether command inputs are one embeddings file rather than images: an .npy, .npz or .h5ad,
    or a .zarr that is AnnData (an OME-Zarr image is images)."""
    if len(paths) != 1 or format_of(paths[0]) is None:
        return False
    return not os.path.isdir(paths[0]) or emb_anndata.is_anndata_zarr(paths[0])


class RowWriter:
    """Collects float32 rows of a known width on disk, then hands them to a format's writer.

    Rows go to an anonymous temporary file as they are computed, so memory stays flat however
    many images are embedded; `.npy` needs the row count in its header, so the final file is
    assembled at the end (header + the rows copied in chunks)."""

    def __init__(self, dim: int, tmp_dir=None):
        self.dim = dim
        self.rows = 0
        self._file = tempfile.TemporaryFile(dir=tmp_dir)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        assert rows.ndim == 2 and rows.shape[1] == self.dim, rows.shape
        self._file.write(rows.tobytes())
        self.rows += rows.shape[0]

    def chunks(self):
        """The rows' bytes (float32, row-major) in chunks, from the first row."""
        self._file.flush()
        self._file.seek(0)
        while chunk := self._file.read(CHUNK_BYTES):
            yield chunk

    def array(self) -> np.ndarray:
        """The rows as a read-only memory map (no copy in memory)."""
        self._file.flush()
        if self.rows == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.memmap(self._file, dtype=np.float32, mode="r", shape=(self.rows, self.dim))

    def close(self) -> None:
        self._file.close()


def check_output(output: str) -> None:
    """Refuse an output no format takes, or whose format's optional library is missing, before any work."""
    if output == "-":
        return
    fmt = format_of(output)
    if fmt is None:
        raise ProtlocError(f"{output}: the output must end in {', '.join(EXTENSIONS)} (or be - for stdout)")
    if fmt is emb_anndata:
        emb_anndata.require(output)


def write_embeddings(output: str, writer: RowWriter, ids: list[str], meta: dict, obs: dict | None = None,
                     stdout=None) -> None:
    """Write the rows to `output` in the format its extension names ("-": .npy on `stdout`),
    atomically: `ids` one per row, `meta` the run's record (JSON types), `obs` the per-row
    columns {name: [value per row]} (protloc.row_meta). A bare .npy keeps the rows only."""
    if output == "-":
        emb_npy.write_stream(stdout, writer)
        return
    check_output(output)
    format_of(output).write(output, writer, ids, meta, obs or {})


def write_ids(path, ids: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(f"{i}\n" for i in ids)


@dataclass
class Embeddings:
    x: np.ndarray  # (N, D) float32
    ids: list[str] | None
    meta: dict
    source: str
    obs: dict[str, list] | None = None  # per-row columns (protloc.row_meta), None for an .npy
    obsm: dict[str, np.ndarray] = field(default_factory=dict)  # AnnData's obsm (predict's probabilities)


def read_embeddings(path: str, ids_path: str | None = None, stdin=None, need_ids: bool = False) -> Embeddings:
    """Read an embeddings file ("-": an .npy or .npz from `stdin`, buffered) and check it: a 2-D
    numeric array with rows, of finite values, one unique id per row (from `ids_path`, else the
    file's own; with `need_ids`, a file without them is refused), per-row columns of one value per
    row. Raises ProtlocError naming the file (a format's optional library missing: naming the extra)."""
    name = "<stdin>" if path == "-" else path
    if path == "-":
        data = stdin.read()
        file, fmt = io.BytesIO(data), emb_npz if data.startswith(emb_npz.MAGIC) else emb_npy
    else:
        file, fmt = path, format_of(path) or _sniff(path)
    if fmt is emb_anndata:
        x, ids, meta, obs, obsm, notes = emb_anndata.read(path, name)
    else:
        if not os.path.exists(path) and path != "-":
            raise ProtlocError(f"{name}: no such file")
        (x, ids, meta, obs), obsm, notes = fmt.read(file, name), {}, []
    if x.ndim != 2:
        raise ProtlocError(f"{name}: embeddings must be a 2-D array (rows, dims), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ProtlocError(f"{name}: no embedding rows")
    if x.dtype.kind not in "iuf":
        raise ProtlocError(f"{name}: embeddings must be numbers, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ProtlocError(f"{name}: {bad} row(s) hold NaN or infinite values")
    if x.dtype.kind == "f" and x.dtype.itemsize > 4 and np.abs(x).max() > np.finfo(np.float32).max:
        raise ProtlocError(f"{name}: values beyond float32's range ({np.abs(x).max():.3g}): embeddings are float32")
    x = np.asarray(x, dtype=np.float32)
    if ids_path is not None:
        ids = read_ids(ids_path)
    if ids is not None:
        _check_ids(ids, ids_path or name, x.shape[0])
    elif need_ids:
        raise ProtlocError(f"{name}: no row ids: pass --ids FILE (from `protloc embed --ids`) or use an .npz or .h5ad")
    if obs is not None and not isinstance(obs, dict):
        raise ProtlocError(f"{name}: per-row columns must be a mapping of column -> values, got {type(obs).__name__}")
    for column, values in (obs or {}).items():
        if not isinstance(values, list) or len(values) != x.shape[0]:
            got = f"{len(values)} values" if isinstance(values, list) else f"a {type(values).__name__}"
            raise ProtlocError(f"{name}: per-row column '{column}' has {got} for {x.shape[0]} rows")
    for note in notes:  # a library's warnings on a file that reads (on one that does not, its error says it)
        log.warning("%s", note)
    return Embeddings(x, ids, meta, name, obs, obsm)


def _sniff(path: str):
    """The format of a file whose extension names none, from its first bytes (.npy when unknown:
    its reader says what is wrong)."""
    if os.path.isdir(path):
        return emb_anndata
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return emb_npy
    return next((fmt for fmt in FORMATS if head.startswith(fmt.MAGIC)), emb_npy)


def read_ids(path) -> list[str]:
    """An ids file: one id per line, stripped of surrounding blanks (as the labels CSV's fields);
    blank lines at the end are ignored, a blank line before the last id is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            ids = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ProtlocError(f"{path}: cannot read ids ({getattr(e, 'strerror', None) or e})") from None
    while ids and not ids[-1]:
        ids.pop()
    if "" in ids:
        raise ProtlocError(f"{path}: line {ids.index('') + 1} is blank: every line names one embedding row")
    return ids


def _check_ids(ids: list[str], source: str, rows: int) -> None:
    """One id per row, each naming one row only."""
    if len(ids) != rows:
        raise ProtlocError(f"{source}: {len(ids)} ids for {rows} embedding rows")
    first: dict[str, int] = {}
    for row, id_ in enumerate(ids):
        if first.setdefault(id_, row) != row:
            raise ProtlocError(f"{source}: id {id_} is repeated (rows {first[id_] + 1} and {row + 1}): each "
                               "embedding row needs its own id")
