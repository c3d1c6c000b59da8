"""`--normalize dataset`: per-channel intensity statistics of a whole data set.

Per-image normalization (`image`, `percentile`) maps every image to the same range, and with it
erases what differs between images: a protein absent from a cell becomes amplified background,
a dim cell looks like a bright one. `dataset` maps one fixed range per channel, the same for
every image, so those differences reach the model.

The range is robust and cheap to find: up to MAX_IMAGES images spread evenly over the list, read
once each (in the loader workers) at full resolution after channel selection, give up to PIXELS
randomly chosen pixels per channel (a generator seeded by the image's position, so the same list
gives the same statistics); the 1st and 99.8th percentiles of the pooled pixels of each channel
(protloc.data.PERCENTILES, as `percentile` uses per image) map to 0 and 1 (not clipped), the
`x * scale + shift` form the patch-embedding kernel takes. Channels are matched by name (unnamed
ones by position: ch0, ch1, ...). The statistics are recorded where the model is (the
checkpoint's config, the MODEL's views, the .npz meta) and reused from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from protloc.data import PERCENTILES, Item, ViewOptions, decoded, load_item, unit_range, usable
from protloc.errors import ProtlocError
from protloc.sources import Source

MAX_IMAGES = 256  # images sampled, spread evenly over the list: a few thousand pixels each is plenty
PIXELS = 4096  # pixels sampled per image and channel (all of a smaller image)


@dataclass(frozen=True)
class DatasetStats:
    """Per-channel intensity range of a data set: `lo` -> 0 and `hi` -> 1, per channel name."""
    channels: tuple[str, ...]
    lo: tuple[float, ...]  # the PERCENTILES[0] percentile of each channel's sampled pixels
    hi: tuple[float, ...]  # the PERCENTILES[1] percentile
    images: int  # images sampled
    of: int  # images in the data set
    pixels: int  # pixels sampled per image and channel, at most

    def scale_shift(self, names, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift), float32 (C,), of an image with channels `names`; a channel the
        statistics do not know is an error naming it and the image `source`."""
        unknown = [n for n in names if n not in self.channels]
        if unknown:
            raise ProtlocError(f"{source}: channel(s) {', '.join(unknown)} not in the data set's normalization "
                               f"statistics (they know {', '.join(self.channels)}): select or name the channels with "
                               "--channels, or normalize otherwise (--normalize)")
        k = [self.channels.index(n) for n in names]
        scale, shift = unit_range(np.array(self.lo, np.float64)[k], np.array(self.hi, np.float64)[k])
        return scale.astype(np.float32), shift.astype(np.float32)

    def describe(self) -> str:
        """One line: what was sampled and each channel's range."""
        ranges = ", ".join(f"{n} {lo:.6g}..{hi:.6g}" for n, lo, hi in zip(self.channels, self.lo, self.hi))
        return (f"dataset normalization: {PERCENTILES[0]:g}-{PERCENTILES[1]:g}th percentiles of up to {self.pixels} "
                f"pixels from each of {self.images} of {self.of} image(s) -> 0..1: {ranges}")

    def to_dict(self) -> dict:
        """JSON-able, as a checkpoint's config and an .npz meta record it (lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, source: str) -> DatasetStats:
        """The statistics recorded in `source` (a checkpoint, MODEL or embeddings file)."""
        try:
            stats = cls(channels=tuple(d["channels"]), lo=tuple(map(float, d["lo"])), hi=tuple(map(float, d["hi"])),
                        images=int(d["images"]), of=int(d["of"]), pixels=int(d["pixels"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtlocError(f"{source}: its dataset normalization statistics are unusable ({e!r})") from None
        if not len(stats.channels) == len(stats.lo) == len(stats.hi):
            raise ProtlocError(f"{source}: its dataset normalization statistics are unusable (lengths differ)")
        return stats


def recorded(stats: DatasetStats | None) -> dict | None:
    """The statistics as a checkpoint, MODEL or .npz records them (None: not normalized 'dataset')."""
    return stats.to_dict() if stats is not None else None


def sampled_images(n: int, max_images: int = MAX_IMAGES) -> list[int]:
    """Indices of the images sampled from a list of n: all, or max_images spread evenly (first and last included)."""
    if n <= max_images:
        return list(range(n))
    return np.linspace(0, n - 1, max_images).round().astype(int).tolist()  # distinct: the step is > 1


def sample_pixels(pixels: np.ndarray, index: int, count: int = PIXELS) -> np.ndarray:
    """(C, H, W) -> (C, k) float64: the same k = min(count, H * W) random pixel positions in every
    channel, drawn by a generator seeded by the image's position `index` in its list."""
    C = pixels.shape[0]
    flat = pixels.reshape(C, -1)
    if flat.shape[1] > count:
        flat = flat[:, np.random.default_rng(index).choice(flat.shape[1], size=count, replace=False)]
    return flat.astype(np.float64)


