"""Weighted k-nearest-neighbour evaluation of embeddings, cross-validated.

The classifier is DINO's (Caron et al. 2021, `eval_knn.py`): embeddings are L2-normalized, the k
most cosine-similar training items vote for their label(s), each with weight exp(sim / T).
It has no parameters to fit, so it measures what the embedding itself knows. Here it is
cross-validated (k folds, stratified and grouped, or leave-one-out; protloc.folds) and scored
with macro F1, the metric of the protein-localization literature.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from protloc.errors import ProtlocError
from protloc.folds import check_folds, evaluation_groups, metrics, predict, scored_classes, splits
from protloc.labels import Matched
from protloc.neighbours import Q_BLOCK, T_BLOCK, Search, nearest

log = logging.getLogger(__name__)


def knn_scores(train_x, train_y, query_x, ks, temperature: float = 0.07, exclude=None, device="cpu",
               search: Search = Search(), q_block: int = Q_BLOCK, t_block: int = T_BLOCK) -> dict[int, np.ndarray]:
    """Weighted k-NN vote shares of each query, for each k in ks.

    train_y: (n_train, n_classes) 0/1 indicator matrix (a 1-D array of class indices is one-hot
    encoded). Returns {k: (n_query, n_classes) float32}: per class, the summed weight exp(sim / T)
    of the k nearest neighbours carrying that class, divided by the total weight of those k
    neighbours. That is DINO's vote divided by a per-query constant, so the argmax is DINO's, and
    multi-label predictions can threshold the share. The weights are computed as
    exp((sim - s_max) / T), s_max the query's largest usable similarity: the shares are the same,
    but no weight exceeds 1, so any finite T > 0 is exact in float32 (exp(sim / T) overflows it
    for sim / T > 88, e.g. similarities of 0.9 at T = 0.01).

    The neighbours come from protloc.neighbours.nearest (`search`: exact by default, blocked
    q_block x t_block; equal similarities ordered by training row, the lower first). exclude:
    which training items a query may not use (itself, its group), a boolean (n_query, n_train)
    array or a callable `exclude(queries, train)` of two slices returning that block of the mask,
    so the memory stays O(q_block x t_block), never n x n. Excluded items get weight 0; k larger
    than the usable training items is clipped to them.
    """
    ks = _checked(ks, temperature)  # before the search, which is the long part
    n_train = len(train_x)
    if n_train == 0:
        raise ProtlocError("k-NN needs at least one training item")
    top_sim, top_row = nearest(train_x, query_x, min(ks[-1], n_train), exclude, search, device, q_block, t_block)
    return vote(top_sim, top_row, train_y, ks, temperature, q_block)


def _checked(ks, temperature) -> list[int]:
    """ks sorted and unique; ProtlocError for a k < 1 or a temperature that is not a finite T > 0."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ProtlocError(f"k must be at least 1, got {ks}")
    if not 0 < temperature < math.inf:
        raise ProtlocError(f"k-NN temperature must be a positive number, got {temperature}")
    return ks


def vote(top_sim, top_row, train_y, ks, temperature: float = 0.07, chunk: int = Q_BLOCK) -> dict[int, np.ndarray]:
    """The weighted vote of knn_scores on given neighbours: top_sim, top_row (n_query, kmax) as
    protloc.neighbours.nearest returns them (most similar first; -inf where a query has no more
    usable rows). Returns {k: (n_query, n_classes) float32 vote shares}; k > kmax uses all kmax."""
    ks = _checked(ks, temperature)
    y = np.asarray(train_y)
    if y.ndim == 1:
        y = np.eye(int(y.max()) + 1, dtype=np.float32)[y]
    y = torch.as_tensor(y, dtype=torch.float32, device=top_sim.device)
    n_query, kmax = top_sim.shape
    out = {k: np.empty((n_query, y.shape[1]), dtype=np.float32) for k in ks}
    for start in range(0, n_query, chunk):
        stop = min(start + chunk, n_query)
        sim, row = top_sim[start:stop], top_row[start:stop]
        # shift by the query's top similarity (cosines are >= -1; a query with nothing usable has
        # -inf there, clamped so that it gets no vote rather than NaN)
        shift = sim[:, :1].clamp_min(-1.0)
        weight = ((sim - shift) / temperature).exp()  # <= 1; exp(-inf) = 0: excluded items do not vote
        votes = (y[row] * weight[..., None]).cumsum(1)  # (chunk, kmax, classes): all k at once
        total = weight.cumsum(1)
        for k in ks:
            j = min(k, kmax) - 1
            share = votes[:, j] / total[:, j, None].clamp_min(torch.finfo(torch.float32).tiny)
            out[k][start:stop] = share.cpu().numpy()
    return out


@dataclass
class KnnResult:
    k: int
    f1_macro_pooled: float   # macro F1 of all out-of-fold predictions together (each row tested once)
    accuracy_pooled: float
    f1_macro_mean: float     # per-fold macro F1, mean over folds (leave-one-out: the pooled value)
    f1_macro_std: float      # population std (ddof=0) over folds; 0.0 for leave-one-out
    accuracy_mean: float
    accuracy_std: float
    f1_per_fold: list[float]  # folds with a scored test row (leave-one-out: the pooled value)


def _clip(ks, available: int) -> list[int]:
    """Clip ks to the training rows every query has; say so once."""
    too_big = sorted(k for k in set(ks) if k > available)
    if too_big:
        log.warning("k=%s larger than the %d training rows available; using k=%d",
                    ",".join(map(str, too_big)), available, available)
    return sorted({min(int(k), available) for k in ks})


