"""The evaluation protocol of `protloc finetune`: repeated cross-validation and its metrics.

For each seed s in seed, seed + 1, ... (`--seeds`), the labelled rows are split into `--folds`
folds (stratified by class, grouped by the labels' group column when present, so no protein is
on both sides: protloc.knn.splits, seeded by s). For each fold:

    training part  the other folds
      -> a stratified fraction of it, at least one row per class (`--fraction`, seeded by s)
      -> a validation split carved from that (`--val-fraction`: 1 / round(1 / f) of it,
         stratified and grouped), used only for early stopping
    test part      the fold itself, always whole

Every row is tested once per seed. Macro F1 and accuracy are computed per fold (as in
protloc.knn: macro over the classes present in the fold's truth or predictions) and reported as
mean +- population std over folds x seeds, like the study's tables. Per-class F1 and the
confusion matrix come from each seed's pooled out-of-fold predictions (per-class F1 averaged
over seeds, confusion matrices summed).

The MODEL that finetune writes is one more fit whose training part is all labelled rows
(`final_split`), with the same fraction and validation carving.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, multilabel_confusion_matrix

from protloc.errors import ProtlocError
from protloc.knn import metrics, predict, splits

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
    macro_f1: float
    accuracy: float
    n_train: int
    n_val: int
    n_test: int
    best_epoch: int  # 1-based epoch whose weights were kept
    epochs: int  # epochs run before stopping


def check_classes(y: np.ndarray, classes: list[str], folds: int, source: str) -> None:
    """A class needs 2 labelled rows to be both trained on and tested; fewer than `folds` rows
    leave some folds without it (allowed, with a warning)."""
    counts = np.asarray(y).sum(0)
    lonely = [f"{c} ({int(k)})" for c, k in zip(classes, counts) if k < 2]
    if lonely:
        raise ProtlocError(f"{source}: class(es) with fewer than 2 labelled rows cannot be cross-validated: "
                           f"{', '.join(lonely[:5])}; label more, drop them, or use --folds 0 to only fit a model")
    few = [c for c, k in zip(classes, counts) if k < folds]
    if few:
        log.warning("class(es) %s have fewer rows than the %d folds: some folds test none of them",
                    ", ".join(few[:5]), folds)


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
                # protloc.knn.splits stratifies single-label tasks only: multilabel=True gives plain (Group)KFold
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
                    "with training rows (they only pick the epoch; test folds stay grouped)", ungrouped, len(splits_made))
    empty = sum(len(sp.val) == 0 for sp in splits_made)
    if val_fraction > 0 and empty:
        log.warning("%d of %d training part(s) too small for a validation split: those train all epochs",
                    empty, len(splits_made))


def plan(y: np.ndarray, groups, multilabel: bool, folds: int, seeds: int, seed: int = 0,
         fraction: float = 1.0, val_fraction: float = 0.1) -> list[Split]:
    """The folds x seeds splits of the protocol above."""
    out, ungrouped = [], 0
    for s in range(seed, seed + seeds):
        with warnings.catch_warnings():  # sklearn warns about classes smaller than the folds: check_classes does
            warnings.simplefilter("ignore", UserWarning)
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
                   on_fit=None) -> tuple[list[RunResult], dict[int, np.ndarray]]:
    """Fit and test `task` on every split. `task.fit(train, val, seed, on_epoch)` returns a fitted
    model with `.best_epoch` and `.epochs`; `task.predict(fitted, rows)` its (rows, classes)
    probabilities. Returns the runs and, per seed, the pooled out-of-fold probabilities."""
    runs, pooled = [], {}
    for sp in split_list:
        fitted = task.fit(sp.train, sp.val, sp.seed, on_epoch)
        probs = task.predict(fitted, sp.test)
        pooled.setdefault(sp.seed, np.full((len(y), y.shape[1]), np.nan, dtype=np.float32))[sp.test] = probs
        f1, acc = metrics(y[sp.test], predict(probs, multilabel), multilabel)
        runs.append(RunResult(sp.seed, sp.fold, f1, acc, len(sp.train), len(sp.val), len(sp.test),
                              fitted.best_epoch, fitted.epochs))
        if on_fit is not None:
            on_fit(runs[-1])
    return runs, pooled


def summarize(runs: list[RunResult], pooled: dict[int, np.ndarray], y: np.ndarray, classes: list[str],
              multilabel: bool) -> dict:
    """The JSON-able report: mean +- std macro F1 and accuracy over runs, per-class F1 and the
    confusion matrix of the pooled out-of-fold predictions, and every run."""
    labels = list(range(len(classes)))
    per_seed = []
    for seed, probs in pooled.items():
        pred = predict(probs, multilabel)
        per_class = f1_score(y, pred, labels=labels, average=None, zero_division=0) if multilabel else \
            f1_score(y.argmax(1), pred.argmax(1), labels=labels, average=None, zero_division=0)
        confusion = multilabel_confusion_matrix(y, pred) if multilabel else \
            confusion_matrix(y.argmax(1), pred.argmax(1), labels=labels)
        per_seed.append({"seed": seed, "per_class_f1": dict(zip(classes, map(float, per_class))),
                         "confusion_matrix": confusion.tolist()})
    f1s, accs = [r.macro_f1 for r in runs], [r.accuracy for r in runs]
    return {
        "classes": classes, "multilabel": multilabel,
        "macro_f1": {"mean": float(np.mean(f1s)), "std": float(np.std(f1s)), "n": len(runs)},
        "accuracy": {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(runs)},
        "per_class_f1": {c: float(np.mean([s["per_class_f1"][c] for s in per_seed])) for c in classes},
        "confusion_matrix": np.sum([s["confusion_matrix"] for s in per_seed], axis=0).tolist(),
        "confusion_matrix_layout": ("per class [[tn, fp], [fn, tp]]" if multilabel
                                    else "rows: true class, columns: predicted class (classes order)"),
        "seeds": per_seed,
        "runs": [asdict(r) for r in runs],
    }


def format_table(report: dict, folds: int, seeds: int) -> str:
    """Per-class F1, then macro F1 and accuracy as mean ± std, as plain text."""
    width = max(12, *(len(c) + 2 for c in report["classes"]))
    lines = [f"{'class':<{width}}F1"]
    lines += [f"{c:<{width}}{f1:.3f}" for c, f1 in report["per_class_f1"].items()]
    for name in ("macro_f1", "accuracy"):
        m = report[name]
        label = "macro F1" if name == "macro_f1" else "accuracy"
        lines.append(f"{label:<{width}}{m['mean']:.3f} ± {m['std']:.3f}"
                     + (f"   ({folds} folds x {seeds} seed{'s' if seeds != 1 else ''})" if name == "macro_f1" else ""))
    return "\n".join(lines)
