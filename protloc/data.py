"""From image sources to model-ready batches: channels, normalization, views, batching.

The pipeline for one image (runs in loader worker processes, one image in memory each):

    read (tiff.py) -> select/name channels -> per-channel normalization statistics
                   -> views: the image, its --tile tiles (tiles.py) or its --cells cells
                      (cells.py); each resized to --size (or kept at native size) -> Items

What the model requires of a view (its patch size, its channels: `model_view`) is checked here,
per image, so an error names the image and `--on-error skip` leaves out that image only.

Normalization is expressed as a per-(image, channel) affine map `x * scale + shift`, computed
on the full-resolution image (or, for `dataset`, taken from the data set's statistics:
protloc.dataset_stats) and applied by the patch-embedding kernel, so raw uint8/uint16 pixels can
travel to the GPU as they are. Items of the same shape and channel names are then
grouped into batches in input order.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from protloc.channel_map import apply_plan, plan_channels
from protloc.cells import cut_cells, find_mask, read_mask
from protloc.channels import select_channels
from protloc.errors import ProtlocError
from protloc.ids import cell_id, tile_id
from protloc.sources import Source, read_source
from protloc.tiff import DEFAULT_MAX_PIXELS
from protloc.tiles import tile_origins

if TYPE_CHECKING:
    from protloc.dataset_stats import DatasetStats

log = logging.getLogger(__name__)

NORMALIZATIONS = ("image", "percentile", "dataset", "imagenet", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PERCENTILES = (1.0, 99.8)  # the usual microscopy contrast range (as in CSBDeep's normalize)


def unit_range(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), float64 (C,), mapping lo..hi to 0..1 as `x * scale + shift` (not clipped);
    a flat channel (hi == lo) gets a bounded scale instead of a blow-up."""
    scale = 1.0 / np.maximum(hi - lo, 1e-6 * np.maximum(np.abs(hi), 1.0))
    return scale, -lo * scale


