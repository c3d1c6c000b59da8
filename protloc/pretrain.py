"""DINO pretraining: the training loop, its data order, checkpoints and exact resume.

One step: decode B images (loader workers; each image once when the set fits in memory:
protloc.decoded) -> multi-crop on the training device (augment.py) -> teacher on the 2 global
crops, student on all crops, packed into one transformer pass or one per crop size (--pack,
dino.DINOModel) -> DINO loss (+ DINOv2's KoLeo and iBOT terms when asked: protloc.dinov2)
-> AdamW step with per-parameter gradient clipping -> teacher EMA.

Exact resume: nothing random depends on history. The data order of epoch e is a permutation
seeded by (seed, e); the crops, iBOT masks and stochastic depth of step s are seeded by (seed, s, rank). A
checkpoint holds student, teacher, optimizer, the loss centers, the step and the run's settings
(PretrainConfig), so 2 steps + resume to 4 gives the same weights as 4 steps; a resumed run
takes its settings from the checkpoint (`recorded_config`), and a different run from the same
weights is a new run (`init`: step 0, a new optimizer, schedules and DINO head).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from protloc.augment import NORMALIZE, MultiCropConfig, Pair, crop_view, image_statistics, multi_crop, protein_channel
from protloc.checkpoint import load_checkpoint, load_weights, model_from_checkpoint, save_checkpoint
from protloc.data import PERCENTILES, ViewOptions, probe_channels, usable
from protloc.decoded import KeptImages, memory_budget
from protloc.device import autocast
from protloc.dataset_stats import MAX_IMAGES, DatasetStats, recorded, with_dataset_stats
from protloc.dino import (CENTERINGS, PACKS, DINOHead, DINOLoss, DINOModel, clip_gradients, collapse_warning,
                          adamw, cosine_schedule, ema_update, entropy, iBOTPatchLoss, packed, param_groups,
                          teacher_temp_schedule)
from protloc.dinov2 import koleo_loss, sample_masks
from protloc.distributed import World, all_gather_float
from protloc.embed import POOLINGS
from protloc.errors import ProtlocError
from protloc.model import ViTConfig, VisionTransformer
from protloc.setting import setting
from protloc.sources import Source

log = logging.getLogger(__name__)
PERCENT = "{:g}-{:g}%".format(*PERCENTILES)  # the range that normalize "percentile" and "dataset" map to 0-1


@dataclass
class PretrainConfig:
    """Everything that defines a run, how the images are read and how embed views them included;
    stored in its checkpoints (a resumed run keeps it). The defaults are the DINO reference's
    (Caron et al. 2021, main_dino.py, for ViTs): the `dino` recipe (protloc.recipes). A field
    declared with `setting` has a `protloc pretrain` flag of its name (protloc.setting)."""
    recipe: str = "dino"  # the recipe the settings started from (protloc.recipes)
    arch: str = "vit_small"
    patch: int = 16
    layout: str = "fused"
    depth: int = 12
    channels: list[str] | None = None  # None: the first image's channel names
    channel_suffixes: list[str] | None = None  # one file per channel (protloc.sources.discover)
    z: str = "max"  # z projection (protloc.tiff)
    axes: str | None = None  # axes of every file; None: from metadata or shape
    series: int | None = None  # the series of files that hold several (protloc.tiff); None: the first full one
    normalize: str = setting(  # of the crops, and embed's default
        "image", f"Crops standardized with their whole image's channel mean / std (image), or its {PERCENT} range "
        f"mapped to 0-1 (percentile), or the data set's {PERCENT} range per channel mapped to 0-1 (dataset: keeps "
        f"brightness differences between images, such as a protein absent from a cell; estimated from a sample of up "
        f"to {MAX_IMAGES} images, reported on stderr); recorded in the checkpoint, so embed uses the same. Choose by "
        "what brightness means in your data: image where expression varies by protein and only the pattern counts.",
        choices=NORMALIZE)
    embed_size: int | None = setting(
        None, "The view size (0: native) that embed, finetune and predict use with this checkpoint unless given "
        "--size.", min=0, metavar="SIZE", zero_is_none=True)
    embed_pool: str = setting("cls", "The pooling that embed, finetune and predict use with this checkpoint "
                              "unless given --pool.", choices=POOLINGS)
    drop_path: float = setting(0.1, "Stochastic depth of the student.", min=0, max=1, max_open=True)
    out_dim: int = setting(65536, "DINO head output dimension.", min=2)
    norm_last_layer: bool = True
    use_bn_in_head: bool = setting(  # DINO's default for ViTs; short runs on small data want it (see DINOHead)
        False, "Batch norm in the DINO head's hidden layers (DINO's --use_bn_in_head): short runs on small data "
        "learn much sooner.", flag="--use-bn-in-head/--no-bn-in-head")
    batch_size: int = setting(64, "Images per step and process.", min=1)
    steps: int | None = setting(None, "Length of the run in optimizer steps.", min=1)  # or epochs over the data
    epochs: int | None = setting(None, "Length of the run in passes over the data.", min=1)
    lr: float = setting(5e-4, "Peak learning rate at a total batch of 256 (scaled linearly).", min=0)
    min_lr: float = setting(1e-6, "Learning rate at the end of the cosine.", min=0)
    warmup_epochs: float = setting(10.0, "Linear learning-rate warm-up.", min=0)
    weight_decay: float = setting(0.04, "Weight decay at the start (cosine to --weight-decay-end).", min=0)
    weight_decay_end: float = setting(0.4, "Weight decay at the end.", min=0)
    clip_grad: float = setting(3.0, "Per-parameter gradient norm clip (0: no clipping, as in DINO).", min=0)
    freeze_last_layer: float = setting(1.0, "Epochs with the head's last layer frozen.", min=0)
    momentum_teacher: float = setting(0.996, "Teacher EMA momentum (cosine to 1).", min=0, max=1)
    warmup_teacher_temp: float = setting(0.04, "Teacher temperature at the start.", min=0, min_open=True)
    teacher_temp: float = setting(0.04, "Teacher temperature after warm-up (DINO's recipe for longer runs: "
                                  "0.07).", min=0, min_open=True)
    warmup_teacher_temp_epochs: float = setting(30.0, "Teacher temperature warm-up.", min=0)
    student_temp: float = 0.1
    center_momentum: float = 0.9
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    pack: str = setting("auto", "The student's transformer runs once over all crops packed together (on) or once "
                        "per crop size, as DINO does (off); the same result either way. auto: on where the varlen "
                        "attention kernel runs (Triton on a GPU), off elsewhere, where packing only costs.",
                        choices=PACKS)
    seed: int = setting(0, "Seed of initialization, data order and augmentation.")
    # DINOv2 / iBOT ingredients (protloc.dinov2), all off by default: the run is then DINO's as above
    koleo: float = setting(0.0, "Weight of DINOv2's KoLeo regularizer: pushes each student CLS feature of a global "
                           "crop away from its nearest neighbour in the batch, spreading features apart (DINOv2: "
                           "0.1; 0: off).", min=0, metavar="W")
    centering: str = setting("center", "Teacher targets: softmax after subtracting a running mean (center, DINO) or "
                             "Sinkhorn-Knopp (sinkhorn, DINOv2), which gives every output dimension an equal share "
                             "of each batch.", choices=CENTERINGS)
    ibot: float = setting(0.0, "Weight of iBOT's masked-patch loss: the student sees some global crops with blocks "
                          "of patches replaced by a learned mask token and predicts the teacher's outputs there "
                          "(DINOv2: 1.0; 0: off).", min=0, metavar="W")
    mask_ratio: tuple[float, float] = setting((0.1, 0.5), "With --ibot: range of the share of a masked crop's "
                                              "patches that are masked (DINOv2's).", metavar="LOW,HIGH")
    mask_prob: float = setting(0.5, "With --ibot: share of the global crops that are masked (DINOv2's).",
                               min=0, max=1, min_open=True)

    def __post_init__(self):  # the crops are normalized as the run's images: one setting
        if self.crops.normalize != self.normalize:
            self.crops = dataclasses.replace(self.crops, normalize=self.normalize)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "mask_ratio" in d:
            d["mask_ratio"] = tuple(d["mask_ratio"])
        if isinstance(d.get("pack"), bool):  # recorded before pack was auto|on|off
            d["pack"] = "on" if d["pack"] else "off"
        crops = d.pop("crops", {})
        crops = {k: tuple(v) if isinstance(v, list) else v for k, v in crops.items()}
        return cls(**d, crops=MultiCropConfig(**crops))


class StepImages(NamedTuple):
    """A step's images on the training device, as multi_crop takes them."""
    pixels: list[torch.Tensor]  # (C, H, W) each, as decoded (uint8, uint16 or float)
    scale_shift: list[Pair]  # (C,) each: x * scale + shift brings an image to ~0..1
    stats: list[Pair] | None  # each image's (mean, std) for normalize "image" (augment.image_statistics), else None
    names: list[str]  # the channels


