"""Classification heads on embeddings: the head, its loss, class balance, early stopping, and
the linear probe.

The study's frozen-backbone protocol trains a head on fixed embeddings; full fine-tuning trains
the same head together with the backbone. Two heads:

    linear   D -> classes
    mlp      D -> 512 -> 256 -> classes, ReLU and dropout 0.5 after each hidden layer

Single-label tasks use softmax cross-entropy, multi-label tasks (labels `a;b`) a sigmoid per
class with binary cross-entropy; a class is predicted at probability >= 0.5 (protloc.folds.predict).
Class balance, for a macro F1 that weighs rare classes as much as common ones:

    weight   the loss weighs class c by n / (n_classes * n_c) (multi-label: positives of c by
             negatives / positives of c)
    sample   each epoch draws n training rows with replacement, a row with probability
             proportional to 1 / n_c (multi-label: the mean over its classes)
    none     plain loss, plain shuffling

The linear head on frozen embeddings is a linear probe (`fit_linear_probe`): L2-regularized
logistic regression solved to convergence by L-BFGS on all training rows at once, its
regularization chosen by inner cross-validation, as linear probes of self-supervised features
are conventionally evaluated: CLIP (Radford et al. 2021, appendix A.3: scikit-learn's L-BFGS
logistic regression, the L2 strength swept on a log grid against validation data) and DINOv2
(Oquab et al. 2023, dinov2/eval/log_regression.py: C = 10^-6 .. 10^5 chosen on 10 % of the
training set, then refit on all of it). The mlp head and full fine-tuning train by AdamW steps
(protloc.finetune).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.special import log_expit, log_softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from protloc.errors import ProtlocError
from protloc.folds import metrics, predict, splits

log = logging.getLogger(__name__)

HEADS = ("linear", "mlp")
BALANCES = ("weight", "sample", "none")

# The linear probe: C (the inverse L2 strength of scikit-learn's LogisticRegression) is chosen from
# 1e-4 .. 1e4 in half decades by PROBE_FOLDS-fold inner cross-validation; L-BFGS runs to
# scikit-learn's tolerance or PROBE_MAX_ITER iterations (a fit that needs more is reported).
PROBE_C = tuple(float(c) for c in np.logspace(-4, 4, 17))
PROBE_FOLDS = 5
PROBE_MAX_ITER = 2000


class Head(nn.Module):
    """Standardize features (a fixed affine map, set from the training rows), then linear or MLP."""

    def __init__(self, dim: int, n_classes: int, kind: str = "linear"):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown head {kind!r}")
        self.kind = kind
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if kind == "linear":
            self.net = nn.Linear(dim, n_classes)
        else:
            self.net = nn.Sequential(nn.Linear(dim, 512), nn.ReLU(), nn.Dropout(0.5),
                                     nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.5),
                                     nn.Linear(256, n_classes))

    @torch.no_grad()
    def standardize_with(self, x: torch.Tensor) -> None:
        """Center and scale each feature by the training rows' statistics: embeddings of a random or
        barely trained backbone vary in tiny ranges, and a head's learning rate should not depend
        on the backbone."""
        std, mean = torch.std_mean(x, dim=0, correction=0)
        self.mean.copy_(mean)
        self.std.copy_(std.clamp(min=1e-6 * max(float(std.max()), 1e-12)))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def probabilities(logits: torch.Tensor, multilabel: bool) -> np.ndarray:
    """(n, classes) float32: softmax (rows sum to 1), or a sigmoid per class for multi-label."""
    p = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    return p.detach().float().cpu().numpy()


def targets(y: np.ndarray, multilabel: bool) -> torch.Tensor:
    """(n, classes) 0/1 indicators -> class indices (cross-entropy) or float indicators (BCE)."""
    y = torch.as_tensor(np.asarray(y))
    return y.float() if multilabel else y.argmax(1)


def loss_function(y_train: np.ndarray, multilabel: bool, balance: str, device="cpu"):
    """loss(logits, targets) for this training part, class-weighted when balance == "weight"."""
    y = np.asarray(y_train, dtype=np.float64)
    n, positives = len(y), y.sum(0)
    if multilabel:
        pos_weight = None
        if balance == "weight":  # negatives / positives per class; a class without positives: 1
            pos_weight = torch.tensor(np.where(positives > 0, (n - positives) / np.maximum(positives, 1), 1.0),
                                      dtype=torch.float32, device=device)
        return lambda logits, t: F.binary_cross_entropy_with_logits(logits, t, pos_weight=pos_weight)
    weight = None
    if balance == "weight":
        weight = torch.tensor(class_weights(y), dtype=torch.float32, device=device)
    return lambda logits, t: F.cross_entropy(logits, t, weight=weight)


def class_weights(y: np.ndarray) -> np.ndarray:
    """(n_classes,) n / (n_present * n_c) of 0/1 indicators (n, n_classes), 0 for a class without
    rows: every present class weighs the same in total (scikit-learn's class_weight='balanced')."""
    counts = np.asarray(y, dtype=np.float64).sum(0)
    present = counts > 0
    w = np.zeros(len(counts))
    w[present] = len(y) / (present.sum() * counts[present])
    return w


def sample_weights(y_train: np.ndarray) -> torch.Tensor:
    """Per row: the mean of 1 / n_c over its classes (single-label: 1 / n_c of its class)."""
    y = np.asarray(y_train, dtype=np.float64)
    inverse = 1.0 / np.maximum(y.sum(0), 1)
    return torch.tensor((y * inverse).sum(1) / y.sum(1), dtype=torch.float64)


def epoch_order(n: int, balance: str, weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Training row positions of one epoch: a permutation, or a class-balanced draw of n rows."""
    if balance == "sample":
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator)


def epoch_batches(n: int, steps: int, batch_size: int, balance: str, weights: torch.Tensor | None,
                  generator: torch.Generator) -> list[torch.Tensor]:
    """Training row positions of the `steps` batches of one epoch: passes of epoch_order over the
    n rows, each cut into batches of batch_size (its last one smaller), as many passes as `steps`
    batches take (protloc.finetune.steps_per_epoch: one pass, or more for small data)."""
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        batches.extend(epoch_order(n, balance, weights, generator).split(batch_size))
    return batches[:steps]


class EarlyStopping:
    """Keeps the weights of the best epoch: highest validation macro F1, ties broken by the lower
    validation loss (a small validation set saturates F1 early). Stops after `patience` epochs
    without improvement."""

    def __init__(self, patience: int, *modules: nn.Module):
        self.patience, self.modules = patience, modules
        self.best: tuple[float, float] | None = None
        self.best_epoch = -1
        self.best_states = None

    def step(self, epoch: int, f1: float, loss: float) -> bool:
        """Record an epoch's validation scores; True when training should stop."""
        if self.best is None or (f1, -loss) > self.best:
            self.best, self.best_epoch = (f1, -loss), epoch
            self.best_states = [copy.deepcopy(m.state_dict()) for m in self.modules]
        return epoch - self.best_epoch >= self.patience

    def restore(self) -> None:
        if self.best_states is not None:
            for module, state in zip(self.modules, self.best_states):
                module.load_state_dict(state)


# --- the linear probe -----------------------------------------------------------------------------


@dataclass
class Probe:
    head: Head  # standardization of the training rows, then the logistic regression's weights
    C: float  # the chosen inverse L2 strength
    inner_folds: int  # folds of the inner cross-validation that chose C (0: too few rows, C = 1)
    inner_grouped: bool  # whether those folds kept groups apart


def _problems(y: np.ndarray, multilabel: bool, balance: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The logistic regressions of a probe: one multinomial (single-label) or one binary per class
    (multi-label, one vs rest). Each: (targets (n,) class codes, row weights (n,) of mean 1): the
    class balance of `loss_function` and `sample_weights` as sample weights."""
    y = np.asarray(y, dtype=bool)
    drawn = sample_weights(y).numpy() if balance == "sample" else None
    problems = []
    for t in ([y] if not multilabel else [np.stack([~y[:, c], y[:, c]], 1) for c in range(y.shape[1])]):
        codes = t.argmax(1)
        w = class_weights(t)[codes] if balance == "weight" else drawn if drawn is not None else np.ones(len(t))
        problems.append((codes, w / w.mean()))
    return problems


def _solve(z: np.ndarray, codes: np.ndarray, w: np.ndarray, n_classes: int, C: float,
           solver: LogisticRegression | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits map (W (n_classes, D), b (n_classes,)) of one logistic regression on standardized
    rows z (n, D); `solver` (warm-started along a C path) or a new one. Classes without rows get
    weight 0 and bias -inf (probability 0: never predicted), the limit the regularized fit tends
    to (the intercept is not penalized); a single present class gets probability 1."""
    present = np.unique(codes)
    W, b = np.zeros((n_classes, z.shape[1])), np.full(n_classes, -np.inf)
    if len(present) == 1:
        b[present] = 0.0
        return W, b
    solver = solver or LogisticRegression(max_iter=PROBE_MAX_ITER)
    solver.set_params(C=C).fit(z, codes, sample_weight=w)
    coef, intercept = solver.coef_, solver.intercept_
    if len(present) == 2:  # binary: sigmoid(coef . z + intercept) is the second class's probability
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    W[present], b[present] = coef, intercept
    return W, b


def _head_logits(solutions: list[tuple[np.ndarray, np.ndarray]], multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    """The head's (W (classes, D), b (classes,)): the multinomial's own, or per class the binary
    regression's logit (its positive minus its negative logit: sigmoid of it is P(class))."""
    if not multilabel:
        return solutions[0]
    return (np.stack([W[1] - W[0] for W, _ in solutions]), np.array([b[1] - b[0] for _, b in solutions]))


def _log_loss(logits: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    """Mean negative log-likelihood of 0/1 indicators y under logits (n, classes); each term at
    most -log(float64 eps), as scikit-learn's log_loss clips (a class the fit never saw)."""
    cap = -np.log(np.finfo(np.float64).eps)
    if multilabel:
        nll = -np.where(y, log_expit(logits), log_expit(-logits))
        return float(np.minimum(nll, cap).sum(1).mean())
    return float(np.minimum(-log_softmax(logits, axis=1)[np.asarray(y, dtype=bool)], cap).mean())


def _inner_folds(y: np.ndarray, groups, multilabel: bool, seed: int) -> tuple[list, bool]:
    """The inner folds that choose C: up to PROBE_FOLDS, grouped when the rows hold 2 groups or
    more (as the outer folds are), else by row; stratified for single-label (protloc.folds.splits).
    ([], False) when no 2 folds can be made."""
    for grouping in ((groups, None) if groups is not None else (None,)):
        units = len(np.unique(grouping)) if grouping is not None else len(y)
        for k in range(min(PROBE_FOLDS, units), 1, -1):
            try:
                with warnings.catch_warnings():  # small classes: the folds are still valid
                    warnings.simplefilter("ignore", UserWarning)
                    folds = list(splits(y, grouping, k, seed, multilabel))
            except ProtlocError:
                continue
            if len(folds) >= 2:
                return folds, grouping is not None
    return [], False


def _choose_C(z, y, groups, multilabel: bool, balance: str, seed: int) -> tuple[float, int, bool]:
    """(C, inner folds, grouped): the PROBE_C value whose pooled out-of-fold predictions score the
    highest macro F1 (protloc.folds.metrics), ties broken by the lower log loss, then the smaller
    C, as EarlyStopping picks an epoch. Every inner fold fits the C path from the smallest C up,
    each fit warm-started from the previous one, its class balance from its own rows."""
    folds, grouped = _inner_folds(y, groups, multilabel, seed)
    if not folds:
        log.warning("%d training rows are too few to choose the linear probe's C by cross-validation: C = 1 "
                    "(scikit-learn's default)", len(y))
        return 1.0, 0, False
    n_classes = y.shape[1]
    logits = np.zeros((len(PROBE_C), len(y), n_classes))
    with warnings.catch_warnings():  # a large C on separable rows may not converge; it then scores as it is
        warnings.simplefilter("ignore", ConvergenceWarning)
        for train, val in folds:
            problems = _problems(y[train], multilabel, balance)
            solvers = [LogisticRegression(max_iter=PROBE_MAX_ITER, warm_start=True) for _ in problems]
            for i, C in enumerate(PROBE_C):
                solutions = [_solve(z[train], codes, w, 2 if multilabel else n_classes, C, solver)
                             for (codes, w), solver in zip(problems, solvers)]
                W, b = _head_logits(solutions, multilabel)
                logits[i, val] = z[val] @ W.T + b
    best, best_score = 0, None
    for i in range(len(PROBE_C)):
        probs = probabilities(torch.from_numpy(logits[i]), multilabel)
        score = (metrics(y, predict(probs, multilabel))[0], -_log_loss(logits[i], y, multilabel))
        if best_score is None or score > best_score:
            best, best_score = i, score
    return PROBE_C[best], len(folds), grouped


def fit_linear_probe(x: np.ndarray, y: np.ndarray, groups, multilabel: bool, balance: str, seed: int) -> Probe:
    """A linear head fitted to convergence on embedding rows x (n, D) with 0/1 labels y (n, classes).

    The rows are standardized (Head.standardize_with), then an L2-regularized logistic regression
    (scikit-learn, L-BFGS, all rows at once) is fitted: multinomial for single-label, one binary
    regression per class for multi-label. Class balance as the other heads (`balance`: "weight"
    -> class weights n / (classes x n_c), per binary problem for multi-label; "sample" -> each
    row weighted by sample_weights; "none"). C, the inverse regularization strength, is chosen from
    PROBE_C (1e-4 .. 1e4) by inner cross-validation on these rows only (_choose_C; folds grouped
    by `groups` (n,) when there are 2 groups or more, seeded by `seed`), then the probe is refit on
    all of them. The result is an ordinary `Head("linear")`: predict applies it as any head, and its
    probabilities equal scikit-learn's predict_proba on the standardized rows. Warns when L-BFGS
    stops at PROBE_MAX_ITER iterations before converging.

    It runs on one BLAS thread: L-BFGS's matrix products on up to thousands of rows are too small
    to share, and a second thread that waits for a busy core made the same fit 20 to 60 times
    slower on a shared 2-core machine (1,000 and 4,000 rows of 192-d embeddings)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_linear_probe(x, y, groups, multilabel, balance, seed)


def _fit_linear_probe(x, y, groups, multilabel: bool, balance: str, seed: int) -> Probe:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=bool)
    head = Head(x.shape[1], y.shape[1], "linear")
    head.standardize_with(torch.from_numpy(x))
    z = (x.astype(np.float64) - head.mean.double().numpy()) / head.std.double().numpy()
    groups = np.asarray(groups) if groups is not None else None
    C, inner_folds, inner_grouped = _choose_C(z, y, groups, multilabel, balance, seed)
    solutions = []
    for codes, w in _problems(y, multilabel, balance):
        solver = LogisticRegression(max_iter=PROBE_MAX_ITER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            solutions.append(_solve(z, codes, w, 2 if multilabel else y.shape[1], C, solver))
        if hasattr(solver, "n_iter_") and solver.n_iter_.max() >= PROBE_MAX_ITER:
            log.warning("the linear probe did not converge in %d L-BFGS iterations (C = %g): its weights are "
                        "those of the last iteration", PROBE_MAX_ITER, C)
    W, b = _head_logits(solutions, multilabel)
    with torch.no_grad():
        head.net.weight.copy_(torch.from_numpy(W))
        head.net.bias.copy_(torch.from_numpy(b))
    if inner_folds and groups is not None and not inner_grouped:
        log.warning("too few groups in a training part to group the linear probe's inner folds: its C was chosen "
                    "on folds split by row")
    return Probe(head.eval(), C, inner_folds, inner_grouped)
