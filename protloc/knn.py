"""Weighted k-nearest-neighbour evaluation of embeddings, cross-validated.

The classifier is DINO's (Caron et al. 2021, `eval_knn.py`): embeddings are L2-normalized, the k
most cosine-similar training items vote for their label(s), each with weight exp(sim / T).
It has no parameters to fit, so it measures what the embedding itself knows. Here it is
cross-validated (k folds, stratified and grouped, or leave-one-out) and scored with macro F1,
the metric of the protein-localization literature.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from protloc.errors import ProtlocError
from protloc.labels import Matched

log = logging.getLogger(__name__)


def knn_scores(train_x, train_y, query_x, ks, temperature: float = 0.07, exclude=None,
               chunk: int = 1024, device="cpu") -> dict[int, np.ndarray]:
    """Weighted k-NN vote shares of each query, for each k in ks.

    train_y: (n_train, n_classes) 0/1 indicator matrix (a 1-D array of class indices is one-hot
    encoded). Returns {k: (n_query, n_classes) float32}: per class, the summed weight exp(sim / T)
    of the k nearest neighbours carrying that class, divided by the total weight of those k
    neighbours. That is DINO's vote divided by a per-query constant, so the argmax is DINO's, and
    multi-label predictions can threshold the share.

    exclude: which training items a query may not use (itself, its group), either a boolean
    (n_query, n_train) array or a callable `exclude(start, stop)` returning the
    (stop - start, n_train) mask of one chunk of queries. Queries are processed `chunk` at a time,
    so with a callable the memory is O(chunk x n_train), never n x n. Excluded items get weight 0;
    k larger than the usable training items is clipped to them.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ProtlocError(f"k must be at least 1, got {ks}")
    if temperature <= 0:
        raise ProtlocError(f"k-NN temperature must be positive, got {temperature}")
    train = F.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32, device=device), dim=1)
    query = F.normalize(torch.as_tensor(np.asarray(query_x), dtype=torch.float32, device=device), dim=1)
    y = np.asarray(train_y)
    if y.ndim == 1:
        y = np.eye(int(y.max()) + 1, dtype=np.float32)[y]
    y = torch.as_tensor(y, dtype=torch.float32, device=device)
    n_train, n_query = train.shape[0], query.shape[0]
    if n_train == 0:
        raise ProtlocError("k-NN needs at least one training item")
    kmax = min(ks[-1], n_train)

    out = {k: np.empty((n_query, y.shape[1]), dtype=np.float32) for k in ks}
    for start in range(0, n_query, chunk):
        stop = min(start + chunk, n_query)
        sim = query[start:stop] @ train.T
        if exclude is not None:
            mask = exclude(start, stop) if callable(exclude) else exclude[start:stop]
            mask = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask, dtype=bool))
            sim.masked_fill_(mask.to(device=sim.device, dtype=torch.bool), float("-inf"))
        top_sim, top_idx = sim.topk(kmax, dim=1)          # sorted, most similar first
        weight = (top_sim / temperature).exp()            # exp(-inf) = 0: excluded items do not vote
        votes = (y[top_idx] * weight[..., None]).cumsum(1)  # (chunk, kmax, classes): all k at once
        total = weight.cumsum(1)
        for k in ks:
            j = min(k, kmax) - 1
            share = votes[:, j] / total[:, j, None].clamp_min(torch.finfo(torch.float32).tiny)
            out[k][start:stop] = share.cpu().numpy()
    return out


def predict(scores: np.ndarray, multilabel: bool) -> np.ndarray:
    """(n, n_classes) uint8 indicator predictions from vote shares.

    Single-label: the top class. Multi-label: every class with a vote share >= 0.5, or the top
    one if none reaches it (each image has at least one localization).
    """
    scores = np.asarray(scores)
    top = np.zeros(scores.shape, dtype=np.uint8)
    top[np.arange(len(scores)), scores.argmax(1)] = 1
    if not multilabel:
        return top
    pred = (scores >= 0.5).astype(np.uint8)
    empty = pred.sum(1) == 0
    pred[empty] = top[empty]
    return pred


