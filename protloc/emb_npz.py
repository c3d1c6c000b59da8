"""Embeddings as one `.npz`: `embeddings` float32 (N, D), `ids` str (N,), `meta` and `obs` JSON strings.

`meta` is the run's record (model, checkpoint hash, channels, strategy, normalization, pooling,
protloc version, the working directory the ids are relative to); `obs` the per-row columns
(protloc.row_meta: {column: [value per row]}), AnnData's obs in `.h5ad`. Loads with allow_pickle=False.
"""

from __future__ import annotations

import json

import numpy as np

from protloc.errors import ProtlocError
from protloc.output import atomic_path

EXTENSIONS = (".npz",)
MAGIC = b"PK\x03\x04"  # a zip archive


def write(path: str, writer, ids: list[str], meta: dict, obs: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, embeddings=writer.array(), ids=np.array(ids, dtype=str), meta=np.array(json.dumps(meta)),
                 obs=np.array(json.dumps(obs)))


def read(file, name: str):
    """(x, ids or None, meta, obs or None) of an .npz path or binary file object; files written
    before `obs` existed read with obs None."""
    try:
        data = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ProtlocError(f"{name}: not an .npz embeddings file ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ProtlocError(f"{name}: not an .npz embeddings file (a bare .npy array)")
    with data:
        if "embeddings" not in data.files:
            raise ProtlocError(f"{name}: .npz without an 'embeddings' array (has {', '.join(data.files)})")
        try:
            x = data["embeddings"]
            ids = [str(i) for i in data["ids"]] if "ids" in data.files else None
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
            obs = json.loads(str(data["obs"])) if "obs" in data.files else None
        except (ValueError, OSError, EOFError) as e:  # a damaged member, pickled objects, bad JSON
            raise ProtlocError(f"{name}: damaged .npz embeddings file ({e})") from None
    return x, ids, meta, obs