def normalization(pixels: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift), float32 (C,), such that `pixels * scale + shift` is normalized.

    image:      per-image per-channel standardization to mean 0, std 1 (the DINO4Cells convention)
    percentile: the 1st..99.8th percentile range of each channel mapped to 0..1 (not clipped)
    imagenet:   the percentile range to 0..1, then ImageNet's mean/std (RGB values for 3 channels,
                their averages otherwise), for models pretrained on natural images
    none:       pixels as stored, as float
    (dataset takes the data set's statistics instead: DatasetStats.scale_shift.)
    """
    C = pixels.shape[0]
    flat = pixels.reshape(C, -1).astype(np.float64)
    if method == "none":
        return np.ones(C, np.float32), np.zeros(C, np.float32)
    if method == "image":
        mean, std = flat.mean(axis=1), flat.std(axis=1)
        scale = 1.0 / np.maximum(std, 1e-6 * np.maximum(np.abs(mean), 1.0))  # flat channel: no blow-up
        return scale.astype(np.float32), (-mean * scale).astype(np.float32)
    if method in ("percentile", "imagenet"):
        scale, shift = unit_range(*np.percentile(flat, PERCENTILES, axis=1))
        if method == "imagenet":
            mean = np.array(IMAGENET_MEAN if C == 3 else [np.mean(IMAGENET_MEAN)] * C)
            std = np.array(IMAGENET_STD if C == 3 else [np.mean(IMAGENET_STD)] * C)
            scale, shift = scale / std, (shift - mean) / std
        return scale.astype(np.float32), shift.astype(np.float32)
    raise ValueError(f"unknown normalization {method!r}")


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """(C, Y, X) -> (C, size, size) float32, bilinear with antialiasing when shrinking."""
    if pixels.shape[1:] == (size, size):
        return pixels
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]  # (1, C, Y, X)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].numpy()


@dataclass(frozen=True)
class ViewOptions:
    """How each image becomes rows: read, normalized, viewed (whole, tiles or cells), fitted to the
    model's channels, pooled. Its record (to_record) travels with embeddings and MODELs."""
    size: int | None = None  # resize each view to size x size; None keeps the native size
    tile: int | None = None  # cut each image into tile x tile tiles (tiles.py); None: the whole image
    stride: int | None = None  # step between tiles; None: the tile size
    cells: str | None = None  # --cells MASKS: one view per cell of the image's mask (cells.py); None: no cells
    cell_size: int = 128  # the square crop around each cell's centroid
    mask_outside: bool = False  # zero the crop's pixels that are not of the cell
    border: str = "skip"  # a cell cut by the image border: skip it, or pad its crop (cells.BORDERS)
    normalize: str = "image"  # NORMALIZATIONS
    dataset_stats: DatasetStats | None = None  # normalize "dataset": the data set's per-channel statistics
    pool: str = "cls"  # a row from the tokens: the CLS token or the patch tokens' mean (embed.POOLINGS)
    aggregate: str | None = None  # "mean": one row per image, the mean of its tile or cell rows (tiles.AGGREGATIONS)
    channels: tuple[str, ...] | None = None  # --channels: names (and, for named files, selection)
    channel_suffixes: tuple[str, ...] | None = None  # one file per channel: how files group into images (sources.py)
    z: str = "max"
    axes: str | None = None
    series: int | None = None  # --series: which of a file's tifffile series (tiff.py); None: the default one
    zarr_level: int = 0  # --zarr-level: an OME-Zarr image's resolution level (source_zarr.py); 0: the full one
    max_pixels: int = DEFAULT_MAX_PIXELS
    model_channels: tuple[str, ...] | None = None  # a fused-layout model: the slots to fill (channel_map.py)
    known_channels: tuple[str, ...] | None = None  # a channel-layout model: names it has embeddings for
    channel_strategy: str = "natural"  # how image channels fill model_channels (channel_map.STRATEGIES)
    fill: str = "zero"  # what fills a slot no image channel goes to
    strategy_seed: int = 0  # the random strategy's permutation
    patch: int | None = None  # the model's patch size: every view must hold one patch (model_view)
    same_channels: tuple[str, ...] | None = None  # training a channel-layout model: every image's channels, in order

    def __post_init__(self):
        # a view size fixed by a flag fits a patch for every image or for none: one error, before any image
        fixed = (("--size", self.size) if self.size is not None else ("--tile", self.tile) if self.tile is not None
                 else ("--cell-size", self.cell_size) if self.cells is not None else None)
        if self.patch is not None and fixed is not None and fixed[1] < self.patch:
            raise ProtlocError(f"{fixed[0]} {fixed[1]} is smaller than one {self.patch}x{self.patch} patch "
                               "of the model")

    def to_record(self) -> dict:
        """The view as embeddings files (meta) and MODELs (views) record it, JSON-able: what makes a row
        (how the files were read: axes, series, zarr_level, max_pixels, is the data's, not recorded). Cell crop
        settings are None without cells; stride is the tile size when not given."""
        cells = self.cells is not None
        return {"size": self.size, "normalize": self.normalize,
                "dataset_stats": self.dataset_stats.to_dict() if self.dataset_stats is not None else None,
                "pool": self.pool, "tile": self.tile, "stride": self.stride or self.tile, "aggregate": self.aggregate,
                "channels": _listed(self.channels), "channel_suffixes": _listed(self.channel_suffixes), "z": self.z,
                "cells": self.cells, "cell_size": self.cell_size if cells else None,
                "mask_outside": self.mask_outside if cells else None, "border": self.border if cells else None,
                "channel_strategy": {"strategy": self.channel_strategy, "fill": self.fill, "seed": self.strategy_seed,
                                     "model_channels": _listed(self.model_channels)}}

    @classmethod
    def from_record(cls, record: dict, source: str, config=None) -> ViewOptions:
        """The view a record holds (to_record's, or one written by an earlier protloc: any key may be
        missing). A size, normalization, statistics or pooling it does not record are the model's
        (`config`, a ViTConfig: its recipe's, or a MODEL's), else the defaults; a recorded size of None
        is the native size. `source` names the file in errors (unusable dataset statistics)."""
        from protloc.dataset_stats import DatasetStats  # that module imports this one

        model = {"size": config.view_size or None, "normalize": config.normalize, "pool": config.pool,
                 "dataset_stats": config.dataset_stats} if config is not None else {}
        values = {k: v for k, v in [*model.items(), *((k, record.get(k)) for k in RECORD_KEYS)] if v is not None}
        if "size" in record:  # recorded None: the native size
            values["size"] = record["size"]
        strategy = values.pop("channel_strategy", {})
        values.update((name, strategy[key]) for key, name in (("strategy", "channel_strategy"), ("fill", "fill"),
                      ("seed", "strategy_seed"), ("model_channels", "model_channels")) if strategy.get(key) is not None)
        if values.get("dataset_stats"):
            values["dataset_stats"] = DatasetStats.from_dict(values["dataset_stats"], source)
        values.update((k, tuple(values[k])) for k in ("channels", "channel_suffixes", "model_channels") if k in values)
        return cls(**values)


def _listed(names: tuple[str, ...] | None) -> list[str] | None:
    return list(names) if names else None


RECORD_KEYS = tuple(ViewOptions().to_record())


def view_record(meta: dict) -> dict:
    """The view record among an embeddings file's meta, as it stands: a setting it does not record
    stays None, so that predict takes the backbone's (ViewOptions.from_record)."""
    return {k: meta.get(k) for k in RECORD_KEYS}


def model_view(opts: ViewOptions, config) -> ViewOptions:
    """`opts` with what the model (a ViTConfig) requires of every view, checked image by image:
    its patch size, and a fused-layout model's input slots or a channel-layout model's known names."""
    return dataclasses.replace(opts, patch=config.patch,
                               model_channels=tuple(config.channels) if config.layout == "fused" else None,
                               known_channels=tuple(config.vocab) if config.layout == "channel" else None)


@dataclass
class Item:
    index: int
    id: str
    pixels: np.ndarray | None = None  # (C, H, W) uint8/uint16/float32
    scale: np.ndarray | None = None  # (C,)
    shift: np.ndarray | None = None  # (C,)
    channel_names: tuple[str, ...] = ()
    error: str | None = None  # set instead of pixels when the image could not be used
    view: int | None = None  # the position of a tile or cell view among its image's views; None: the whole image
    meta: dict | None = None  # where the view lies in its image: a tile's origin, a cell's (cells.py)
    channel_map: str | None = None  # which image channel fills which model slot (ChannelPlan.describe)
    warnings: tuple[str, ...] = ()  # what the reader noticed (`FILE: what`), logged by the main process (usable)

    @property
    def first_view(self) -> bool:
        """The image's whole view or its first tile or cell: counts the image once."""
        return self.view is None or self.view == 0


def check_channels(names: list[str], opts: ViewOptions, source: str) -> None:
    """A channel-layout model must know the image's channels, and in training every image must
    have the same ones (a batch of crops has one set of channels): per image, so the error names
    the file. (A fused-layout model's slots are filled by the channel strategy, which checks its own case.)"""
    if opts.known_channels is not None:
        unknown = [n for n in names if n not in opts.known_channels]
        if unknown:
            raise ProtlocError(f"{source}: channel(s) {', '.join(unknown)} unknown to the model (it knows "
                               f"{', '.join(opts.known_channels)}); name the channels with --channels")
    if opts.same_channels is not None and tuple(names) != opts.same_channels:
        raise ProtlocError(f"{source}: channels {', '.join(names)} differ from the run's "
                           f"({', '.join(opts.same_channels)}): training a channel-layout model takes images "
                           "with the same channels; select them with --channels")


def check_patch(view_id: str, pixels: np.ndarray, opts: ViewOptions) -> None:
    """A view (C, H, W) must hold at least one patch of the model (opts.patch)."""
    height, width = pixels.shape[1:]
    if opts.patch is not None and min(height, width) < opts.patch:
        raise ProtlocError(f"{view_id}: image of {height}x{width} pixels is smaller than one {opts.patch}x{opts.patch} "
                           "patch of the model")


def load_item(index: int, source: Source, opts: ViewOptions) -> Item:
    """Read and prepare one image; a user-caused problem becomes Item.error, not an exception, and
    the reader's warnings become Item.warnings (a loader worker never prints)."""
    image = None
    try:
        image = read_source(source, z=opts.z, axes=opts.axes, max_pixels=opts.max_pixels, series=opts.series,
                            level=opts.zarr_level)
        keep, names = select_channels(image.pixels.shape[0], image.channel_names,
                                      list(opts.channels) if opts.channels else None, source.id)
        check_channels(names, opts, source.id)
        pixels = image.pixels[keep]
        if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
            raise ProtlocError(f"{source.id}: contains NaN or infinite pixel values")
        if opts.normalize == "dataset":
            if opts.dataset_stats is None:
                raise ValueError("normalize 'dataset' needs the data set's statistics (protloc.dataset_stats)")
            scale, shift = opts.dataset_stats.scale_shift(names, source.id)
        else:
            scale, shift = normalization(pixels, opts.normalize)
        channel_map = None
        if opts.model_channels is not None:  # a fused-layout model: fill its input slots
            plan = plan_channels(opts.channel_strategy, tuple(names), opts.model_channels, opts.fill,
                                 opts.strategy_seed, source.id)
            pixels, scale, shift = apply_plan(plan, pixels, scale, shift)
            names, channel_map = plan.model_channels, plan.describe()
        if opts.tile is None and opts.cells is None:  # the whole image is the view (tiles and cells are cut later)
            if opts.size is not None:
                pixels = resize(pixels, opts.size)
            check_patch(source.id, pixels, opts)
        return Item(index, source.id, np.ascontiguousarray(pixels), scale, shift, tuple(names),
                    channel_map=channel_map, warnings=tuple(image.warnings))
    except ProtlocError as e:
        return Item(index, source.id, error=str(e), warnings=tuple(image.warnings) if image else ())


def views(item: Item, opts: ViewOptions) -> list[Item]:
    """The model inputs of one loaded image: itself, its tiles or its cells (each with the whole
    image's normalization, resized to opts.size when given). A failed item passes through; an
    image without views (smaller than a tile, no usable cell, no mask) becomes a failed item."""
    if (opts.tile is None and opts.cells is None) or item.error is not None:
        return [item]
    try:
        cuts = _tiles(item, opts) if opts.tile is not None else _cells(item, opts)
    except ProtlocError as e:
        return [Item(item.index, item.id, error=str(e), warnings=item.warnings)]
    return [Item(item.index, view_id, np.ascontiguousarray(resize(pixels, opts.size) if opts.size else pixels),
                 item.scale, item.shift, item.channel_names, view=k, meta=meta, channel_map=item.channel_map,
                 warnings=item.warnings if k == 0 else ())  # the image's warnings, once
            for k, (view_id, pixels, meta) in enumerate(cuts)]


def _tiles(item: Item, opts: ViewOptions) -> list[tuple[str, np.ndarray, dict]]:
    """(id, pixels, meta) of each tile of the image."""
    _, height, width = item.pixels.shape
    origins = tile_origins(height, width, opts.tile, opts.stride)
    if not origins:
        raise ProtlocError(f"{item.id}: image of {height}x{width} pixels is smaller than one "
                           f"{opts.tile}x{opts.tile} tile (--tile)")
    return [(tile_id(item.id, k), item.pixels[:, y:y + opts.tile, x:x + opts.tile], {"origin": [y, x]})
            for k, (y, x) in enumerate(origins)]


def _cells(item: Item, opts: ViewOptions) -> list[tuple[str, np.ndarray, dict]]:
    """(id, pixels, meta) of each cell of the image's mask, ascending by label."""
    path = find_mask(item.id, opts.cells)
    mask = read_mask(path, item.pixels.shape[1:], item.id, opts.max_pixels)
    cells = cut_cells(item.pixels, mask, opts.cell_size, opts.mask_outside, opts.border)
    if not cells:
        why = f"fits a {opts.cell_size}x{opts.cell_size} crop inside the image (--border skip)" if mask.any() \
            else "(the mask is all 0)"
        raise ProtlocError(f"{item.id}: no cell of {path} {why}")
    return [(cell_id(item.id, c.label), c.pixels, c.meta) for c in cells]


def view_of(source: Source, fragment: str, opts: ViewOptions) -> Item:
    """The view behind one row: image `source` read as `opts`, whole (`fragment` ""), or its tile or
    cell `fragment` (`#tile=K`, `#cell=K`) cut as the loader cut it. The image's warnings are logged;
    a bad image or a view it does not have raises ProtlocError."""
    if not fragment:
        opts = dataclasses.replace(opts, tile=None, cells=None)
    for view in views(load_item(0, source, opts), opts):
        usable(view, "fail")
        if view.id == source.id + fragment:
            return view
    raise ProtlocError(f"{source.id}: has no view {fragment} (with the recorded --tile, --stride, --cells)")


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over sources, so DataLoader workers decode in parallel and keep order."""

    def __init__(self, sources: list[Source], opts: ViewOptions):
        self.sources = sources
        self.opts = opts

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, index):
        return load_item(index, self.sources[index], self.opts)


class ViewDataset(ImageDataset):
    """The views (whole image, tiles or cells) of each image, cut in the worker that decoded it."""

    def __getitem__(self, index):
        return views(super().__getitem__(index), self.opts)


@dataclass
class Batch:
    ids: list[str]
    pixels: torch.Tensor  # (B, C, H, W), dtype as stored (uint16 stays uint16 until the kernel)
    scale: torch.Tensor  # (B, C) float32
    shift: torch.Tensor  # (B, C) float32
    channel_names: tuple[str, ...]
    meta: list[dict | None]  # per row: where a tile or cell lies in its image (Item.meta); None for a whole image
    images: int  # images whose first view is in this batch (progress counts images, not tiles or cells)
    channel_maps: set[str]  # the channel plans of its rows (fused-layout models)


def _collate(items: list[Item]) -> Batch:
    pixels = np.stack([it.pixels for it in items])
    return Batch([it.id for it in items], torch.from_numpy(pixels),
                 torch.from_numpy(np.stack([it.scale for it in items])),
                 torch.from_numpy(np.stack([it.shift for it in items])), items[0].channel_names,
                 [it.meta for it in items], sum(it.first_view for it in items),
                 {it.channel_map for it in items if it.channel_map})


def usable(item: Item, on_error: str, skipped: list | None = None) -> bool:
    """Whether an item can be used, logging its warnings first: every consumer of items passes
    them through here, in the main process and in input order. A failed item raises ProtlocError
    (on_error="fail"), or is logged, appended to `skipped` as (id, message) and left out
    (on_error="skip")."""
    for warning in item.warnings:
        log.warning("%s", warning)
    if item.error is None:
        return True
    if on_error == "fail":
        raise ProtlocError(item.error)
    log.warning("skipped %s", item.error)
    if skipped is not None:
        skipped.append((item.id, item.error))
    return False


def batches(items, batch_size: int, on_error: str = "fail", skipped: list | None = None,
            chunk_images: int | None = None):
    """Group consecutive usable items of equal shape, dtype and channel names into batches, in order.
    With `chunk_images`, no batch holds items of two chunks of that many images (by Item.index), so
    a run continued from a chunk boundary makes the same batches as one that never stopped."""
    pending: list[Item] = []
    pending_key = None
    for item in items:
        if not usable(item, on_error, skipped):
            continue
        chunk = item.index // chunk_images if chunk_images else None
        key = (item.pixels.shape, item.pixels.dtype, item.channel_names, chunk)
        if pending and (len(pending) == batch_size or key != pending_key):
            yield _collate(pending)
            pending = []
        pending.append(item)
        pending_key = key
    if pending:
        yield _collate(pending)


def on_device(items: list[Item], device: torch.device) -> tuple[list[torch.Tensor], list[str]]:
    """Decoded images for training: each one's pixels (C, H, W) float32 on `device` with its
    normalization applied (x * scale + shift), and their channel names ([] for no items)."""
    images = []
    for item in items:
        x = torch.from_numpy(item.pixels).to(device).float()
        scale, shift = (torch.from_numpy(a).to(device) for a in (item.scale, item.shift))
        images.append(x * scale[:, None, None] + shift[:, None, None])
    return images, list(items[0].channel_names) if items else []


def index_batches(sources: list[Source], opts: ViewOptions, index_lists, workers: int):
    """The Items (whole images) of each list of source indices in `index_lists` (an iterable, e.g.
    a batch sampler), decoded by `workers` processes (0: in this process) ahead of use."""
    dataset = ImageDataset(sources, opts)
    if workers == 0:
        return ([dataset[i] for i in idx] for idx in index_lists)
    return decoded(dataset, workers, batch_sampler=index_lists, collate_fn=list)


def loader(sources: list[Source], opts: ViewOptions, workers: int):
    """Items (views: whole images, tiles or cells) in input order, decoded by `workers` processes
    (0: in this process) ahead of use."""
    dataset = ViewDataset(sources, opts)
    if workers == 0:
        return (item for i in range(len(dataset)) for item in dataset[i])
    per_image = decoded(dataset, workers, batch_size=None, prefetch_factor=4)
    return (item for items in per_image for item in items)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def decoded(dataset: torch.utils.data.Dataset, workers: int, **kw):
    """An iterator over a DataLoader of `dataset` with `workers` (>= 1) decoding processes.

    Ctrl-C, `timeout`, Slurm and systemd signal every process of the job, workers included; the
    main process decides how to stop (a training run finishes its step and saves a checkpoint),
    so a worker ignores SIGINT, and SIGTERM unless its main process sends it (as torch and
    multiprocessing do to end workers). Both are blocked while the workers start, so none can
    kill one early (this process gets them once unblocked). Workers end when the iterator is
    exhausted or dropped, and within a second or two when this process dies, even while one is
    stuck reading a file."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        init = functools.partial(_worker_init, os.getpid())  # this process's id: the workers' main
        return iter(torch.utils.data.DataLoader(dataset, num_workers=workers, worker_init_fn=init, **kw))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _worker_init(main_pid: int, _worker_id: int):
    if os.getppid() != main_pid:  # the main process died before this worker started: nothing to watch
        os._exit(0)
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])  # blocked by decoded(); a pending one is dropped
    if hasattr(signal, "sigtimedwait"):  # Linux (elsewhere SIGTERM ends a worker, as torch has it)
        threading.Thread(target=_watch_main, args=(main_pid,), daemon=True).start()
    else:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])


def _watch_main(main_pid: int) -> None:
    """A worker's thread that takes its SIGTERMs (blocked in every thread of the worker): one from
    the main process ends the worker, one from anyone else (a scheduler signalling the whole job)
    is ignored; and the worker ends when the main process is gone."""
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 1.0)
        if os.getppid() != main_pid or (info is not None and info.si_pid == main_pid):
            os._exit(0)


def probe_channels(sources: list[Source], opts: ViewOptions, on_error: str = "fail") -> list[str]:
    """The channel names of the first usable image: what a new model is built for. A bad image
    fails, or with on_error="skip" the next one is tried (the run reports the bad one when it meets it)."""
    opts = dataclasses.replace(opts, normalize="none", dataset_stats=None)  # names need no normalization
    first_error = None
    for index, source in enumerate(sources):
        item = load_item(index, source, opts)
        if item.error is None:
            return list(item.channel_names)
        if on_error == "fail":
            raise ProtlocError(item.error)
        first_error = first_error or item.error
    raise ProtlocError(f"no image could be read ({len(sources)} failed; the first: {first_error})")