def metrics(y_true: np.ndarray, y_pred: np.ndarray, multilabel: bool) -> tuple[float, float]:
    """(macro F1, accuracy). Macro F1 averages over the classes present in y_true or y_pred (a
    class absent from both says nothing about it), with 0 for undefined precision or recall.
    Accuracy is subset accuracy for multi-label (all labels of an image right)."""
    if not multilabel:
        t, p = y_true.argmax(1), y_pred.argmax(1)
        return float(f1_score(t, p, average="macro", zero_division=0)), float(accuracy_score(t, p))
    present = np.flatnonzero(y_true.any(0) | y_pred.any(0))
    f1 = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    return float(f1), float(accuracy_score(y_true, y_pred))


def splits(y: np.ndarray, groups=None, folds: int = 5, seed: int = 0, multilabel: bool = False,
           class_names: list[str] | None = None):
    """Yield (train_indices, test_indices) of `folds`-fold cross-validation; each row is tested once.

    Single-label: stratified by class (StratifiedKFold), and with groups StratifiedGroupKFold, so
    no group is on both sides. Multi-label: scikit-learn has no multi-label stratification, so
    the folds are plain shuffled KFold, or GroupKFold with groups (not stratified).
    """
    n = len(y)
    if folds < 2:
        raise ProtlocError(f"cross-validation needs at least 2 folds, got {folds}")
    if groups is not None:
        n_groups = len(np.unique(groups))
        if folds > n_groups:
            raise ProtlocError(f"{folds} folds need at least {folds} groups, the labels have {n_groups} "
                               "(use fewer folds or leave-one-out)")
    elif folds > n:
        raise ProtlocError(f"{folds} folds need at least {folds} labelled rows, there are {n}")

    dummy = np.zeros((n, 1))
    if not multilabel:
        classes = np.asarray(y).argmax(1) if np.ndim(y) == 2 else np.asarray(y)
        values, counts = np.unique(classes, return_counts=True)
        if (counts < folds).any():  # scikit-learn's own warning says the same less clearly: ours replaces it
            rare = ", ".join(f"{class_names[v] if class_names else v} ({c} row{'s' if c > 1 else ''})"
                             for v, c in zip(values, counts) if c < folds)
            log.warning("class(es) %s have fewer labelled rows than the %d folds: some test folds hold them "
                        "while no training fold does, and a class with one row is never predicted right", rare, folds)
        if groups is None:
            it = StratifiedKFold(folds, shuffle=True, random_state=seed).split(dummy, classes)
        else:
            it = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(dummy, classes, groups)
    elif groups is None:
        it = KFold(folds, shuffle=True, random_state=seed).split(dummy)
    else:
        try:  # shuffle arrived in scikit-learn 1.6; before, GroupKFold is deterministic
            splitter = GroupKFold(folds, shuffle=True, random_state=seed)
        except TypeError:
            splitter = GroupKFold(folds)
        it = splitter.split(dummy, groups=groups)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            folds_made = list(it)
        for train, test in folds_made:
            if len(test) == 0:  # StratifiedGroupKFold can leave a fold empty with few, uneven groups
                log.warning("a cross-validation fold has no test rows; skipped")
                continue
            yield train, test
    except ValueError as e:  # e.g. more folds than members of every class
        raise ProtlocError(f"cannot make {folds} folds of these labels: {e}") from None


@dataclass
class KnnResult:
    k: int
    f1_macro_mean: float
    f1_macro_std: float      # population std (ddof=0) over folds; 0.0 for leave-one-out
    accuracy_mean: float
    accuracy_std: float
    f1_per_fold: list[float]


def _clip(ks, available: int) -> list[int]:
    """Clip ks to the training rows every query has; say so once."""
    too_big = sorted(k for k in set(ks) if k > available)
    if too_big:
        log.warning("k=%s larger than the %d training rows available; using k=%d",
                    ",".join(map(str, too_big)), available, available)
    return sorted({min(int(k), available) for k in ks})