def cross_validate(x, matched: Matched, ks=(1, 5, 10, 20, 50), folds: int = 5, loo: bool = False,
                   temperature: float = 0.07, seed: int = 0, device="cpu",
                   search: Search = Search()) -> list[KnnResult]:
    """Cross-validated weighted k-NN macro F1 and accuracy, one KnnResult per k.

    x: the full (N, D) embedding array as written by `protloc embed`; the labelled rows are
    `matched.rows`, grouped as protloc.folds.evaluation_groups says (the labels' groups, else
    each image). Which classes can be scored is decided first (protloc.folds.scored_classes:
    ProtlocError when none can). With `loo`, each row is predicted from all rows outside its
    group and the scores are computed once over all predictions. Otherwise `folds`-fold CV as in
    protloc.folds.splits: the macro F1 of the pooled out-of-fold predictions, and the mean and
    population std (ddof=0) over folds of each fold's own. `search`: how the neighbours are found
    (protloc.neighbours; the faiss index refuses `loo`, ProtlocError).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ProtlocError(f"embeddings must be a 2-D (rows, dims) array, got shape {x.shape}")
    if len(matched.rows) and matched.rows.max() >= len(x):
        raise ProtlocError(f"labels match embedding row {matched.rows.max()} but there are only {len(x)} rows")
    y, multilabel = matched.y, matched.multilabel
    n = len(y)
    if n < 2:
        raise ProtlocError(f"k-NN evaluation needs at least 2 labelled rows, there are {n}")
    groups = evaluation_groups(matched.ids, matched.groups)
    scored = scored_classes(y, groups, matched.classes, matched.source, None if loo else folds,
                            group_column=matched.groups is not None)

    if loo:
        own = np.unique(groups, return_inverse=True)[1].reshape(-1) if groups is not None else np.arange(n)
        ks = _clip(ks, n - int(np.bincount(own).max()))

        def exclude(queries, train):
            return own[queries, None] == own[None, train]

        xs = x[matched.rows]
        scores = knn_scores(xs, y, xs, ks, temperature, exclude=exclude, device=device, search=search)
        results = []
        for k in ks:
            f1, acc = metrics(y, predict(scores[k], multilabel), scored)
            results.append(KnnResult(k, f1, acc, f1, 0.0, acc, 0.0, [f1]))
        return results

    fold_list = list(splits(y, groups, folds, seed, multilabel))
    check_folds(y, fold_list, matched.classes, scored)
    ks = _clip(ks, min(len(train) for train, _ in fold_list))
    pooled = {k: np.zeros_like(y) for k in ks}
    per_fold = {k: [] for k in ks}
    for train, test in fold_list:
        # one copy of each side, straight from x (at 1 M x 384 rows, x is 1.5 GB)
        scores = knn_scores(x[matched.rows[train]], y[train], x[matched.rows[test]], ks, temperature,
                            device=device, search=search)
        for k in ks:
            pooled[k][test] = predict(scores[k], multilabel)
            fold = metrics(y[test], pooled[k][test], scored)
            if fold is not None:  # None: the fold tests only rows of unmeasurable classes
                per_fold[k].append(fold)
    results = []
    for k in ks:
        f1s, accs = np.array(per_fold[k]).T
        f1, acc = metrics(y, pooled[k], scored)
        results.append(KnnResult(k, f1, acc, float(f1s.mean()), float(f1s.std()), float(accs.mean()),
                                 float(accs.std()), [float(v) for v in f1s]))
    return results


def format_table(named_runs: list[tuple[str, list[KnnResult]]], loo: bool = False) -> str:
    """A plain-text table, one line per k: macro F1 of the pooled out-of-fold predictions, then
    macro F1 and accuracy per fold (mean ± std); with `loo` the pooled macro F1 and accuracy.
    Several (name, results) runs go side by side, under a first line naming them."""
    cell = 19
    if loo:
        header = ["macro F1 pooled", "accuracy pooled"]
        cells = [lambda r: f"{r.f1_macro_pooled:.3f}", lambda r: f"{r.accuracy_pooled:.3f}"]
    else:
        header = ["macro F1 pooled", "macro F1 per fold", "accuracy per fold"]
        cells = [lambda r: f"{r.f1_macro_pooled:.3f}", lambda r: f"{r.f1_macro_mean:.3f} ± {r.f1_macro_std:.3f}",
                 lambda r: f"{r.accuracy_mean:.3f} ± {r.accuracy_std:.3f}"]
    width = cell * len(header)
    lines = [f"{'k':<5}" + "".join(f"{h:<{cell}}" for h in header) * len(named_runs)]
    if len(named_runs) > 1:
        lines.insert(0, " " * 5 + "".join(f"{name[:width - 1]:<{width}}" for name, _ in named_runs))
    for row in zip(*(results for _, results in named_runs)):
        lines.append(f"{row[0].k:<5}" + "".join(f"{c(r):<{cell}}" for r in row for c in cells))
    return "\n".join(line.rstrip() for line in lines)


def results_to_json(results: list[KnnResult], meta: dict) -> dict:
    """A JSON-able record: `meta` (embedding file, labels, folds, temperature, ...) and per-k results."""
    return {"meta": dict(meta),
            "results": [{**asdict(r), "f1_per_fold": [float(v) for v in r.f1_per_fold]} for r in results]}