class _Samples(torch.utils.data.Dataset):
    """The pixel sample of each sampled image, drawn in the worker that decoded it (only the
    sample travels back, never the image)."""

    def __init__(self, sources: list[Source], indices: list[int], opts: ViewOptions, pixels: int):
        self.sources, self.indices, self.opts, self.pixels = sources, indices, opts, pixels

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k) -> tuple[Item, np.ndarray | None]:
        index = self.indices[k]
        item = load_item(index, self.sources[index], self.opts)
        values = sample_pixels(item.pixels, index, self.pixels) if item.error is None else None
        return dataclasses.replace(item, pixels=None), values


def estimate(sources: list[Source], opts: ViewOptions, workers: int = 2, on_error: str = "fail",
             max_images: int = MAX_IMAGES, pixels: int = PIXELS) -> DatasetStats:
    """The data set's per-channel statistics, from one read of each sampled image (sampled_images)
    as `opts` reads it (channels, z, axes, series; full resolution, no views), `workers` decoding
    processes (0: this one). A bad image fails, or with on_error="skip" is logged and left out;
    none usable is an error. Streams: one image per worker in memory, plus the samples
    (at most max_images x pixels values per channel)."""
    opts = dataclasses.replace(opts, normalize="none", dataset_stats=None, size=None, tile=None, cells=None,
                               model_channels=None, patch=None)
    indices = sampled_images(len(sources), max_images)
    dataset = _Samples(sources, indices, opts, pixels)
    # collate_fn=tuple: each (item, sample) as it comes (the default would turn arrays into tensors)
    samples = (dataset[k] for k in range(len(dataset))) if workers == 0 else \
        decoded(dataset, workers, batch_size=None, collate_fn=tuple)
    pooled: dict[str, list[np.ndarray]] = {}
    used = 0
    for item, values in samples:
        if not usable(item, on_error):
            continue
        used += 1
        for name, row in zip(item.channel_names, values):
            pooled.setdefault(name, []).append(row)
    if not used:
        raise ProtlocError(f"no image could be read for the dataset normalization ({len(indices)} tried)")
    names = tuple(pooled)
    lo, hi = zip(*(np.percentile(np.concatenate(pooled[n]), PERCENTILES) for n in names))
    return DatasetStats(names, tuple(map(float, lo)), tuple(map(float, hi)), used, len(sources), pixels)


def with_dataset_stats(opts: ViewOptions, recorded: dict | None, where: str, sources: list[Source], workers: int = 2,
                       on_error: str = "fail") -> tuple[ViewOptions, DatasetStats | None]:
    """`opts` ready to read images. With normalize "dataset": the statistics `recorded` in `where`
    (a checkpoint's, a MODEL's or an embeddings file's), else those opts holds (read from `where` by
    ViewOptions.from_record), else those estimated over `sources`,
    which are also returned (for the caller to report); otherwise `opts` without statistics."""
    if opts.normalize != "dataset":
        return dataclasses.replace(opts, dataset_stats=None), None
    if recorded is not None:
        return dataclasses.replace(opts, dataset_stats=DatasetStats.from_dict(recorded, where)), None
    if opts.dataset_stats is not None:
        return opts, None
    stats = estimate(sources, opts, workers, on_error)
    return dataclasses.replace(opts, dataset_stats=stats), stats
