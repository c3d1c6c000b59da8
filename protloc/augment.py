"""DINO multi-crop for fluorescence microscopy, batched over crops, on the images' device.

DINO (Caron et al. 2021) trains on 2 global crops (224 px, 40-100 % of the image area) and N
local crops (96 px, 5-40 %) of every image. For microscopy the RGB colour jitter, grayscale and
solarization are replaced by per-channel intensity jitter, and flips come with 90-degree
rotations (a cell has no "up"). Per crop, in this order:

    random resized crop -> dihedral flip/rotation -> brightness, contrast, gamma
      -> Gaussian blur -> Gaussian noise -> normalization -> channel dropout

Normalization "image" standardizes each crop with the statistics of its whole image, as
`protloc embed` standardizes whole images, so pretraining and embedding see one distribution.
"percentile" and "dataset" images arrive normalized (by the loader: `crop_view`) and
their crops are left as they are, so a dim image stays dim.
(Per-crop statistics would erase what differs between crops, such as a crop of a bright cell
vs one of background, and leave a random-init network with nearly identical outputs for every
crop: DINO then sits in the uniform-output equilibrium and learns nothing.)

Every random parameter (boxes, flips, factors, sigmas, masks) is drawn from one CPU
torch.Generator, so a seed gives the same augmentation on CPU and GPU; only the noise pixels
come from a device generator seeded by a draw from it. The resize runs per crop (crops differ in
box); everything after it runs once on the stacked crops of one size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from protloc.data import ViewOptions, model_view
from protloc.model import ViTConfig
from protloc.setting import setting

RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the crop boxes, as torchvision's RandomResizedCrop
NORMALIZE = ("image", "percentile", "dataset")
Pair = tuple[torch.Tensor, torch.Tensor]  # per image: (scale, shift) or (mean, std), (C,) each


def crop_view(opts: ViewOptions, config: ViTConfig, channels: list[str] | None = None) -> ViewOptions:
    """How training reads an image for multi_crop: whole, at native size (the crops are cut from
    it), as the model `config` requires (model_view), for crops normalized `opts.normalize`: the
    loader only brings "image" pixels to ~0..1 for the intensity jitter (multi_crop standardizes
    each crop with its whole image's statistics); the others arrive as they stay. A channel-layout
    model is trained on images that all have `channels`, in order (a batch of crops has one set)."""
    return dataclasses.replace(model_view(opts, config), size=None,
                               normalize="percentile" if opts.normalize == "image" else opts.normalize,
                               same_channels=tuple(channels) if config.layout == "channel" else None)


def protein_channel(channel_names) -> int | None:
    """The index of the protein channel, which channel dropout spares; None when there is none."""
    return list(channel_names).index("protein") if "protein" in channel_names else None


@dataclass(frozen=True)
class MultiCropConfig:
    global_size: int = setting(224, "Global crop size (2 per image).", min=16)
    local_size: int = setting(96, "Local crop size.", min=16)
    local_crops: int = setting(8, "Local crops per image.", min=0)
    global_scale: tuple[float, float] = setting((0.4, 1.0), "Area range of global crops.")
    local_scale: tuple[float, float] = setting((0.05, 0.4), "Area range of local crops.")
    flips: bool = True  # random horizontal/vertical flips and 90-degree rotations
    brightness: float = 0.3  # per crop and channel: x * U(1-b, 1+b)
    contrast: float = 0.3  # per crop and channel: (x - mean) * U(1-c, 1+c) + mean
    gamma: float = 0.3  # per crop and channel: max(x, 0) ** g, log g ~ U(log(1-g), log(1+g))
    blur: tuple[float, float, float] = (1.0, 0.1, 0.5)  # blur probability: global 1, global 2, each local
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # DINO's, in pixels of a 224-px crop: scaled to the crop size
    noise: float = 0.05  # prob 0.5 per crop: + N(0, 1) * U(0, noise) * (crop channel std)
    channel_dropout: float = setting(  # per crop and channel; never all channels
        0.0, "Probability of zeroing a channel of a crop (never the protein channel).", min=0, max=1)
    # "image": standardize with the whole image's channel mean/std; "percentile", "dataset": leave as is
    normalize: str = "image"

    def __post_init__(self):
        if self.normalize not in NORMALIZE:
            raise ValueError(f"unknown normalize {self.normalize!r}; choose from {', '.join(NORMALIZE)}")
        for name in ("brightness", "contrast", "gamma"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.local_crops < 0:
            raise ValueError(f"local_crops must be >= 0, got {self.local_crops}")


def _uniform(lo: float, hi: float, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.empty(shape).uniform_(lo, hi, generator=generator)


def sample_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float] = RATIO,
               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random box, as torchvision's RandomResizedCrop.get_params:
    area fraction ~ U(scale), log aspect ratio ~ U(log ratio), 10 tries, then a centre crop of
    the whole image clipped to the ratio range."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator, 1).item()
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator, 1).item())
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            return top, left, ch, cw
    if w / h < ratio[0]:  # too tall: full width
        cw, ch = w, min(h, round(w / ratio[0]))
    elif w / h > ratio[1]:  # too wide: full height
        cw, ch = min(w, round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resized_crops(images: list[torch.Tensor], boxes: list[tuple[int, tuple[int, int, int, int]]],
                  size: int, scale_shift: list[Pair] | None = None) -> torch.Tensor:
    """Crop (image index, box) pairs out of `images` and resize each to size x size: (n, C, S, S).
    With `scale_shift` (per image, (C,) each), the crops are of x * scale + shift in float32.

    Bilinear with antialiasing (a triangle filter widened by the shrink factor, as PIL), so crops
    of large images do not alias and small images (64 px yeast cells) upsample smoothly. The filter's
    weights sum to 1, so scale and shift apply to the resized crop: S x S pixels, not the region's
    (up to a whole field's); the same values to float32 round-off."""
    C = images[0].shape[0]
    out = torch.empty(len(boxes), C, size, size, dtype=torch.float32, device=images[0].device)
    for i, (b, (top, left, h, w)) in enumerate(boxes):
        region = images[b][None, :, top:top + h, left:left + w].float()  # (1, C, h, w)
        out[i] = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if scale_shift is not None:
        scale, shift = (torch.stack([scale_shift[b][k] for b, _ in boxes])[:, :, None, None] for k in (0, 1))
        out = torch.addcmul(shift, out, scale)  # (n, C, S, S)
    return out


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random one of the 8 flips/rotations of each square crop: transpose, then flip rows and/or columns."""
    n = x.shape[0]
    masks = (torch.rand(3, n, generator=generator) < 0.5).to(x.device)[:, :, None, None, None]  # (3, n, 1, 1, 1)
    x = torch.where(masks[0], x.transpose(-2, -1), x)
    x = torch.where(masks[1], x.flip(-1), x)
    return torch.where(masks[2], x.flip(-2), x)


def intensity_jitter(x: torch.Tensor, cfg: MultiCropConfig, generator: torch.Generator) -> torch.Tensor:
    """Per crop and channel brightness, contrast and gamma; an amount of 0 leaves x untouched."""
    n, C = x.shape[:2]

    def factor(a):  # (n, C, 1, 1)
        return _uniform(1 - a, 1 + a, generator, n, C, 1, 1).to(x.device)

    if cfg.brightness > 0:
        x = x * factor(cfg.brightness)
    if cfg.contrast > 0:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = (x - mean) * factor(cfg.contrast) + mean
    if cfg.gamma > 0:
        g = _uniform(math.log(1 - cfg.gamma), math.log(1 + cfg.gamma), generator, n, C, 1, 1).exp()
        x = x.clamp(min=0) ** g.to(x.device)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each crop of x (n, C, S, S) with its own sigma (n,), a separable Gaussian of
    2 * radius + 1 taps (radius < S), reflect padding: one grouped conv per axis for all crops."""
    n, C, S, _ = x.shape
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None].float() ** 2))  # (n, K)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0).to(x.device)  # (n*C, K): one kernel per channel
    y = x.reshape(1, n * C, S, S)  # crops and channels as conv groups
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * C)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * C)
    return y.reshape(n, C, S, S)


