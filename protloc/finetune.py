"""Training a localization classifier: a head on frozen embeddings, or a fine-tuned backbone.

The study's two transfer protocols (arXiv 2604.10970):

- frozen (`FrozenTask`): the backbone's embeddings are computed once (or read from an embeddings
  file); a head (protloc.head) is trained on them as tensors. The linear head is a linear probe
  solved to convergence (protloc.head.fit_linear_probe: L-BFGS logistic regression, C by inner
  cross-validation); the mlp head trains by AdamW on mini-batches for `epochs` epochs, with early
  stopping when given a validation split. Fast on a CPU.
- full fine-tuning (`FullTask`): backbone and head are trained together from images. Each step
  decodes a batch, cuts DINO's 2 global crops of every image at the view size with the
  pretraining augmentations (protloc.augment: random resized crop, flips and 90-degree rotations,
  intensity jitter, blur, noise; no local crops) and trains on both crops. The backbone's
  learning rate is the head's times `backbone_lr_scale`, optionally decayed layer by layer
  (block i of L gets layer_decay ** (L - i), the embeddings layer_decay ** (L + 1)); linear
  warm-up over the first epoch, then cosine. Evaluation embeds the whole image resized to the
  view size, exactly as `protloc embed --size` and `protloc predict` do.

Steps scale with the data, never below `min_steps` per fit: an epoch of the mlp head or of full
fine-tuning is one pass over the training rows in batches, or as many passes as make
min_steps / epochs steps when one pass makes fewer (`steps_per_epoch`). A fixed number of
epochs of one batch each gave a small data set a fixed, small number of updates: 100 AdamW
steps at 1e-3 left a linear head near its random initialization.

Both restore the weights of the best validation epoch (protloc.head.EarlyStopping).
Cross-validation over these tasks is protloc.crossval; the MODEL file is protloc.classifier.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from protloc.augment import NORMALIZE, MultiCropConfig, crop_view, multi_crop, protein_channel
from protloc.data import ViewOptions, index_batches, loader, model_view, on_device, probe_channels, usable
from protloc.device import autocast
from protloc.dino import cosine_schedule, param_groups
from protloc.embed import embed
from protloc.errors import ProtlocError
from protloc.folds import evaluation_groups, metrics, predict
from protloc.head import (EarlyStopping, Head, epoch_batches, fit_linear_probe, loss_function, probabilities,
                           sample_weights, targets)
from protloc.ids import image_of
from protloc.labels import Matched
from protloc.model import VisionTransformer, no_scaling
from protloc.sources import Source

MIN_LR = 1e-6  # end of the full fine-tuning cosine, as DINO's


# full fine-tuning's settings where they differ from a frozen run's (FinetuneConfig's defaults): a head
# on frozen features takes more, larger steps and no validation split (a small one picks a noisy epoch)
FULL_TUNING = {"epochs": 30, "min_steps": 300, "batch_size": 32, "val_fraction": 0.1}
# the settings of stepwise training, which the linear probe (solved to convergence) does not use
STEP_SETTINGS = ("epochs", "min_steps", "patience", "lr", "weight_decay", "batch_size", "val_fraction")


@dataclass
class FinetuneConfig:
    freeze: bool = True
    head: str = "linear"  # frozen: the linear probe, which takes none of the STEP_SETTINGS
    epochs: int = 100
    min_steps: int = 500  # optimizer steps per fit at least (steps_per_epoch)
    patience: int = 20  # epochs without a better validation score before stopping
    lr: float = 1e-3  # the head's; the backbone's is lr * backbone_lr_scale
    weight_decay: float = 0.05  # AdamW, weight matrices only
    batch_size: int = 256
    val_fraction: float = 0.0  # of each training split, held out for early stopping (0: none, all epochs)
    balance: str = "weight"
    backbone_lr_scale: float = 0.1
    layer_decay: float = 1.0  # 1: every backbone layer at the same learning rate
    size: int = 224  # full fine-tuning: the view size of training crops and evaluation (unless the checkpoint has one)
    pool: str = "cls"  # unless the checkpoint records another
    clip_grad: float = 3.0  # full fine-tuning: global gradient norm clip

    @classmethod
    def for_mode(cls, freeze: bool, head: str = "linear", **settings) -> FinetuneConfig:
        """A frozen run's or full fine-tuning's settings: each of `settings` that is not None, else the
        mode's default (FULL_TUNING). The linear probe holds out no validation rows."""
        cfg = cls(freeze=freeze, head=head, **{**({} if freeze else FULL_TUNING),
                                               **{k: v for k, v in settings.items() if v is not None}})
        return dataclasses.replace(cfg, val_fraction=0.0) if cfg.probe else cfg

    @property
    def probe(self) -> bool:
        """The frozen linear head: a linear probe (protloc.head.fit_linear_probe)."""
        return self.freeze and self.head == "linear"

    def with_view(self, view: ViewOptions) -> tuple[FinetuneConfig, ViewOptions]:
        """(settings, view) of a run from images: full fine-tuning crops and evaluates at the view's size
        (the flag's, else the model's) or `size`; a frozen run embeds as `view` says (native size: None)."""
        cfg = dataclasses.replace(self, size=view.size or self.size, pool=view.pool)
        return cfg, view if self.freeze else dataclasses.replace(view, size=cfg.size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_mode(freeze: bool, view: ViewOptions) -> None:
    """Full fine-tuning trains on crops of whole images, every channel through the model at once."""
    if freeze:
        return
    if view.channel_strategy == "per-channel":
        raise ProtlocError("--channel-strategy per-channel goes with --freeze (it embeds each channel on its own)")
    if view.tile is not None or view.cells is not None:
        raise ProtlocError("--tile and --cells go with --freeze (full fine-tuning trains on crops of whole images)")


@dataclass
class LabelledRows:
    """The rows to train and test on: embedding rows (images, or tiles) with their labels."""
    ids: list[str]
    y: np.ndarray  # (n, classes) uint8 indicators
    groups: np.ndarray | None  # cross-validation groups
    classes: list[str]
    multilabel: bool


def labelled_rows(matched: Matched) -> LabelledRows:
    """The labelled embedding rows that protloc.labels.match_rows found, grouped for
    cross-validation (protloc.folds.evaluation_groups)."""
    return LabelledRows(matched.ids, matched.y, evaluation_groups(matched.ids, matched.groups), matched.classes,
                        matched.multilabel)


def rows_of(labelled: LabelledRows, ids: list[str]) -> LabelledRows:
    """Rows `ids` (the labelled images themselves, or their tiles) with their image's labels."""
    index = {image: k for k, image in enumerate(labelled.ids)}
    take = [index[image_of(i)] for i in ids]
    groups = labelled.groups[take] if labelled.groups is not None else None
    return LabelledRows(list(ids), labelled.y[take], evaluation_groups(list(ids), groups), labelled.classes,
                        labelled.multilabel)


def embed_all(model, sources, opts, **kw) -> tuple[list[str], np.ndarray]:
    """Every row of protloc.embed.embed gathered: (ids, (n, D) float32)."""
    ids, chunks = [], []
    for batch_ids, vectors in embed(model, sources, opts, **kw):
        ids.extend(batch_ids)
        chunks.append(vectors)
    return ids, (np.concatenate(chunks) if chunks else np.zeros((0, model.dim), np.float32))


def train_view(backbone: VisionTransformer, opts: ViewOptions, sources: list[Source], on_error: str) -> ViewOptions:
    """How full fine-tuning reads an image (protloc.augment.crop_view); for a channel-layout
    backbone every image with the channels of the first."""
    config = backbone.config
    channels = probe_channels(sources, model_view(opts, config), on_error) if config.layout == "channel" else None
    return crop_view(opts, config, channels)


def readable(backbone: VisionTransformer, sources: list[Source], opts: ViewOptions, workers: int,
             on_error: str) -> list[int]:
    """Indices of the sources that full fine-tuning can train on (one decoding pass of train_view;
    a bad image fails or, with on_error="skip", is logged and left out)."""
    view = train_view(backbone, opts, sources, on_error)
    return [item.index for item in loader(sources, view, workers) if usable(item, on_error)]


def steps_per_epoch(n_train: int, cfg: FinetuneConfig) -> int:
    """Optimizer steps of one epoch of n_train rows: one pass in batches of cfg.batch_size, or
    more passes when one makes fewer than cfg.min_steps / cfg.epochs steps (protloc.head.epoch_batches)."""
    return max(math.ceil(n_train / cfg.batch_size), math.ceil(cfg.min_steps / cfg.epochs))


@dataclass
class Fitted:
    head: Head
    backbone: VisionTransformer | None  # None: a head on frozen embeddings
    best_epoch: int | None  # 1-based epoch whose weights were kept; None: the linear probe (no epochs)
    epochs: int | None  # epochs run
    C: float | None = None  # the linear probe's inverse L2 strength, chosen by inner cross-validation


def _run_epochs(cfg: FinetuneConfig, train_epoch, evaluate, stopper: EarlyStopping, has_val: bool, on_epoch):
    """Epoch loop with early stopping; returns (best epoch, epochs run), 1-based."""
    for epoch in range(cfg.epochs):
        train_epoch(epoch)
        f1 = None
        stop = False
        if has_val:
            f1, loss = evaluate()
            stop = stopper.step(epoch, f1, loss)
        if on_epoch is not None:
            on_epoch(epoch + 1, f1)
        if stop:
            break
    stopper.restore()
    return (stopper.best_epoch + 1 if has_val else epoch + 1), epoch + 1


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Run a head's small steps on one CPU thread: at these sizes waking torch's worker threads
    costs more than the arithmetic (on a busy 2-core machine, 10 ms per op instead of 10 us)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class FrozenTask:
    """A head on fixed embeddings x (n, D): the linear probe, or the mlp head trained as tensors.
    The linear probe chooses its C by inner cross-validation on `train` (grouped by rows.groups)
    and uses no validation rows."""

    def __init__(self, x: np.ndarray, rows: LabelledRows, cfg: FinetuneConfig, device="cpu"):
        self.device = torch.device(device)
        self.x = torch.as_tensor(np.asarray(x, dtype=np.float32)).to(self.device)
        self.rows, self.cfg = rows, cfg
        self.t = targets(rows.y, rows.multilabel).to(self.device)

    def fit(self, train: np.ndarray, val: np.ndarray, seed: int, on_epoch=None) -> Fitted:
        with one_cpu_thread(self.device):
            return self._fit(train, val, seed, on_epoch)

    def _fit(self, train, val, seed, on_epoch):
        cfg, rows, x, t = self.cfg, self.rows, self.x, self.t
        if cfg.head == "linear":
            groups = rows.groups[train] if rows.groups is not None else None
            probe = fit_linear_probe(x[train].cpu().numpy(), rows.y[train], groups, rows.multilabel, cfg.balance, seed)
            return Fitted(probe.head, None, None, None, probe.C)
        torch.manual_seed(seed)
        head = Head(x.shape[1], len(rows.classes), cfg.head).to(self.device)
        head.standardize_with(x[train])
        loss_fn = loss_function(rows.y[train], rows.multilabel, cfg.balance, self.device)
        optimizer = torch.optim.AdamW(param_groups(head), lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        weights = sample_weights(rows.y[train]) if cfg.balance == "sample" else None
        train_t = torch.as_tensor(train, device=self.device)
        steps = steps_per_epoch(len(train), cfg)

        def train_epoch(_epoch):
            head.train()
            for chunk in epoch_batches(len(train), steps, cfg.batch_size, cfg.balance, weights, generator):
                idx = train_t[chunk.to(self.device)]
                loss = loss_fn(head(x[idx]), t[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        def evaluate():
            head.eval()
            with torch.no_grad():
                logits = head(x[val])
                loss = float(loss_fn(logits, t[val]))
            f1, _ = metrics(rows.y[val], predict(probabilities(logits, rows.multilabel), rows.multilabel))
            return f1, loss

        stopper = EarlyStopping(cfg.patience, head)
        best, epochs = _run_epochs(cfg, train_epoch, evaluate, stopper, len(val) > 0, on_epoch)
        return Fitted(head.eval().cpu(), None, best, epochs)

    def predict(self, fitted: Fitted, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return probabilities(fitted.head.eval()(self.x[rows].cpu()), self.rows.multilabel)


def layer_groups(backbone: VisionTransformer, head: Head, cfg: FinetuneConfig) -> list[dict]:
    """AdamW parameter groups with an `lr_scale` each: 1 for the head, backbone_lr_scale times
    layer_decay ** (depth + 1 - layer) for the backbone (layer 0: patch, position, class and
    channel embeddings; i + 1: block i; depth + 1: the final norm). No weight decay on biases,
    norms and embeddings."""
    depth = len(backbone.blocks)
    groups: dict[tuple[float, bool], dict] = {}

    def add(p, scale, decay):
        group = groups.setdefault((scale, decay), {"params": [], "lr_scale": scale,
                                                   "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(p)

    for name, p in backbone.named_parameters():
        layer = (int(name.split(".")[1]) + 1 if name.startswith("blocks.")
                 else depth + 1 if name.startswith("norm.") else 0)
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed", "channel_embed")
        add(p, cfg.backbone_lr_scale * cfg.layer_decay ** (depth + 1 - layer), not no_decay)
    for name, p in head.named_parameters():
        add(p, 1.0, not (p.ndim == 1 or name.endswith(".bias")))
    return list(groups.values())


class FullTask:
    """Backbone and head trained together from images; every fit starts from `backbone`."""

    def __init__(self, backbone: VisionTransformer, sources: list[Source], rows: LabelledRows, cfg: FinetuneConfig,
                 view: ViewOptions, device="cpu", workers: int = 2):
        """`sources`: those `readable` kept; `view`: how images are read, its normalization (with
        the data set's statistics for "dataset") that of the crops and evaluation views."""
        normalize = view.normalize
        if normalize not in NORMALIZE:
            raise ProtlocError(f"full fine-tuning augments images normalized {', '.join(NORMALIZE)}; this run asks "
                               f"for '{normalize}' (use --freeze, or --normalize)")
        check_mode(False, view)
        self.start, self.sources, self.rows, self.cfg = backbone, sources, rows, cfg
        self.device, self.workers = torch.device(device), workers
        # on_step(loss, images) after every optimizer step: for progress, and a place to stop (what
        # it raises ends the fit there)
        self.on_step = None
        self.train_view = train_view(backbone, view, sources, "fail")
        self.eval_view = model_view(dataclasses.replace(view, size=cfg.size, pool=cfg.pool), backbone.config)
        self.crops = MultiCropConfig(global_size=cfg.size, local_crops=0, normalize=normalize)
        self.t = targets(rows.y, rows.multilabel)

    def _step(self, items, backbone, head, loss_fn, generator):
        """The loss of one batch: both global crops of every image, each with its image's label."""
        # readable() kept only images that load
        images, names = on_device([item for item in items if usable(item, "fail")], self.device)
        global_crops, _ = multi_crop(images, self.crops, generator, protein_channel(names))  # (2, B, C, S, S)
        crops = global_crops.flatten(0, 1)  # (2B, C, S, S), crop-major
        labels = self.t[[item.index for item in items]].to(self.device)
        labels = torch.cat([labels, labels])  # crop-major: crop 0 of each image, then crop 1
        with autocast(self.device):
            features = backbone.embed(crops, *no_scaling(crops), names, self.cfg.pool)
            return loss_fn(head(features.float()), labels)

    def fit(self, train: np.ndarray, val: np.ndarray, seed: int, on_epoch=None) -> Fitted:
        cfg, rows = self.cfg, self.rows
        torch.manual_seed(seed)
        backbone = copy.deepcopy(self.start).to(self.device)
        # no feature standardization here: the features move as the backbone trains
        head = Head(backbone.dim, len(rows.classes), cfg.head).to(self.device)
        groups = layer_groups(backbone, head, cfg)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        per_epoch = steps_per_epoch(len(train), cfg)
        schedule = cosine_schedule(cfg.lr, MIN_LR, cfg.epochs * per_epoch, warmup_steps=per_epoch)
        loss_fn = loss_function(rows.y[train], rows.multilabel, cfg.balance, self.device)
        val_loss_fn = loss_function(rows.y[train], rows.multilabel, cfg.balance)
        weights = sample_weights(rows.y[train]) if cfg.balance == "sample" else None
        step = 0

        def train_epoch(epoch):
            nonlocal step
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
            index_lists = [train[batch.numpy()].tolist()
                           for batch in epoch_batches(len(train), per_epoch, cfg.batch_size, cfg.balance, weights,
                                                      generator)]
            backbone.train()
            head.train()
            for items in index_batches(self.sources, self.train_view, index_lists, self.workers):
                for group in optimizer.param_groups:
                    group["lr"] = float(schedule[step]) * group["lr_scale"]
                loss = self._step(items, backbone, head, loss_fn, generator)
                if not math.isfinite(loss.item()):
                    raise ProtlocError(f"fine-tuning diverged (loss {loss.item()}) at epoch {epoch + 1}: "
                                       "lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.clip_grad)
                optimizer.step()
                step += 1
                if self.on_step is not None:
                    self.on_step(loss.item(), len(items))

        def evaluate():
            logits = self._logits(backbone, head, val)
            f1, _ = metrics(rows.y[val], predict(probabilities(logits, rows.multilabel), rows.multilabel))
            return f1, float(val_loss_fn(logits, self.t[val]))

        stopper = EarlyStopping(cfg.patience, backbone, head)
        best, epochs = _run_epochs(cfg, train_epoch, evaluate, stopper, len(val) > 0, on_epoch)
        return Fitted(head.eval().cpu(), backbone.eval().cpu(), best, epochs)

    def _logits(self, backbone, head, rows: np.ndarray) -> torch.Tensor:
        """Logits (rows, classes) on the CPU from the evaluation view of each image."""
        sources = [self.sources[i] for i in rows]
        _, x = embed_all(backbone, sources, self.eval_view, batch_size=self.cfg.batch_size,
                         device=self.device, workers=self.workers)
        head.eval()
        with torch.no_grad():
            return head(torch.from_numpy(x).to(self.device)).float().cpu()

    def predict(self, fitted: Fitted, rows: np.ndarray) -> np.ndarray:
        logits = self._logits(fitted.backbone.to(self.device), fitted.head.to(self.device), rows)
        fitted.backbone.cpu()
        fitted.head.cpu()
        return probabilities(logits, self.rows.multilabel)
