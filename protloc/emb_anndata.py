"""Embeddings as AnnData (`.h5ad`, or AnnData-zarr: a `.zarr` folder), for scanpy / scverse users.

    X                 float32 (N, D): the embeddings, so sc.pp.pca / sc.pp.neighbors take them as they are
    obs               indexed by the row ids; the per-row columns (protloc.row_meta), strings as categoricals
    uns["protloc"]    the run's record, the `.npz` meta (JSON types; anndata stores lists as arrays)
    obsm              what `predict` adds: "probabilities" (N, classes), class order in uns["protloc"]["classes"]

Written and read with the anndata library (https://anndata.readthedocs.io: `AnnData.write_h5ad`,
`write_zarr`, `read_h5ad`, `read_zarr`), an optional dependency: `pip install 'protloc[anndata]'`.
A .zarr is a folder: it is built beside the destination and renamed into place (protloc.output).
Reading accepts any AnnData with a dense or sparse numeric X (another tool's too: without
uns["protloc"] its meta is empty); the checks common to all formats are protloc.embeddings'.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from protloc.errors import ProtlocError
from protloc.output import atomic_dir, atomic_path

EXTENSIONS = (".h5ad", ".zarr")
MAGIC = b"\x89HDF\r\n\x1a\n"  # .h5ad is HDF5
UNS_KEY = "protloc"


def _anndata(what: str, path: str):
    try:
        import anndata
    except ImportError:
        ext = os.path.splitext(path.rstrip("/"))[1].lower() or ".h5ad"
        raise ProtlocError(f"{what} {ext} needs anndata: pip install 'protloc[anndata]'") from None
    return anndata


def require(path: str) -> None:
    """Fail before any work when writing `path` needs anndata and it is not installed."""
    _anndata("writing", path)


def is_anndata_zarr(path: str) -> bool:
    """Whether `path` is an AnnData-zarr folder (its root group says encoding-type anndata), not,
    say, an OME-Zarr image; False when zarr is not installed."""
    try:
        import zarr
    except ImportError:
        return False
    try:
        return zarr.open_group(path, mode="r").attrs.get("encoding-type") == "anndata"
    except Exception:  # not a zarr group at all: not ours to judge here
        return False


def write(path: str, writer, ids: list[str], meta: dict, obs: dict, obsm: dict | None = None) -> None:
    """Write rows (a RowWriter, or an (N, D) array), ids, meta and obs columns as AnnData, atomically."""
    anndata = _anndata("writing", path)
    import pandas as pd  # anndata's own dependency

    x = np.asarray(writer.array() if hasattr(writer, "array") else writer, dtype=np.float32)
    frame = pd.DataFrame({k: list(v) for k, v in obs.items()}, index=pd.Index(ids, dtype=str))
    adata = anndata.AnnData(X=x, obs=frame, uns={UNS_KEY: meta}, obsm=obsm or None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on converting strings to categoricals: what we ask for
        if path.lower().rstrip("/").endswith(".zarr"):
            if os.path.isdir(path) and not _is_zarr_store(path):
                raise ProtlocError(f"{path}: exists and is not a zarr store; not replaced")
            with atomic_dir(path) as tmp:
                adata.write_zarr(tmp)
        else:
            with atomic_path(path) as tmp:
                adata.write_h5ad(tmp)


def read(path: str, name: str):
    """(x, ids, meta, obs, obsm, notes) of an .h5ad file or AnnData-zarr folder; ProtlocError naming
    it when it cannot be read as AnnData or has no X (the common checks come after, in embeddings).
    `notes`: anndata's warnings as one line each, for the caller to log once the file passed its checks."""
    anndata = _anndata("reading", path)
    if not os.path.exists(path):
        raise ProtlocError(f"{name}: no such file")
    zarr_store = os.path.isdir(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            adata = anndata.read_zarr(path) if zarr_store else anndata.read_h5ad(path)
        except Exception as e:  # h5py, zarr and anndata each raise their own kinds for a file that is not AnnData
            kind = "AnnData-zarr folder" if zarr_store else "AnnData .h5ad file"
            raise ProtlocError(f"{name}: not an {kind} ({' '.join(str(e).split()) or type(e).__name__})") from None
    notes = [f"{name}: {' '.join(str(w.message).split())} (anndata)" for w in caught]
    if adata.X is None:
        raise ProtlocError(f"{name}: AnnData without X (the embeddings matrix)")
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    if x.dtype.kind not in "iuf":
        raise ProtlocError(f"{name}: X must be numeric (rows, dims), its dtype is {x.dtype}")
    meta = plain(dict(adata.uns.get(UNS_KEY, {})))
    obs = {str(c): _column(adata.obs[c]) for c in adata.obs.columns}
    obsm = {str(k): np.asarray(v) for k, v in adata.obsm.items()}
    return x, [str(i) for i in adata.obs_names], meta, obs, obsm, notes


def _column(series) -> list:
    """An obs column as plain values: strings (missing: ""), or numbers and booleans as they are."""
    if series.dtype.kind in "iufb":
        return series.tolist()
    return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in series.astype(object)]


def plain(value):
    """anndata's uns as JSON types again: arrays -> lists, numpy scalars -> Python ones."""
    if isinstance(value, dict) or hasattr(value, "keys"):
        return {str(k): plain(value[k]) for k in value.keys()}
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_zarr_store(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("zarr.json", ".zgroup", ".zattrs"))
