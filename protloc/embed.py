"""Images -> embedding vectors with a ViT backbone, streamed batch by batch in input order.

Decoding runs in loader worker processes while the model computes, so the model does not wait
on TIFF decoding when it need not; `EmbedStats` records how long it did wait. With tiles
(ViewOptions.tile) a row is a tile, `path#tile=K`, with cells (ViewOptions.cells) a cell,
`path#cell=K`, unless `aggregate="mean"` averages each image's tile or cell vectors into one row.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from protloc import __version__
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

    @classmethod
    def merge(cls, parts: list[EmbedStats]) -> EmbedStats:
        """The stats of one run split over processes (protloc.shard), `parts` in rank order: counts
        summed, rows' meta and skipped images in input order, the longest wait (ranks wait side by side)."""
        return cls(images=sum(p.images for p in parts), views=sum(p.views for p in parts),
                   view_meta=[m for p in parts for m in p.view_meta],
                   channel_maps=set().union(*(p.channel_maps for p in parts)),
                   skipped=[s for p in parts for s in p.skipped], data_wait_s=max(p.data_wait_s for p in parts))


def run_meta(model_meta: dict, opts: ViewOptions, config: ViTConfig, stats: EmbedStats) -> dict:
    """What an embeddings file records of the run that made it (the .npz's `meta`, AnnData's
    uns["protloc"]): protloc's version, the backbone (`model_meta`: load_backbone's or
    protloc.classifier.resolve_backbone's), the view as run (ViewOptions.to_record, with the channel
    plans used), the folder the row ids are relative to, and the images skipped."""
    record = model_view(opts, config).to_record()
    record["channel_strategy"]["plans"] = sorted(stats.channel_maps)
    return {"protloc": __version__, **model_meta, **record, "cwd": os.getcwd(),
            "skipped": [i for i, _ in stats.skipped]}


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
        config = ViTConfig(arch=arch, patch=patch, layout=layout, depth=depth,
                           **({"channels": channels} if channels else {}))
        torch.manual_seed(seed)
        model = VisionTransformer(config)
        return model, {"weights": "random", "seed": seed, "config": config.to_dict()}
    model, ckpt = model_from_checkpoint(weights, model_channels)
    meta = {"weights": str(weights), "sha256": file_sha256(weights), "config": model.config.to_dict()}
    if "foreign" in ckpt:
        meta["foreign"] = ckpt["foreign"]
    return model, meta


def embed(model: VisionTransformer, sources: list[Source], opts: ViewOptions, *, batch_size=32, device="cpu",
          workers=2, on_error="fail", stats: EmbedStats | None = None, progress=None, chunk_images=None):
    """Yield (ids, vectors (B, D) float32) for the sources, in input order: one row per image, or
    per tile (opts.tile) or cell (opts.cells) (opts.aggregate "mean": one row per image, the mean of
    its tile or cell vectors), each pooled as opts.pool.

    `progress(n)` is called with the number of images consumed (embedded or skipped) after each batch.
    `chunk_images`: no batch spans two chunks of that many sources (protloc.embed_resume)."""
    if opts.pool not in POOLINGS:
        raise ValueError(f"unknown pooling {opts.pool!r}")
    if opts.aggregate is not None and (opts.aggregate not in AGGREGATIONS
                                       or (opts.tile is None and opts.cells is None)):
        raise ValueError(f"aggregate {opts.aggregate!r} needs tiles or cells and one of {AGGREGATIONS}")
    stats = stats if stats is not None else EmbedStats()
    rows = _embed_views(model, sources, opts, opts.pool, batch_size, device, workers, on_error, stats, progress,
                        chunk_images)
    return mean_per_image(rows) if opts.aggregate == "mean" else rows


def _embed_views(model, sources, opts, pool, batch_size, device, workers, on_error, stats, progress, chunk_images):
    config = model.config
    opts = model_view(opts, config)
    per_channel = opts.channel_strategy == "per-channel"
    if opts.channel_strategy != "natural" and config.layout != "fused":
        raise ProtlocError(f"--channel-strategy {opts.channel_strategy} is for fused-layout models; a channel-layout "
                           "model matches channels by name and takes any subset of its known channels as they are")
    slots = len(config.channels)
    device = torch.device(device)
    model = model.eval().to(device)
    stream = batches(loader(sources, opts, workers), batch_size, on_error, stats.skipped, chunk_images)
    skipped_seen = 0
    with torch.inference_mode(), autocast(device):
        while True:
            t0 = time.perf_counter()
            batch = next(stream, None)
            stats.data_wait_s += time.perf_counter() - t0
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
