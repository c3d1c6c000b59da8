"""`protloc predict`'s AnnData output: the embeddings with their predictions, for scanpy users.

    X                            float32 (N, D): the embeddings the head classified
    obs                          the per-row columns (protloc.row_meta) and `predicted`: the class, or
                                 the classes joined by ';' (multi-label)
    obsm["probabilities"]        float32 (N, classes), columns in uns["protloc"]["prediction"]["classes"]
    uns["protloc"]               the embeddings' meta (protloc.embed.run_meta) and `prediction`:
                                 the MODEL's path and SHA-256, classes, multilabel

The TSV output (protloc.classifier.tsv_header / tsv_rows) holds the same ids, classes and probabilities.
"""

from __future__ import annotations

import numpy as np

from protloc import emb_anndata
from protloc.checkpoint import file_sha256
from protloc.classifier import Classifier


def write_anndata(output: str, x, ids: list[str], meta: dict, obs: dict, clf: Classifier,
                  probs: np.ndarray) -> None:
    """Write rows `x` (a RowWriter or an (N, D) array) with `clf`'s predictions from `probs`
    (N, classes) as AnnData (.h5ad, or .zarr), atomically."""
    obs = {**obs, "predicted": clf.predicted(probs)}
    meta = {**meta, "prediction": {"model": clf.source, "sha256": file_sha256(clf.source),
                                   "classes": list(clf.classes), "multilabel": clf.multilabel}}
    emb_anndata.write(output, x, ids, meta, obs, obsm={"probabilities": np.asarray(probs, dtype=np.float32)})
