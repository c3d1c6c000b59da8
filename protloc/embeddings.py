"""The embeddings file format: .npy rows (+ an ids file) or one .npz with ids and meta.

    .npy   float32 (N, D); ids in a text file beside it (`--ids`), one line per row (stripped)
    .npz   embeddings float32 (N, D), ids str (N,), meta: a JSON string (model, checkpoint
           hash, channels, normalization, pooling, the working directory ids are relative to)

Everything loads with allow_pickle=False. Ids are unique: a repeated id is an error naming it.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass

import numpy as np

from protloc.errors import ProtlocError
from protloc.output import atomic_path

EXTENSIONS = (".npy", ".npz")


def is_embeddings(paths) -> bool:
    """Whether command inputs are one embeddings file (.npy / .npz) rather than images."""
    return len(paths) == 1 and paths[0].lower().endswith(EXTENSIONS)


class RowWriter:
    """Collects float32 rows of a known width on disk, then writes them as .npy or .npz.

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

    def write_npy(self, stream) -> None:
        """Write the collected rows as an .npy array (rows, dim) to a binary stream."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (self.rows, self.dim)}
        np.lib.format.write_array_header_1_0(stream, header)
        self._file.seek(0)
        while chunk := self._file.read(1 << 22):
            stream.write(chunk)
        stream.flush()

    def array(self) -> np.ndarray:
        """The rows as a read-only memory map (no copy in memory)."""
        self._file.flush()
        if self.rows == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.memmap(self._file, dtype=np.float32, mode="r", shape=(self.rows, self.dim))

    def close(self) -> None:
        self._file.close()


def write_embeddings(output: str, writer: RowWriter, ids: list[str], meta: dict, stdout=None) -> None:
    """Write the rows to `output` (.npy, .npz, or "-" = .npy on `stdout`), atomically for files."""
    if output == "-":
        writer.write_npy(stdout)
    elif output.lower().endswith(".npz"):
        with atomic_path(output) as tmp, open(tmp, "wb") as f:
            np.savez(f, embeddings=writer.array(), ids=np.array(ids, dtype=str), meta=np.array(json.dumps(meta)))
    else:
        with atomic_path(output) as tmp, open(tmp, "wb") as f:
            writer.write_npy(f)


def write_ids(path, ids: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(f"{i}\n" for i in ids)


@dataclass
class Embeddings:
    x: np.ndarray  # (N, D) float32
    ids: list[str] | None
    meta: dict
    source: str


def read_embeddings(path: str, ids_path: str | None = None, stdin=None, need_ids: bool = False) -> Embeddings:
    """Read an embeddings file ("-": an .npy or .npz from `stdin`, buffered) and check it: a 2-D
    array of finite values, one unique id per row (from `ids_path`, else the .npz's own; with
    `need_ids`, a file without them is refused). Raises ProtlocError naming the file."""
    name = "<stdin>" if path == "-" else path
    try:
        data = np.load(io.BytesIO(stdin.read()) if path == "-" else path, allow_pickle=False)
    except FileNotFoundError:
        raise ProtlocError(f"{name}: no such file") from None
    except (ValueError, OSError, EOFError) as e:
        raise ProtlocError(f"{name}: not an .npy/.npz embeddings file ({e})") from None
    ids, meta = None, {}
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if "embeddings" not in data.files:
                raise ProtlocError(f"{name}: .npz without an 'embeddings' array (has {', '.join(data.files)})")
            x = data["embeddings"]
            ids = [str(i) for i in data["ids"]] if "ids" in data.files else None
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    else:
        x = data
    if x.ndim != 2:
        raise ProtlocError(f"{name}: embeddings must be a 2-D array (rows, dims), got shape {x.shape}")
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ProtlocError(f"{name}: {bad} row(s) hold NaN or infinite values")
    if ids_path is not None:
        ids = read_ids(ids_path)
    if ids is not None:
        _check_ids(ids, ids_path or name, x.shape[0])
    elif need_ids:
        raise ProtlocError(f"{name}: no row ids: pass --ids FILE (from `protloc embed --ids`) or use an .npz")
    return Embeddings(x, ids, meta, name)


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
