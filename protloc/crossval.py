"""The evaluation protocol of `protloc finetune`: repeated cross-validation and its metrics.

For each seed s in seed, seed + 1, ... (`--seeds`), the labelled rows are split into `--folds`
folds (stratified by class, grouped by the labels' group column when present, so no protein is
on both sides: protloc.folds.splits, seeded by s). For each fold:

    training part  the other folds
      -> a stratified fraction of it, at least one row per class (`--fraction`, seeded by s)
      -> a validation split carved from that (`--val-fraction`: 1 / round(1 / f) of it,
         stratified and grouped), used only for early stopping
    test part      the fold itself, always whole

Every row is tested once per seed. Only measurable classes are scored (protloc.folds: rows in at
least 2 groups). Two macro F1 figures are reported: the pooled one, of each seed's out-of-fold
predictions of all rows together (mean +- std over seeds; the mean of the per-class F1 table),
and the per-fold one, each fold's own macro F1 over the classes its test rows hold, as mean +-
population std over folds x seeds, like the study's tables. Per-class F1 and the confusion matrix
come from each seed's pooled out-of-fold predictions (per-class F1 averaged over seeds, confusion
matrices summed).

The MODEL that finetune writes is one more fit whose training part is all labelled rows
(`final_split`), with the same fraction and validation carving.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix

from protloc.errors import ProtlocError
from protloc.folds import metrics, per_class_f1, predict, splits

log = logging.getLogger(__name__)


@dataclass
class Split:
    seed: int
    fold: int | None  # None: the final fit on all labelled rows
    train: np.ndarray  # row indices
    val: np.ndarray
    test: np.ndarray


@dataclass
class RunResult:
    seed: int
    fold: int
    macro_f1: float | None  # None: the fold tests only rows of unmeasurable classes
    accuracy: float | None
    n_train: int
    n_val: int
    n_test: int
    best_epoch: int | None  # 1-based epoch whose weights were kept (None: the linear probe, no epochs)
    epochs: int | None  # epochs run before stopping
    C: float | None  # the linear probe's inverse L2 strength, chosen by inner cross-validation


def stratified_fraction(y: np.ndarray, rows: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random `fraction` of `rows` drawn per stratum (class; multi-label: label combination),
    round(fraction * n) rows of each, at least one; sorted."""
    if fraction >= 1.0:
        return rows
    strata = np.unique(np.asarray(y)[rows], axis=0, return_inverse=True)[1].reshape(-1)
    keep = []
    for s in np.unique(strata):
        members = rows[strata == s]
        keep.append(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(keep))


