"""Embeddings as a bare `.npy`: float32 (N, D) rows only; ids go to a text file beside it (`--ids`).

The rows are streamed from the RowWriter (header first, then the rows in chunks), so a file or
stdout gets them without holding them in memory. Loads with allow_pickle=False.
"""

from __future__ import annotations

import numpy as np

from protloc.errors import ProtlocError
from protloc.output import atomic_path

EXTENSIONS = (".npy",)
MAGIC = b"\x93NUMPY"


def write_stream(stream, writer) -> None:
    """Write a RowWriter's rows as an .npy array (rows, dim) float32 to a binary stream."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (writer.rows, writer.dim)}
    np.lib.format.write_array_header_1_0(stream, header)
    for chunk in writer.chunks():
        stream.write(chunk)
    stream.flush()


def write(path: str, writer, ids: list[str], meta: dict, obs: dict) -> None:
    """The rows only: a bare .npy holds no ids, meta or per-row columns (use .npz or .h5ad for those)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_stream(f, writer)


def read(file, name: str):
    """(x, ids None, meta {}, obs None) of an .npy path or binary file object."""
    try:
        x = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ProtlocError(f"{name}: not an .npy embeddings file ({e})") from None
    if not isinstance(x, np.ndarray):
        raise ProtlocError(f"{name}: not an .npy embeddings file (an .npz archive)")
    return x, None, {}, None