def cross_validate(x, matched: Matched, ks=(1, 5, 10, 20, 50), folds: int = 5, loo: bool = False,
                   temperature: float = 0.07, seed: int = 0, device="cpu", chunk: int = 1024) -> list[KnnResult]:
    """Cross-validated weighted k-NN macro F1 and accuracy, one KnnResult per k.

    x: the full (N, D) embedding array as written by `protloc embed`; the labelled rows are
    `matched.rows`. With `loo`, each row is predicted from all others (with groups: from all rows
    outside its group) and the scores are computed once over all predictions. Otherwise
    `folds`-fold CV as in `splits`; mean and population std (ddof=0) over folds.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ProtlocError(f"embeddings must be a 2-D (rows, dims) array, got shape {x.shape}")
    if len(matched.rows) and matched.rows.max() >= len(x):
        raise ProtlocError(f"labels match embedding row {matched.rows.max()} but there are only {len(x)} rows")
    xs, y = x[matched.rows], matched.y
    n = len(y)
    if n < 2:
        raise ProtlocError(f"k-NN evaluation needs at least 2 labelled rows, there are {n}")
    codes = np.unique(matched.groups, return_inverse=True)[1].reshape(-1) if matched.groups is not None else None

    if loo:
        own = codes if codes is not None else np.arange(n)  # no groups: each row is its own group
        available = n - int(np.bincount(own).max())
        if available < 1:
            raise ProtlocError("leave-one-out with groups needs at least 2 groups")
        ks = _clip(ks, available)

        def exclude(start, stop):
            return own[start:stop, None] == own[None, :]

        scores = knn_scores(xs, y, xs, ks, temperature, exclude=exclude, chunk=chunk, device=device)
        results = []
        for k in ks:
            f1, acc = metrics(y, predict(scores[k], matched.multilabel), matched.multilabel)
            results.append(KnnResult(k, f1, 0.0, acc, 0.0, [f1]))
        return results

    fold_list = list(splits(y, matched.groups, folds, seed, matched.multilabel, matched.classes))
    ks = _clip(ks, min(len(train) for train, _ in fold_list))
    f1s = {k: [] for k in ks}
    accs = {k: [] for k in ks}
    for train, test in fold_list:
        scores = knn_scores(xs[train], y[train], xs[test], ks, temperature, chunk=chunk, device=device)
        for k in ks:
            f1, acc = metrics(y[test], predict(scores[k], matched.multilabel), matched.multilabel)
            f1s[k].append(f1)
            accs[k].append(acc)
    return [KnnResult(k, float(np.mean(f1s[k])), float(np.std(f1s[k])), float(np.mean(accs[k])),
                      float(np.std(accs[k])), f1s[k]) for k in ks]


def format_table(named_runs: list[tuple[str, list[KnnResult]]]) -> str:
    """A plain-text table, one line per k: macro F1 and accuracy (mean ± std) of each
    (name, results) run side by side; with several runs a first line names them."""
    cell = 17
    runs = [results for _, results in named_runs]
    lines = [f"{'k':<5}" + f"{'macro F1':<{cell}}{'accuracy':<{cell}}" * len(runs)]
    if len(runs) > 1:
        lines.insert(0, " " * 5 + "".join(f"{name[:2 * cell - 1]:<{2 * cell}}" for name, _ in named_runs))
    for row in zip(*runs):
        cells = "".join(f"{f'{r.f1_macro_mean:.3f} ± {r.f1_macro_std:.3f}':<{cell}}"
                        f"{f'{r.accuracy_mean:.3f} ± {r.accuracy_std:.3f}':<{cell}}" for r in row)
        lines.append(f"{row[0].k:<5}{cells}".rstrip())
    return "\n".join(line.rstrip() for line in lines)


def results_to_json(results: list[KnnResult], meta: dict) -> dict:
    """A JSON-able record: `meta` (embedding file, labels, folds, temperature, ...) and per-k results."""
    return {"meta": dict(meta),
            "results": [{**asdict(r), "f1_per_fold": [float(v) for v in r.f1_per_fold]} for r in results]}