def channel_dropout(x: torch.Tensor, p: float, protein_channel: int | None,
                    generator: torch.Generator) -> torch.Tensor:
    """Zero each (crop, channel) with probability p, sparing the protein channel; a crop that would
    lose all its channels keeps one at random."""
    n, C = x.shape[:2]
    drop = torch.rand(n, C, generator=generator) < p
    if protein_channel is not None:
        drop[:, protein_channel] = False
    else:
        keep = torch.randint(0, C, (n,), generator=generator)
        everything = drop.all(dim=1)
        drop[everything, keep[everything]] = False
    return x * (~drop).to(x.device, x.dtype)[:, :, None, None]


def augment(x: torch.Tensor, blur_p: torch.Tensor, cfg: MultiCropConfig, generator: torch.Generator,
            protein_channel: int | None = None, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Everything after the resize, on stacked crops x (n, C, S, S) with blur probabilities (n,);
    `stats` = (mean, std), each (n, C, 1, 1): the channel statistics of each crop's whole image,
    for normalize "image" (None: the crop's own)."""
    n, C, S, _ = x.shape
    if cfg.flips:
        x = dihedral(x, generator)
    x = intensity_jitter(x, cfg, generator)

    blurred = torch.rand(n, generator=generator) < blur_p
    # DINO's sigmas are for 224-px crops: a 64-px crop of the same field gets proportionally less
    sigma = _uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], generator, n) * (S / 224)
    if blurred.any():
        idx = blurred.nonzero()[:, 0]  # only the chosen crops: the others stay bit-exact
        radius = min(math.ceil(3 * cfg.blur_sigma[1] * S / 224), S - 1)  # reflect padding needs radius < S
        on = idx.to(x.device)
        x = x.index_copy(0, on, gaussian_blur(x[on], sigma[idx], radius))

    if cfg.noise > 0:
        level = _uniform(0, cfg.noise, generator, n) * (torch.rand(n, generator=generator) < 0.5)  # (n,)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        device_gen = torch.Generator(device=x.device).manual_seed(seed)
        std = x.std(dim=(-2, -1), correction=0, keepdim=True)  # (n, C, 1, 1)
        noise = torch.randn(x.shape, generator=device_gen, device=x.device)
        x = x + noise * std * level.to(x.device)[:, None, None, None]

    if cfg.normalize == "image":
        if stats is None:
            std, mean = torch.std_mean(x, dim=(-2, -1), correction=0, keepdim=True)
        else:
            mean, std = stats
        x = (x - mean) / std.clamp(min=1e-6)

    if cfg.channel_dropout > 0:  # after normalization: a dropped channel is 0, its image's mean
        x = channel_dropout(x, cfg.channel_dropout, protein_channel, generator)
    return x