def validation_split(y, groups, rows: np.ndarray, fraction: float, seed: int,
                     multilabel: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train, val, grouped): about `fraction` of `rows` held out for early stopping.

    Stratified and grouped when possible; with too few groups it is not grouped (`grouped`
    False: the held-out rows only pick the epoch, they never score the model), and with classes
    too small to stratify it is not stratified. Empty val when no split can be made."""
    if fraction <= 0:
        return rows, rows[:0], True
    n_splits = max(2, round(1 / fraction))
    sub_y = np.asarray(y)[rows]
    sub_groups = groups[rows] if groups is not None else None
    grouped = sub_groups is None or len(np.unique(sub_groups)) >= n_splits
    for stratified in ((True, False) if not multilabel else (False,)):
        try:
            with warnings.catch_warnings():  # sklearn warns about small classes; the split is still valid
                warnings.simplefilter("ignore", UserWarning)
                # protloc.folds.splits stratifies single-label tasks only: multilabel=True gives plain (Group)KFold
                train, val = next(iter(splits(sub_y, sub_groups if grouped else None, n_splits, seed,
                                              multilabel=not stratified)))
            return rows[np.sort(train)], rows[np.sort(val)], grouped
        except (ProtlocError, StopIteration):
            continue
    return rows, rows[:0], grouped


def _carve(y, groups, rows, seed: int, stream: int, multilabel, fraction, val_fraction):
    """The fraction and validation split of one training part; `stream` (the fold) seeds the draw."""
    rows = stratified_fraction(y, rows, fraction, np.random.default_rng([seed, stream]))
    return validation_split(y, groups, rows, val_fraction, seed, multilabel)


def _warn(splits_made: list[Split], ungrouped: int, grouped_labels: bool, val_fraction: float) -> None:
    if grouped_labels and ungrouped:
        log.warning("too few groups to group %d of %d validation split(s): their validation rows may share groups "
                    "with training rows (they only pick the epoch; test folds stay grouped)",
                    ungrouped, len(splits_made))
    empty = sum(len(sp.val) == 0 for sp in splits_made)
    if val_fraction > 0 and empty:
        log.warning("%d of %d training part(s) too small for a validation split: those train all epochs",
                    empty, len(splits_made))


def plan(y: np.ndarray, groups, multilabel: bool, folds: int, seeds: int, seed: int = 0,
         fraction: float = 1.0, val_fraction: float = 0.1) -> list[Split]:
    """The folds x seeds splits of the protocol above."""
    out, ungrouped = [], 0
    for s in range(seed, seed + seeds):
        fold_list = list(splits(y, groups, folds, s, multilabel))
        for k, (train, test) in enumerate(fold_list):
            train, val, grouped = _carve(y, groups, np.sort(train), s, k, multilabel, fraction, val_fraction)
            ungrouped += not grouped
            out.append(Split(s, k, train, val, np.sort(test)))
    _warn(out, ungrouped, groups is not None, val_fraction)
    return out


def final_split(y: np.ndarray, groups, multilabel: bool, seed: int = 0, fraction: float = 1.0,
                val_fraction: float = 0.1) -> Split:
    """The fit that makes MODEL: all labelled rows as the training part."""
    train, val, grouped = _carve(y, groups, np.arange(len(y)), seed, 2**31, multilabel, fraction, val_fraction)
    split = Split(seed, None, train, val, np.arange(0))
    _warn([split], int(not grouped), groups is not None, val_fraction)
    return split


def cross_validate(task, y: np.ndarray, multilabel: bool, split_list: list[Split], on_epoch=None,
                   on_fit=None, scored: np.ndarray | None = None) -> tuple[list[RunResult], dict[int, np.ndarray]]:
    """Fit and test `task` on every split. `task.fit(train, val, seed, on_epoch)` returns a fitted
    model with `.best_epoch`, `.epochs` and `.C` (protloc.finetune.Fitted); `task.predict(fitted,
    rows)` its (rows, classes) probabilities. Each run is scored on the `scored` classes
    (protloc.folds.metrics; default all). Returns the runs and, per seed, the pooled out-of-fold
    probabilities."""
    runs, pooled = [], {}
    for sp in split_list:
        fitted = task.fit(sp.train, sp.val, sp.seed, on_epoch)
        probs = task.predict(fitted, sp.test)
        pooled.setdefault(sp.seed, np.full((len(y), y.shape[1]), np.nan, dtype=np.float32))[sp.test] = probs
        f1, acc = metrics(y[sp.test], predict(probs, multilabel), scored) or (None, None)
        runs.append(RunResult(sp.seed, sp.fold, f1, acc, len(sp.train), len(sp.val), len(sp.test),
                              fitted.best_epoch, fitted.epochs, fitted.C))
        if on_fit is not None:
            on_fit(runs[-1])
    return runs, pooled


def _mean_std(values) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def summarize(runs: list[RunResult], pooled: dict[int, np.ndarray], y: np.ndarray, classes: list[str],
              multilabel: bool, scored: np.ndarray | None = None) -> dict:
    """The JSON-able report: macro F1 and accuracy of the pooled out-of-fold predictions (mean +-
    std over seeds) and per fold (mean +- std over the runs that scored a row), per-class F1 (null
    for classes not scored) and the confusion matrix of the pooled predictions, and every run."""
    scored = np.ones(len(classes), dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    labels = list(range(len(classes)))
    per_seed, pooled_scores = [], []
    for seed, probs in pooled.items():
        pred = predict(probs, multilabel)
        per_class = per_class_f1(y, pred, scored)
        confusion = multilabel_confusion_matrix(y, pred) if multilabel else \
            confusion_matrix(y.argmax(1), pred.argmax(1), labels=labels)
        per_seed.append({"seed": seed, "per_class_f1": {c: float(f) if s else None
                                                        for c, f, s in zip(classes, per_class, scored)},
                         "confusion_matrix": confusion.tolist()})
        pooled_scores.append(metrics(y, pred, scored))
    fold_scores = [(r.macro_f1, r.accuracy) for r in runs if r.macro_f1 is not None]
    return {
        "classes": classes, "multilabel": multilabel,
        "scored_classes": [c for c, s in zip(classes, scored) if s],
        "macro_f1_pooled": _mean_std([f1 for f1, _ in pooled_scores]),
        "accuracy_pooled": _mean_std([acc for _, acc in pooled_scores]),
        "macro_f1": _mean_std([f1 for f1, _ in fold_scores]),
        "accuracy": _mean_std([acc for _, acc in fold_scores]),
        "per_class_f1": {c: float(np.mean([s["per_class_f1"][c] for s in per_seed])) if ok else None
                         for c, ok in zip(classes, scored)},
        "confusion_matrix": np.sum([s["confusion_matrix"] for s in per_seed], axis=0).tolist(),
        "confusion_matrix_layout": ("per class [[tn, fp], [fn, tp]]" if multilabel
                                    else "rows: true class, columns: predicted class (classes order)"),
        "seeds": per_seed,
        "runs": [asdict(r) for r in runs],
    }


def format_table(report: dict, folds: int, seeds: int) -> str:
    """Per-class F1 (pooled out-of-fold predictions), then macro F1 and accuracy: pooled (± std
    over seeds when several) beside per fold (mean ± std over folds x seeds), as plain text."""
    width = max(12, *(len(c) + 2 for c in report["classes"]))
    lines = [f"{'class':<{width}}F1"]
    lines += [f"{c:<{width}}{f'{f1:.3f}' if f1 is not None else 'n/a (rows in fewer than 2 groups: not scored)'}"
              for c, f1 in report["per_class_f1"].items()]
    for name, label in (("macro_f1", "macro F1"), ("accuracy", "accuracy")):
        pooled, per_fold = report[f"{name}_pooled"], report[name]
        lines.append(f"{label:<{width}}pooled {pooled['mean']:.3f}" + (f" ± {pooled['std']:.3f}" if seeds > 1 else "")
                     + f", per fold {per_fold['mean']:.3f} ± {per_fold['std']:.3f}"
                     + (f"   ({folds} folds x {seeds} seed{'s' if seeds != 1 else ''})" if name == "macro_f1" else ""))
    return "\n".join(lines)
