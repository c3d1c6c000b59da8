"""Cross-validation and its scores: groups, measurable classes, splits, the decision rule, macro F1.

Used by `protloc knn` (k folds and leave-one-out), `protloc finetune` (protloc.crossval, early stopping,
the linear probe's choice of C) and, for its decision rule, `protloc predict`:

    groups      the labels' group column (a protein or gene: never on both sides of a split); with
                `--no-groups` or without the column, each image (its tiles and cells stay
                together), or each row when rows are whole images
    measurable  a class is tested while something of it is trained on only if its rows lie in at
                least 2 groups (multi-label: the groups of the rows carrying it). The others are
                unmeasurable: their rows still train, but test rows of them are not scored and no
                macro F1 averages them in (a warning names them); if no class is measurable the
                evaluation is refused before any fitting
    decision    per row, the classes whose score (k-NN vote share, head probability) is >= 0.5
                (multi-label), or the top class (single-label, and a multi-label row none reaches)
    scores      macro F1 over the scored classes a set of test rows holds in its truth, and
                accuracy (multi-label: subset accuracy, all labels of a row right), on the test
                rows that carry a scored class

Out-of-fold predictions pooled over all folds are scored the same way: every row is tested once,
so the pooled macro F1 averages every scored class; a fold's macro F1 only those in its truth.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from protloc.errors import ProtlocError
from protloc.ids import image_of

log = logging.getLogger(__name__)

SHOWN = 5  # classes named in one message


def evaluation_groups(ids: list[str], label_groups) -> np.ndarray | None:
    """Per row: its group in the labels; without one, its image, so that the tiles and cells of an
    image (`path#tile=K`, `path#cell=K`) are never on both sides of a split; None when the rows
    are whole images without groups (each row on its own)."""
    if label_groups is not None:
        return np.asarray(label_groups)
    images = [image_of(i) for i in ids]
    return np.asarray(images) if images != list(ids) else None


def require_classes(y: np.ndarray, classes: list[str], source: str) -> None:
    """A classifier, or its evaluation, needs rows of at least 2 classes to tell apart."""
    present = [c for c, n in zip(classes, np.asarray(y).sum(0)) if n > 0]
    if len(present) < 2:
        held = f"only the class {present[0]}" if present else "no class"
        raise ProtlocError(f"{source}: the labelled rows hold {held}; a classifier needs at least 2 classes "
                           "to tell apart")


def _named(classes: list[str], counts, unit: str, mask) -> str:
    picked = np.flatnonzero(mask)
    shown = ", ".join(f"{classes[c]} ({counts[c]} {unit}{'s' if counts[c] != 1 else ''})" for c in picked[:SHOWN])
    return shown + (f" and {len(picked) - SHOWN} more" if len(picked) > SHOWN else "")


def scored_classes(y: np.ndarray, groups, classes: list[str], source: str, folds: int | None = None,
                   group_column: bool = True) -> np.ndarray:
    """(n_classes,) bool: the classes a cross-validation can measure, decided before any fitting.

    y: (n, n_classes) 0/1 indicators; groups: (n,) per row, or None (each row its own group);
    folds: the k of k-fold (None: leave-one-out); group_column: whether the groups are the
    labels' group column (else images or rows), for the messages. A class needs rows in at least
    2 groups. Raises ProtlocError when fewer than 2 classes have rows, or when no class is
    measurable; warns (once) naming the unmeasurable classes, and, with folds, the measurable
    ones with fewer groups than folds (some folds test none of them)."""
    y = np.asarray(y, dtype=bool)
    require_classes(y, classes, source)
    codes = np.unique(groups, return_inverse=True)[1].reshape(-1) if groups is not None else np.arange(len(y))
    n_groups = np.array([len(np.unique(codes[y[:, c]])) for c in range(y.shape[1])])
    scored = n_groups >= 2
    unit = "group" if groups is not None and group_column else "image" if groups is not None else "row"
    need = "2 rows or more" if unit == "row" else f"rows in 2 {unit}s or more"
    remedy = ("label more groups per class, or pass --no-groups to split by image instead of the group column"
              if unit == "group" else f"label more {unit}s of these classes")
    if not scored.any():
        raise ProtlocError(f"{source}: no class can be measured ({_named(classes, n_groups, unit, n_groups > 0)}): "
                           f"wherever a class is tested none of it would be trained on (a class needs {need}); "
                           f"{remedy}")
    unmeasurable = ~scored & (n_groups > 0)
    if unmeasurable.any():
        log.warning("%s: class(es) %s cannot be measured: wherever they are tested none of them is trained on (a "
                    "class needs %s); left out of scoring, their rows still train; %s", source,
                    _named(classes, n_groups, unit, unmeasurable), need, remedy)
    few = scored & (n_groups < (folds or 0))
    if few.any():
        log.warning("%s: class(es) %s have fewer %ss than the %d folds: some folds test none of them (a fold's macro "
                    "F1 leaves them out; the pooled one counts them)", source, _named(classes, n_groups, unit, few),
                    unit, folds)
    return scored


def check_folds(y: np.ndarray, fold_list: list[tuple[np.ndarray, np.ndarray]], classes: list[str],
                scored: np.ndarray) -> None:
    """Warn (once) about scored classes that some fold tests without training on any row of them:
    the fold assignment, not the labels, left them unmeasured there (their F1 in it is 0)."""
    y = np.asarray(y, dtype=bool)
    missed = np.zeros(y.shape[1], dtype=bool)
    for train, test in fold_list:
        missed |= y[test].any(0) & ~y[train].any(0)
    missed &= scored
    if missed.any():
        log.warning("the folds test class(es) %s in a fold that trains on none of them: their F1 there is 0 (more "
                    "groups per class, or other --seed, spread them)",
                    ", ".join(classes[c] for c in np.flatnonzero(missed)))


def splits(y: np.ndarray, groups=None, folds: int = 5, seed: int = 0, multilabel: bool = False):
    """Yield (train_indices, test_indices) of `folds`-fold cross-validation; each row is tested once.

    Single-label: stratified by class (StratifiedKFold), and with groups StratifiedGroupKFold, so
    no group is on both sides. Multi-label: scikit-learn has no multi-label stratification, so
    the folds are plain shuffled KFold, or GroupKFold with groups (not stratified). Classes with
    fewer rows than folds are allowed (scored_classes says so)."""
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
        with warnings.catch_warnings():  # "The least populated class has only N members": scored_classes says it
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            folds_made = list(it)
        for train, test in folds_made:
            if len(test) == 0:  # StratifiedGroupKFold can leave a fold empty with few, uneven groups
                log.warning("a cross-validation fold has no test rows; skipped")
                continue
            yield train, test
    except ValueError as e:  # e.g. more folds than members of every class
        raise ProtlocError(f"cannot make {folds} folds of these labels: {e}") from None


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
