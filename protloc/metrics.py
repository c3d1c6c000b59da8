"""From a classifier's scores to its score: the decision rule, and macro F1 and accuracy.

Every evaluation of protloc (`protloc knn`, `protloc finetune`'s cross-validation and early
stopping, the linear probe's choice of C) and `protloc predict` use these:

    decision    per row, the classes whose score (k-NN vote share, head probability) is >= 0.5
                (multi-label), or the top class (single-label, and a multi-label row none reaches)
    scores      macro F1 over the scored classes a set of test rows holds in its truth, and
                accuracy (multi-label: subset accuracy, all labels of a row right), on the test
                rows that carry a scored class (protloc.folds.scored_classes decides which are)

Out-of-fold predictions pooled over all folds are scored the same way: every row is tested once,
so the pooled macro F1 averages every scored class; a fold's macro F1 only those in its truth.
"""

from __future__ import annotations

import numpy as np


def predict(scores: np.ndarray, multilabel: bool) -> np.ndarray:
    """(n, n_classes) uint8 indicator predictions from (n, n_classes) scores (k-NN vote shares,
    head probabilities).

    Single-label: the top class. Multi-label: every class with a score >= 0.5, or the top one if
    none reaches it (each image has at least one localization).
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


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, scored: np.ndarray | None = None) -> np.ndarray:
    """(n_classes,) F1 of each class from 0/1 indicator matrices (n, n_classes), on the rows that
    carry a `scored` class (default: all classes); NaN for classes not scored, 0 for a scored class
    with neither true nor predicted rows (scikit-learn's zero_division=0)."""
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    scored = np.ones(t.shape[1], dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    kept = t[:, scored].any(1)  # a row of an unscored class is not scored: its prediction is no false positive
    t, p = t[kept], p[kept]
    tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
    denominator = 2 * tp + fp + fn
    return np.where(scored, np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0), np.nan)


def metrics(y_true: np.ndarray, y_pred: np.ndarray, scored: np.ndarray | None = None) -> tuple[float, float] | None:
    """(macro F1, accuracy) of 0/1 indicator predictions (n, n_classes), or None when no row is scored.

    Only the `scored` classes count (default: all): rows carrying none of them are left out, and
    predictions of other classes count only as misses. Macro F1 averages the per-class F1 of the
    scored classes the kept rows hold in their truth (never a class absent from it); accuracy is
    the share of kept rows whose scored labels are all right (single-label: the right class;
    multi-label: subset accuracy). Plain numpy: it also runs every epoch of early stopping."""
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    scored = np.ones(t.shape[1], dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    kept = t[:, scored].any(1)
    if not kept.any():
        return None
    f1 = per_class_f1(t, p, scored)[scored & t[kept].any(0)]
    accuracy = (t[kept][:, scored] == p[kept][:, scored]).all(1).mean()
    return float(f1.mean()), float(accuracy)