@dataclass
class Schedules:
    """Per-step values of everything that changes during training."""
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_steps: int
    steps_per_epoch: int

    @classmethod
    def build(cls, cfg: PretrainConfig, n_images: int, world_size: int) -> Schedules:
        global_batch = cfg.batch_size * world_size
        if n_images < global_batch:
            raise ProtlocError(f"{n_images} image(s) are fewer than one batch of {global_batch}; lower --batch-size")
        per_epoch = n_images // global_batch  # incomplete batches are dropped, as in DINO
        total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
        lr = cfg.lr * global_batch / 256
        return cls(
            lr=cosine_schedule(lr, cfg.min_lr, total, warmup_steps=round(cfg.warmup_epochs * per_epoch)),
            weight_decay=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total),
            momentum=cosine_schedule(cfg.momentum_teacher, 1.0, total),
            teacher_temp=teacher_temp_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                               round(cfg.warmup_teacher_temp_epochs * per_epoch), total),
            freeze_last_layer_steps=round(cfg.freeze_last_layer * per_epoch),
            steps_per_epoch=per_epoch,
        )

    @property
    def total(self) -> int:
        return len(self.lr)


class StepBatches:
    """Image indices of steps [start, stop) for one rank: each epoch a seeded permutation, each
    global batch split over the ranks. Depends only on (seed, step), which makes resume exact."""

    def __init__(self, n_images, batch_size, world: World, seed, start, stop, steps_per_epoch):
        self.n, self.batch, self.world, self.seed = n_images, batch_size, world, seed
        self.start, self.stop, self.per_epoch = start, stop, steps_per_epoch

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        global_batch = self.batch * self.world.size
        order_epoch, order = None, None
        for step in range(self.start, self.stop):
            epoch, k = divmod(step, self.per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, drawn when the epoch starts
                order_epoch, order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            chunk = order[k * global_batch:(k + 1) * global_batch]
            yield chunk[self.world.rank::self.world.size].tolist()


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def backbone_config(cfg: PretrainConfig, channels: list[str], dataset_stats: DatasetStats | None = None) -> ViTConfig:
    """The run's backbone, which records how embed is to view images (normalization, its statistics, size, pooling)."""
    return ViTConfig(arch=cfg.arch, patch=cfg.patch, layout=cfg.layout, depth=cfg.depth, channels=channels,
                     normalize=cfg.normalize, dataset_stats=recorded(dataset_stats),
                     view_size=cfg.embed_size, pool=cfg.embed_pool, drop_path=cfg.drop_path,
                     mask_token=cfg.ibot > 0)


def build_models(cfg: PretrainConfig, channels: list[str],
                 dataset_stats: DatasetStats | None = None) -> tuple[DINOModel, DINOModel]:
    """Student and teacher (backbone_config) with the same initial weights; the teacher has no stochastic depth."""
    vit = backbone_config(cfg, channels, dataset_stats)
    torch.manual_seed(cfg.seed)
    head = dict(out_dim=cfg.out_dim, norm_last_layer=cfg.norm_last_layer, use_bn=cfg.use_bn_in_head)
    student = DINOModel(VisionTransformer(vit), DINOHead(vit.dim, **head))
    teacher = DINOModel(VisionTransformer(dataclasses.replace(vit, drop_path=0.0)), DINOHead(vit.dim, **head))
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def replica_checksum(model: torch.nn.Module) -> float:
    """A scalar that differs when two replicas' weights differ (position-weighted sum)."""
    with torch.no_grad():
        return float(sum((i + 1) * p.double().sum() for i, p in enumerate(model.parameters())))


class Trainer:
    """A DINO run over `sources`. With `resume`, the run in checkpoint `output` continues with its
    recorded settings (`cfg` is not used: see `recorded_config`); with `init`, a new run starts
    from a checkpoint's backbone weights. `view` holds how images are read beyond the run's
    settings (max_pixels); channels, z, axes and series are the run's (cfg). With normalize
    "dataset", the data set's statistics are the checkpoint's (resume) or estimated over `sources`
    (then also in `dataset_stats_estimated`, for the caller to report)."""

    def __init__(self, sources: list[Source], cfg: PretrainConfig, output, *, world: World = World(),
                 view: ViewOptions = ViewOptions(), workers: int = 2, on_error: str = "fail",
                 resume: bool = False, init: str | None = None, checkpoint_every: int = 500, log_path=None):
        self.sources, self.output, self.world = sources, str(output), world
        self.workers, self.on_error = workers, on_error
        self.checkpoint_every, self.log_path = checkpoint_every, log_path
        ckpt = load_checkpoint(self.output) if resume else None
        if ckpt is not None:
            cfg = recorded_config(self.output, ckpt)
            if ckpt["n_images"] != len(sources) or ckpt["world_size"] != world.size:
                raise ProtlocError(f"{self.output}: resuming needs the same data and processes (checkpoint: "
                                   f"{ckpt['n_images']} images on {ckpt['world_size']}, "
                                   f"now {len(sources)} on {world.size})")
        self.cfg = cfg
        self.pack = packed(cfg.pack, world.device)
        log.info("packed multi-crop: %s (--pack %s on %s)", "on" if self.pack else "off", cfg.pack, world.device)
        view = dataclasses.replace(view, channels=tuple(cfg.channels) if cfg.channels else None, z=cfg.z, axes=cfg.axes,
                                   series=cfg.series, normalize=cfg.normalize)
        channels = (ckpt["config"]["channels"] if ckpt is not None
                    else cfg.channels or probe_channels(sources, view, on_error))
        self.schedules = Schedules.build(cfg, len(sources), world.size)
        if cfg.koleo and cfg.batch_size < 2:
            raise ProtlocError("--koleo spreads the features of a process's batch apart: "
                               "it needs --batch-size 2 or more")
        # every image is checked against the model on its own (patch, channels), the data set's
        # statistics (normalize "dataset") estimated over the images as training reads them
        self.view, self.dataset_stats_estimated = with_dataset_stats(
            crop_view(view, backbone_config(cfg, channels), channels),
            ckpt["config"].get("dataset_stats") if ckpt is not None else None, self.output, sources, workers, on_error)
        self.student, self.teacher = build_models(cfg, channels, self.view.dataset_stats)
        self.skipped: set[str] = set()  # images reported as skipped (once, not every epoch)
        if cfg.use_bn_in_head and world.size > 1 and world.device.type == "cuda":
            # batch statistics over the whole batch, as DINO does; SyncBatchNorm runs on GPUs only,
            # so CPU processes (gloo) each normalize by their own share of the batch
            convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm
            self.student, self.teacher = convert(self.student), convert(self.teacher)
        if init is not None and ckpt is None:
            # a foreign backbone's input channels are the data's (in order); a protloc one must match them
            backbone, _ = model_from_checkpoint(init, list(channels) if cfg.layout == "fused" else None)
            # the mask token (iBOT) is this run's matter: kept from `init` if both have one, else this run's own or none
            state = {k: v for k, v in backbone.state_dict().items() if k != "mask_token" or cfg.ibot}
            if cfg.ibot:
                state.setdefault("mask_token", self.student.backbone.mask_token.detach())
            load_weights(self.student.backbone, state, init)
            self.teacher.load_state_dict(self.student.state_dict())
        self.loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.centering)
        self.ibot_loss = (iBOTPatchLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.centering)
                          if cfg.ibot else None)
        for m in (self.student, self.teacher, self.loss_fn, self.ibot_loss):
            if m is not None:
                m.to(world.device)
        self.optimizer = adamw(param_groups(self.student))
        self.step = 0
        if ckpt is not None:  # on the device already: the optimizer state follows its parameters
            self.student.load_state_dict(ckpt["student"])
            self.teacher.load_state_dict(ckpt["teacher"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.loss_fn.center.copy_(ckpt["center"])
            if self.ibot_loss is not None:
                self.ibot_loss.center.copy_(ckpt["ibot_center"])
            self.step = ckpt["step"]
        self.last_saved = self.step if ckpt is not None else None
        # seconds of the last step's stages (crop: images to the device and multi-crop; forward: teacher,
        # student and loss; backward; optimizer: clipping, AdamW, EMA); host time, exact on the CPU (a GPU
        # queues work: there forward ends at the loss's sync and the others are their launch times)
        self.stage_s: dict[str, float] = {}
        self.decoded = KeptImages(sources, self.view, workers, memory_budget(world.size))  # decode each image once
        self.stats_kept: dict[int, Pair] = {}  # image index -> its image_statistics, for the images kept
        self.pixels_kept: dict[int, torch.Tensor] = {}  # on a CPU: image index -> its pixels in float32, kept
        self.stop_requested = False
        device = world.device
        self.ddp = (DistributedDataParallel(self.student, device_ids=[device] if device.type == "cuda" else None)
                    if world.size > 1 else None)

    def batches(self, stop):
        sampler = StepBatches(len(self.sources), self.cfg.batch_size, self.world, self.cfg.seed,
                              self.step, stop, self.schedules.steps_per_epoch)
        return self.decoded.batches(sampler)

    def images(self, items) -> StepImages:
        """Items -> the step's images on the device. Bad images fail or are skipped (reported the first
        time they are met). The crops convert their own regions (multi_crop): a large field is never
        converted whole."""
        kept = []
        for item in items:
            if item.error is not None and item.id in self.skipped:
                continue
            if usable(item, self.on_error):
                kept.append(item)
            else:
                self.skipped.add(item.id)
        device = self.world.device
        pixels = [self.pixels_kept.get(item.index) for item in kept]
        pixels = [torch.from_numpy(item.pixels).to(device) if p is None else p for item, p in zip(kept, pixels)]
        if self.decoded.keep and device.type == "cpu":  # the crops' float conversion, once per image (exact)
            self.pixels_kept.update((item.index, p.float()) for item, p in zip(kept, pixels)
                                    if item.index not in self.pixels_kept)
        scale_shift = [(torch.from_numpy(item.scale).to(device), torch.from_numpy(item.shift).to(device))
                       for item in kept]
        stats = None
        if self.cfg.crops.normalize == "image":  # a pass over each whole image: once per image when it is kept
            stats = [self.stats_kept[item.index] if item.index in self.stats_kept else image_statistics(p, ss)
                     for item, p, ss in zip(kept, pixels, scale_shift)]
            if self.decoded.keep:
                self.stats_kept.update((item.index, st) for item, st in zip(kept, stats))
        return StepImages(pixels, scale_shift, stats, list(kept[0].channel_names) if kept else [])

    def train_step(self, items) -> dict | None:
        """One optimizer step; None when a rank's images of the step were all skipped (no update)."""
        cfg, sched, step = self.cfg, self.schedules, self.step
        start = time.perf_counter()
        images = self.images(items)
        if min(all_gather_float(self.world, float(len(images.pixels)))) == 0:  # every rank skips it, or DDP would wait
            log.warning("step %d: every image of its batch was skipped; no update", step + 1)
            self.step += 1
            return None
        seed = step_seed(cfg.seed, step, self.world.rank)
        torch.manual_seed(seed)  # stochastic depth
        crops, n_crops, masks = self.crops(images, seed)
        crop_s = time.perf_counter() - start
        losses, targets, terms = self.model_step(crops, images.names, n_crops, masks, step)
        self.stage_s["crop"] = crop_s
        self.step += 1

        elapsed = time.perf_counter() - start
        images_done = len(images.pixels) * self.world.size
        return {"step": self.step, "epoch": step / sched.steps_per_epoch, "loss": sum(losses) / len(losses),
                "images": images_done,
                "lr": float(sched.lr[step]), "weight_decay": float(sched.weight_decay[step]),
                "teacher_temp": float(sched.teacher_temp[step]), "momentum": float(sched.momentum[step]),
                "teacher_entropy": entropy(torch.cat(targets)), "images_per_s": images_done / elapsed,
                "peak_memory_mb": peak_memory_mb(self.world.device),
                **{f"{name}_loss": sum(all_gather_float(self.world, term.item())) / self.world.size
                   for name, term in terms.items()}}

    def crops(self, images: StepImages, seed: int):
        """DINO's multi-crop of a batch, crop-major (the global crops first), and iBOT's masks of the
        global crops: (crops: one (n_i, C, S_i, S_i) tensor per crop size, n_crops, masks or None)."""
        cfg = self.cfg
        global_crops, local_crops = multi_crop(images.pixels, cfg.crops, torch.Generator().manual_seed(seed),
                                               protein_channel(images.names), images.scale_shift, images.stats)
        crops = [global_crops.flatten(0, 1)] + ([local_crops.flatten(0, 1)] if local_crops is not None else [])
        n_crops = 2 + (local_crops.shape[0] if local_crops is not None else 0)
        masks = None
        if cfg.ibot:  # the same for the teacher (unmasked input) and the student (masked)
            grid = crops[0].shape[-1] // cfg.patch
            masks = sample_masks(crops[0].shape[0], grid, grid, cfg.mask_ratio, cfg.mask_prob,
                                 np.random.default_rng(seed))
            masks = torch.from_numpy(masks).to(self.world.device)
        return crops, n_crops, masks

    def model_step(self, crops, names, n_crops: int, masks, step: int):
        """Forward, loss, backward, clipping, AdamW and the teacher's EMA on ready crops, with the
        schedules' values at `step`: (every rank's loss, the teacher's targets, the weighted DINOv2
        terms beside DINO's loss, empty when none is on)."""
        cfg, sched = self.cfg, self.schedules
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(sched.lr[step])
            if i == 0:  # only the first group is regularized
                group["weight_decay"] = float(sched.weight_decay[step])
        student = self.ddp or self.student
        temp = sched.teacher_temp[step]
        start = time.perf_counter()
        with autocast(self.world.device):
            teacher_out = self.teacher(crops[:1], names, self.pack, masks, mask_input=False)
            student_out = student(crops, names, self.pack, masks)
            loss, targets = self.loss_fn(student_out.logits, teacher_out.logits, n_crops, temp)
            terms = {}  # DINOv2's terms added to DINO's loss, weighted
            if cfg.koleo:  # per global crop, as DINOv2: never between the two crops of one image
                terms["koleo"] = cfg.koleo * sum(koleo_loss(c) for c in student_out.cls.chunk(2))
            if cfg.ibot:
                terms["ibot"] = cfg.ibot * self.ibot_loss(student_out.patch_logits, teacher_out.patch_logits,
                                                          student_out.patch_mask, temp)[0]
            if terms:
                terms = {"dino": loss, **terms}
                loss = sum(terms.values())
        losses = all_gather_float(self.world, loss.item())
        if not all(math.isfinite(v) for v in losses):
            kept = f"; the last good checkpoint (step {self.last_saved}) is kept" if self.last_saved else ""
            raise ProtlocError(f"loss became {losses} at step {step + 1}: training diverged{kept}")
        forward = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward = time.perf_counter()
        clip_gradients(self.student, cfg.clip_grad)
        if step < sched.freeze_last_layer_steps:
            for p in self.student.head.last_layer.parameters():
                p.grad = None
        self.optimizer.step()
        ema_update(self.teacher, self.student, float(sched.momentum[step]))
        self.stage_s = {"forward": forward - start, "backward": backward - forward,
                        "optimizer": time.perf_counter() - backward}
        return losses, targets, terms

    def save(self):
        sums = all_gather_float(self.world, replica_checksum(self.teacher))
        if len(set(sums)) > 1:
            raise ProtlocError(f"teacher weights differ between ranks at step {self.step} ({sums}): replicas diverged")
        if self.world.is_main:
            save_checkpoint(self.output, self.teacher.backbone.config, self.teacher.backbone.state_dict(),
                            teacher=self.teacher.state_dict(), student=self.student.state_dict(),
                            optimizer=self.optimizer.state_dict(), center=self.loss_fn.center.cpu(),
                            **({"ibot_center": self.ibot_loss.center.cpu()} if self.ibot_loss is not None else {}),
                            step=self.step, train=self.cfg.to_dict(), n_images=len(self.sources),
                            world_size=self.world.size, replica_checksums=sums)
        self.last_saved = self.step

    def request_stop(self):
        """Ask the run to stop after the current step, with a checkpoint (e.g. from a signal handler)."""
        self.stop_requested = True

    def run(self, stop_at: int | None = None, on_step=None):
        """Train to the end (or to step `stop_at`, or until request_stop), checkpointing along the
        way and where it stops. Returns the step reached."""
        stop = min(self.schedules.total, stop_at) if stop_at is not None else self.schedules.total
        warned = False
        with open(self.log_path, "a") if self.log_path and self.world.is_main else contextlib.nullcontext() as log_file:
            for items in self.batches(stop):
                metrics = self.train_step(items)
                if metrics is not None:
                    if log_file is not None:
                        log_file.write(json.dumps(metrics) + "\n")
                        log_file.flush()
                    problem = collapse_warning(metrics["teacher_entropy"], self.cfg.out_dim)
                    if problem and not warned and self.step > self.schedules.total // 10:
                        log.warning("step %d: %s", self.step, problem)
                        warned = True
                    if on_step is not None:
                        on_step(metrics)
                # every rank stops at the same step, whichever of them got the signal
                stopping = any(all_gather_float(self.world, float(self.stop_requested)))
                if self.step % self.checkpoint_every == 0 or self.step == stop or stopping:
                    self.save()
                if stopping:
                    break
        return self.step


def recorded_config(path, ckpt: dict | None = None) -> PretrainConfig:
    """The settings of the pretraining run in checkpoint `path` (`ckpt`: the checkpoint, if loaded already)."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if "student" not in ckpt or "train" not in ckpt:
        raise ProtlocError(f"{path}: not a pretraining checkpoint (nothing to resume)")
    return PretrainConfig.from_dict(ckpt["train"])


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set (KiB on Linux) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
