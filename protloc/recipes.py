"""Pretraining recipes: whole, named sets of settings for `protloc pretrain --recipe NAME`.

A recipe is one PretrainConfig: architecture, DINO head, crops, schedules, normalization, and the
view embed uses with the checkpoint (size, pooling). Flags given on the command line override
single settings of it (`resolve`); the checkpoint records the resolved settings, the recipe's
name included, and `embed` / `finetune` / `predict` take the recorded view unless told otherwise.

- dino: the DINO reference's settings (Caron et al. 2021, main_dino.py, ViT-S/16), made for
  ImageNet's 1.3 M images on many GPUs over 100-800 epochs.
- small (the default): for a few hundred to a few hundred thousand images on a CPU or one GPU,
  chosen by experiment on synth and the shared yeast crops (k-NN macro F1, k = 10, 300 CPU steps
  on yeast: the reference's objective cut down to this size 0.880, with KoLeo 0.3 0.944; the
  README's recipe table lists each experiment). benchmarks/real_data_eval.py measures it on every
  shared real set.
"""

from __future__ import annotations

import dataclasses

from protloc.augment import MultiCropConfig
from protloc.pretrain import PretrainConfig

DINO = PretrainConfig(recipe="dino")  # PretrainConfig's defaults are the reference's

SMALL = dataclasses.replace(
    DINO,
    recipe="small",
    # a small backbone for CPU minutes: vit_tiny with 4 blocks (a third of the compute of 12);
    # patch 8 gives an 8x8 token grid on a 64-px crop (patch 16: 4x4)
    arch="vit_tiny", patch=8, depth=4,
    # batch norm in the head's hidden layers: with DINO's plain head a random backbone gives every
    # image nearly the same output and the loss sits at log(out_dim) for hundreds of steps; with it
    # the demo's teacher entropy falls from 6.9 to 4.9 nats in 100 steps, and k-NN macro F1 after
    # 600 steps is 0.71 instead of 0.58 (README, pretrain)
    use_bn_in_head=True,
    # a few thousand images hold far fewer prototypes than 65536 (README: 1024-8192 learn faster)
    out_dim=1024,
    # a CPU step of 32 images takes about half a second; a higher peak learning rate than DINO's
    # 5e-4 (per 256 images) for a run of hundreds of steps instead of hundreds of thousands
    batch_size=32, lr=0.0016,
    # schedules made for 100+ epochs, shortened: the teacher at its final temperature from the
    # start (30 warm-up epochs would be most of a short run), a faster-moving teacher (0.996
    # barely moves over a few hundred steps), the head's last layer trained from the first step;
    # the learning-rate warm-up stays the reference's 10 epochs
    warmup_teacher_temp_epochs=0.0, momentum_teacher=0.99, freeze_last_layer=0.0,
    # 64-px global crops and no local crops: a local crop of a 64-px view (5-40 % of it) holds
    # little of a cell, and every crop adds compute to every step
    crops=dataclasses.replace(DINO.crops, global_size=64, local_crops=0),
    # embed views whole images at the global crop size, as the model saw them in training
    embed_size=64,
    # intensities scaled by the data set's statistics, not each image's: per-image standardization
    # erases brightness differences between cells (a protein absent, dim or bright), which k-NN
    # on yeast needs (random init 0.52 with "image", 0.89 with "dataset")
    normalize="dataset",
    # DINOv2's KoLeo on the student's CLS features: spreads the images of a batch apart, which a
    # small set needs to keep DINO from collapsing its few hundred images onto a few prototypes
    # (yeast, 300 steps: 0.880 without, 0.934 at 0.1, 0.944 at 0.3, 0.943 at 1.0)
    koleo=0.3,
)

RECIPES = {"dino": DINO, "small": SMALL}
DEFAULT = "small"  # protloc is for a lab's own images, not ImageNet on many GPUs

_CROPS = [f for f in dataclasses.fields(MultiCropConfig) if f.name != "normalize"]  # the run's normalize
CROP_SETTINGS = frozenset(f.name for f in _CROPS)
# every setting's field by name, in PretrainConfig's order with the crops' in place of `crops`
FIELDS = {f.name: f for run in dataclasses.fields(PretrainConfig) for f in (_CROPS if run.name == "crops" else [run])}


def settings(cfg: PretrainConfig) -> dict[str, object]:
    """Every setting of `cfg` by name (FIELDS), the crops' among them (global_size, ...)."""
    return {name: getattr(cfg.crops if name in CROP_SETTINGS else cfg, name) for name in FIELDS}


def differences(cfg: PretrainConfig, base: PretrainConfig) -> dict[str, object]:
    """The settings of `cfg` that differ from those of `base` (by name, as in `settings`), the
    recipe's name aside."""
    was = settings(base)
    return {k: v for k, v in settings(cfg).items() if k != "recipe" and v != was[k]}


def changes(name: str) -> dict[str, object]:
    """The settings in which recipe `name` differs from the reference's (dino)."""
    return differences(RECIPES[name], DINO)


def resolve(name: str, given: dict[str, object]) -> PretrainConfig:
    """Recipe `name` with the settings `given` (by name, as in `settings`) in place of its own."""
    recipe = RECIPES[name]
    crops = {k: v for k, v in given.items() if k in CROP_SETTINGS}
    run = {k: v for k, v in given.items() if k not in CROP_SETTINGS}
    return dataclasses.replace(recipe, **run, crops=dataclasses.replace(recipe.crops, **crops))