def image_statistics(image: torch.Tensor, scale_shift: Pair | None = None) -> Pair:
    """(mean, std), (C,) each, of the channels of a whole image (C, H, W) as multi_crop's normalize
    "image" standardizes its crops: of x * scale + shift in float32 with `scale_shift`, else of x."""
    if scale_shift is not None:
        scale, shift = scale_shift
        image = image.float() * scale[:, None, None] + shift[:, None, None]
    std, mean = torch.std_mean(image, dim=(-2, -1), correction=0)
    return mean, std


def multi_crop(images: list[torch.Tensor], cfg: MultiCropConfig, generator: torch.Generator,
               protein_channel: int | None = None, scale_shift: list[Pair] | None = None,
               stats: list[Pair] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DINO's views of a batch of images.

    images: B tensors (C, H_i, W_i), float (sizes may differ, C may not), values roughly 0..1,
    all on one device; or, with `scale_shift` (B pairs of (C,) float32 tensors), the pixels as
    decoded (uint8, uint16, float), which x * scale + shift brings there: each crop then reads and
    converts its own region, not the whole field (the same crops to float32 round-off, from a
    fraction of the work on large fields). `stats`: each image's image_statistics, when known already (normalize "image"
    needs them; None: computed here, a pass over every whole image). Returns (globals (2, B, C,
    G, G), locals (N, B, C, L, L) or None when local_crops is 0), float32 on the images' device,
    crop-major as DINO orders them: all images' first crop, then all images' second crop, ..."""
    if not images:
        raise ValueError("multi_crop needs at least one image")
    C, device = images[0].shape[0], images[0].device
    for im in images:
        if im.ndim != 3 or im.shape[0] != C or im.device != device:
            raise ValueError(f"images must be (C, H, W) with one C and device; got {tuple(im.shape)} on {im.device}")
    if generator.device.type != "cpu":
        raise ValueError("multi_crop draws its parameters from a CPU generator")
    if protein_channel is not None and not 0 <= protein_channel < C:
        raise ValueError(f"protein_channel {protein_channel} out of range for {C} channel(s)")
    B, N = len(images), cfg.local_crops

    def boxes(count, scale):  # crop-major: crop k of image b is entry k * B + b
        return [(b, sample_box(im.shape[1], im.shape[2], scale, RATIO, generator))
                for _ in range(count) for b, im in enumerate(images)]

    if cfg.normalize == "image" and stats is None:
        stats = [image_statistics(im, scale_shift[b] if scale_shift is not None else None)
                 for b, im in enumerate(images)]

    def image_stats(count):  # (count*B, C, 1, 1) mean and std of each crop's whole image, crop-major
        if cfg.normalize != "image":
            return None
        mean, std = zip(*stats)
        return tuple(torch.stack(t)[:, :, None, None].repeat(count, 1, 1, 1) for t in (mean, std))

    global_boxes, local_boxes = boxes(2, cfg.global_scale), boxes(N, cfg.local_scale)
    blur_p = torch.tensor([cfg.blur[0], cfg.blur[1]]).repeat_interleave(B)  # (2*B,)
    glob = augment(resized_crops(images, global_boxes, cfg.global_size, scale_shift), blur_p, cfg, generator,
                   protein_channel, image_stats(2))
    glob = glob.view(2, B, C, cfg.global_size, cfg.global_size)  # (2*B, ...) -> (2, B, ...): crop-major
    if N == 0:
        return glob, None
    loc = augment(resized_crops(images, local_boxes, cfg.local_size, scale_shift), torch.full((N * B,), cfg.blur[2]),
                  cfg, generator, protein_channel, image_stats(N))
    return glob, loc.view(N, B, C, cfg.local_size, cfg.local_size)
