"""Images -> embedding vectors with a ViT backbone, streamed batch by batch in input order.

Decoding runs in loader worker processes while the model computes, so the model does not wait
on TIFF decoding when it need not; `EmbedStats` records how long it did wait. With tiles
(ViewOptions.tile) a row is a tile, `path#tile=K`, with cells (ViewOptions.cells) a cell,
`path#cell=K`, unless `aggregate="mean"` averages each image's tile or cell vectors into one row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from protloc.checkpoint import file_sha256, model_from_checkpoint
from protloc.data import ViewOptions, batches, loader, model_view, probe_channels
from protloc.device import autocast
from protloc.errors import ProtlocError
from protloc.model import ViTConfig, VisionTransformer
from protloc.sources import Source
from protloc.tiles import AGGREGATIONS, mean_per_image

POOLINGS = ("cls", "mean")


@dataclass
class EmbedStats:
    images: int = 0
    views: int = 0  # tile or cell views embedded (0 for whole images)
    view_meta: list[dict] = field(default_factory=list)  # Item.meta of each tile or cell row yielded, in order
    channel_maps: set[str] = field(default_factory=set)  # the channel plans used (fused-layout models)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    data_wait_s: float = 0.0  # time the model sat waiting for the next decoded batch
    compute_s: float = 0.0


def load_backbone(weights: str, sources: list[Source], opts: ViewOptions, *, arch="vit_small",
                  patch=16, layout="fused", depth=12, seed=0, model_channels=None,
                  on_error="fail") -> tuple[VisionTransformer, dict]:
    """The backbone named by `weights` (a protloc or foreign checkpoint, or "random") and meta
    describing it. `model_channels` names a fused model's input channels (foreign checkpoints
    do not store them; see protloc.foreign for the defaults).

    A random backbone takes its input channels from --model-channels, --channels or, failing
    those, from the first usable image (`on_error` as in protloc.data.probe_channels), so
    `--weights random` works on any data as a baseline."""
    if weights == "random":
        channels = list(model_channels or opts.channels or []) or None
        if channels is None and layout == "fused":
            channels = probe_channels(sources, opts, on_error)
        config = ViTConfig(arch=arch, patch=patch, layout=layout, depth=depth, **({"channels": channels} if channels else {}))
        torch.manual_seed(seed)
        model = VisionTransformer(config)
        return model, {"weights": "random", "seed": seed, "config": config.to_dict()}
    model, ckpt = model_from_checkpoint(weights, model_channels)
    meta = {"weights": str(weights), "sha256": file_sha256(weights), "config": model.config.to_dict()}
    if "foreign" in ckpt:
        meta["foreign"] = ckpt["foreign"]
    return model, meta


def view_settings(config: ViTConfig, size: int | None = None, normalize: str | None = None,
                  pool: str | None = None) -> tuple[int | None, str, str]:
    """(size, normalize, pool) to embed with: each one given (not None), else the one the model
    records (`config`: its pretraining recipe's, or a MODEL's views). Size 0 or None: native size."""
    size = config.view_size if size is None else size
    return size or None, normalize or config.normalize, pool or config.pool


def embed(model: VisionTransformer, sources: list[Source], opts: ViewOptions, *, pool="cls", batch_size=32,
          device="cpu", workers=2, on_error="fail", stats: EmbedStats | None = None, progress=None,
          aggregate: str | None = None):
    """Yield (ids, vectors (B, D) float32) for the sources, in input order: one row per image, or
    per tile (opts.tile) or cell (opts.cells) (aggregate="mean": one row per image, the mean of its
    tile or cell vectors).

    `progress(n)` is called with the number of images consumed (embedded or skipped) after each batch."""
    if pool not in POOLINGS:
        raise ValueError(f"unknown pooling {pool!r}")
    if aggregate is not None and (aggregate not in AGGREGATIONS or (opts.tile is None and opts.cells is None)):
        raise ValueError(f"aggregate {aggregate!r} needs tiles or cells and one of {AGGREGATIONS}")
    stats = stats if stats is not None else EmbedStats()
    rows = _embed_views(model, sources, opts, pool, batch_size, device, workers, on_error, stats, progress)
    return mean_per_image(rows) if aggregate == "mean" else rows


def _embed_views(model, sources, opts, pool, batch_size, device, workers, on_error, stats, progress):
    config = model.config
    opts = model_view(opts, config)
    per_channel = opts.channel_strategy == "per-channel"
    if opts.channel_strategy != "natural" and config.layout != "fused":
        raise ProtlocError(f"--channel-strategy {opts.channel_strategy} is for fused-layout models; a channel-layout "
                           "model matches channels by name and takes any subset of its known channels as they are")
    slots = len(config.channels)
    device = torch.device(device)
    model = model.eval().to(device)
    stream = batches(loader(sources, opts, workers), batch_size, on_error, stats.skipped)
    skipped_seen = 0
    with torch.inference_mode(), autocast(device):
        while True:
            t0 = time.perf_counter()
            batch = next(stream, None)
            t1 = time.perf_counter()
            stats.data_wait_s += t1 - t0
            if batch is None:
                break
            pixels = batch.pixels.to(device, non_blocking=True)
            scale, shift = batch.scale.to(device), batch.shift.to(device)
            if per_channel:  # each image channel alone in every slot, the vectors side by side: (B, D * C)
                vectors = torch.cat([model.embed(pixels[:, [c] * slots], scale[:, [c] * slots], shift[:, [c] * slots],
                                                 None, pool) for c in range(pixels.shape[1])], dim=1)
                stats.channel_maps.add(f"per-channel: {', '.join(batch.channel_names)}, each into all {slots} slots")
            else:
                vectors = model.embed(pixels, scale, shift, batch.channel_names, pool)
                stats.channel_maps |= batch.channel_maps
            vectors = vectors.float().cpu().numpy()
            stats.compute_s += time.perf_counter() - t1
            stats.images += batch.images
            if opts.tile is not None or opts.cells is not None:
                stats.views += len(batch.ids)
                stats.view_meta.extend(batch.meta)
            if progress is not None:
                progress(batch.images + len(stats.skipped) - skipped_seen)
                skipped_seen = len(stats.skipped)
            yield batch.ids, vectors.astype(np.float32, copy=False)
    if progress is not None and len(stats.skipped) > skipped_seen:  # images skipped after the last batch
        progress(len(stats.skipped) - skipped_seen)
