"""Classification heads on embeddings: the head, its loss, class balance and early stopping.

The study's frozen-backbone protocol trains a head on fixed embeddings; full fine-tuning trains
the same head together with the backbone. Two heads:

    linear   D -> classes
    mlp      D -> 512 -> 256 -> classes, ReLU and dropout 0.5 after each hidden layer

Single-label tasks use softmax cross-entropy, multi-label tasks (labels `a;b`) a sigmoid per
class with binary cross-entropy; a class is predicted at probability >= 0.5 (protloc.knn.predict).
Class balance, for a macro F1 that weighs rare classes as much as common ones:

    weight   the loss weighs class c by n / (n_classes * n_c) (multi-label: positives of c by
             negatives / positives of c)
    sample   each epoch draws n training rows with replacement, a row with probability
             proportional to 1 / n_c (multi-label: the mean over its classes)
    none     plain loss, plain shuffling
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("linear", "mlp")
BALANCES = ("weight", "sample", "none")


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
    if balance == "weight":  # n / (n_classes * n_c): every class weighs the same in total
        present = positives > 0
        w = np.zeros(len(positives))
        w[present] = n / (present.sum() * positives[present])
        weight = torch.tensor(w, dtype=torch.float32, device=device)
    return lambda logits, t: F.cross_entropy(logits, t, weight=weight)


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
