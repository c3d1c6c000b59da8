"""How an image's channels fill a model's input slots: the channel strategies of the study.

A model with the `fused` token layout takes a fixed list of channels (its slots: `r,g,b` for an
ImageNet DINO read as `microtubules,protein,nucleus`; `microtubules,protein,nucleus,er` for
DINO4Cells' HPA models). An image has its own named channels (OpenCell: `nucleus,protein`).

    natural      each image channel goes to the slot of the same name; empty slots get the fill.
                 An image whose channels carry no names (ch0, ch1, ...: a plain TIFF without
                 --channels) is taken in order when it has as many channels as the model
    replicate    the image's channels cycled over the slots in order (one channel: grayscale -> RGB)
    random       the image's channels go to randomly chosen distinct slots (seeded, the same for
                 every image of a run, and recorded); empty slots get the fill
    per-channel  each image channel alone, replicated into every slot; the C embeddings are
                 concatenated in channel order (D x C), as DINO4Cells embeds channels one by one
                 (applied by protloc.embed; here it is the identity)

Fills: `zero` (a channel of zeros after normalization: no signal), `mean` (the mean of the
image's normalized channels), `copy:NAME` (the image channel NAME again).

Models with the `channel` token layout match by name through their vocabulary and take any subset
of known channels as it is: they need no strategy (natural matching is what they do).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from protloc.channels import canonical
from protloc.errors import ProtlocError

STRATEGIES = ("natural", "replicate", "random", "per-channel")


@dataclass(frozen=True)
class ChannelPlan:
    """For each model slot: the index of the image channel it takes, or a fill ('zero' / 'mean')."""
    slots: tuple[int | str, ...]
    image_channels: tuple[str, ...]
    model_channels: tuple[str, ...]

    def describe(self) -> str:
        """e.g. 'microtubules<-zero, protein<-protein, nucleus<-nucleus'."""
        return ", ".join(f"{slot}<-{self.image_channels[s] if isinstance(s, int) else s}"
                         for slot, s in zip(self.model_channels, self.slots))


def parse_fill(fill: str) -> str:
    if fill in ("zero", "mean"):
        return fill
    if fill.startswith("copy:") and fill[5:].strip():
        return "copy:" + canonical(fill[5:])
    raise ProtlocError(f"--fill {fill!r}: expected zero, mean or copy:NAME")


def _fill_slot(fill: str, image: tuple[str, ...], source: str) -> int | str:
    if not fill.startswith("copy:"):
        return fill
    name = fill[5:]
    if name not in image:
        raise ProtlocError(f"{source}: --fill {fill}: the image has no channel {name} (it has {', '.join(image)})")
    return image.index(name)


def plan_channels(strategy: str, image: tuple[str, ...], model: tuple[str, ...], fill: str = "zero",
                  seed: int = 0, source: str = "image") -> ChannelPlan:
    """The plan that fills the model's slots from an image with these channel names."""
    image, model = tuple(image), tuple(model)
    if strategy == "per-channel":  # protloc.embed runs the image channels one by one
        return ChannelPlan(tuple(range(len(image))), image, image)
    if strategy == "natural":
        unnamed = all(n == f"ch{i}" for i, n in enumerate(image))
        if unnamed and len(image) == len(model):
            return ChannelPlan(tuple(range(len(image))), image, model)
        matched = [n for n in image if n in model]
        if unnamed:
            raise ProtlocError(f"{source}: has {len(image)} channel(s) without names, the model takes {len(model)} "
                               f"({', '.join(model)}): name them with --channels, or choose a --channel-strategy")
        if not matched:
            raise ProtlocError(f"{source}: no channel of the image ({', '.join(image)}) is one of the model's "
                               f"({', '.join(model)}): name them with --channels, or use --channel-strategy replicate")
        slots = tuple(image.index(name) if name in image else _fill_slot(fill, image, source) for name in model)
    elif strategy == "replicate":
        slots = tuple(i % len(image) for i in range(len(model)))
    elif strategy == "random":
        if len(image) > len(model):
            raise ProtlocError(f"{source}: {len(image)} channels do not fit the model's {len(model)} slots at random; "
                               f"select channels with --channels")
        order = random.Random(seed).sample(range(len(model)), len(image))  # slot of each image channel
        slots = [_fill_slot(fill, image, source)] * len(model)
        for channel, slot in enumerate(order):
            slots[slot] = channel
        slots = tuple(slots)
    else:
        raise ProtlocError(f"unknown channel strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return ChannelPlan(slots, image, model)


def apply_plan(plan: ChannelPlan, pixels: np.ndarray, scale: np.ndarray, shift: np.ndarray):
    """(C_image, H, W) pixels and their (C,) normalization -> the model's (C_model, H, W) and (C_model,).

    Channel slots keep the raw pixels (the GPU kernel normalizes them); a `mean` fill needs the
    normalized values, so with one the whole input is materialized as normalized float32."""
    if plan.slots == tuple(range(pixels.shape[0])):
        return pixels, scale, shift
    if "mean" in plan.slots:
        normalized = pixels.astype(np.float32) * scale[:, None, None] + shift[:, None, None]  # (C, H, W)
        mean = normalized.mean(axis=0)
        out = np.stack([normalized[s] if isinstance(s, int) else (mean if s == "mean" else np.zeros_like(mean))
                        for s in plan.slots])
        ones = np.ones(len(plan.slots), np.float32)
        return out, ones, np.zeros_like(ones)
    index = [s if isinstance(s, int) else 0 for s in plan.slots]  # a zero fill reads channel 0 with scale 0
    keep = np.array([isinstance(s, int) for s in plan.slots], np.float32)
    return pixels[index], (scale[index] * keep).astype(np.float32), (shift[index] * keep).astype(np.float32)
