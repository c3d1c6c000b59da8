"""What a classifier trains on: the labelled rows of an embeddings file, or of images seen by a
backbone (embedded once for a head on frozen features, or fine-tuned with it), the task that fits
them (protloc.finetune), and what MODEL records of its inputs: the view predict takes by default,
the backbone. `protloc finetune` parses its flags, calls these, cross-validates and writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from protloc.classifier import backbone_reference
from protloc.data import ViewOptions, model_view, view_record
from protloc.embeddings import Embeddings
from protloc.errors import ProtlocError
from protloc.finetune import (FinetuneConfig, FrozenTask, FullTask, LabelledRows, embed_all, labelled_rows, readable,
                              rows_of)
from protloc.labels import Labels, Matched, images_of, match_rows
from protloc.model import VisionTransformer
from protloc.sources import Source


@dataclass
class Prepared:
    task: FrozenTask | FullTask
    rows: LabelledRows
    cfg: FinetuneConfig  # the settings as run
    views: dict  # the view record MODEL keeps: predict's defaults (ViewOptions.to_record)
    backbone_ref: dict  # the backbone the head is trained on (protloc.classifier)
    backbone: VisionTransformer | None  # a frozen backbone, stored in MODEL
    what: str  # one line: what is trained on what


def prepare_embeddings(emb: Embeddings, labels: Labels, cfg: FinetuneConfig, device,
                    channel_suffixes: list[str] | None = None) -> Prepared:
    """A head on the labelled rows of an embeddings file (emb.ids must be known), matched as
    protloc.labels.match_rows does relative to the folder embed ran in."""
    matched = match_rows(emb.ids, labels, base_dir=emb.meta.get("cwd"),
                         channel_suffixes=channel_suffixes or emb.meta.get("channel_suffixes"))
    rows = labelled_rows(matched)
    cfg = dataclasses.replace(cfg, pool=emb.meta.get("pool") or cfg.pool)  # for the record
    return Prepared(FrozenTask(emb.x[matched.rows], rows, cfg, device), rows, cfg, view_record(emb.meta),
                    backbone_reference(emb.meta), None, f"head on {emb.x.shape[1]}-d embeddings from {emb.source}")


def labelled_images(sources: list[Source], labels: Labels, freeze: bool,
                    channel_suffixes: tuple[str, ...] | None = None) -> tuple[list[Source], Matched]:
    """The sources to read and their match: a frozen run reads the images with a label (their own,
    or one of their cells' or tiles'), whose rows are matched once embedded; fine-tuning trains on
    labelled images, which are its rows."""
    matched = match_rows([s.id for s in sources], images_of(labels) if freeze else labels,
                         channel_suffixes=channel_suffixes)
    return [sources[r] for r in matched.rows], matched


def prepare_images(model: VisionTransformer, meta: dict, sources: list[Source], matched: Matched, labels: Labels,
                view: ViewOptions, cfg: FinetuneConfig, device, workers: int, on_error: str,
                progress=None) -> Prepared:
    """A head on `model`'s frozen embeddings of the images (embedded here, `progress(n)` after each
    batch), or `model` fine-tuned on them (the images that read, kept). `sources`, `matched`:
    labelled_images'; `view`, `cfg`: FinetuneConfig.with_view's, normalized (protloc.dataset_stats);
    `meta`: protloc.embed.load_backbone's."""
    if cfg.freeze:
        ids, x = embed_all(model, sources, view, batch_size=32, device=device, workers=workers, on_error=on_error,
                           progress=progress)
        matched = match_rows(ids, labels, channel_suffixes=view.channel_suffixes, require_all=False)
        if not len(matched.rows):
            raise ProtlocError("no labelled image could be embedded")
        rows = labelled_rows(matched)
        task, backbone = FrozenTask(x[matched.rows], rows, cfg, device), model
        what = f"head on frozen {meta['weights']} embeddings ({model.dim}-d)"
    else:
        ok = readable(model, sources, view, workers, on_error)
        if not ok:
            raise ProtlocError("no labelled image could be read")
        sources = [sources[i] for i in ok]
        rows = rows_of(labelled_rows(matched), [s.id for s in sources])
        task, backbone = FullTask(model, sources, rows, cfg, view, device, workers), None
        what = f"fine-tuning {meta['weights']} ({model.config.arch}/{model.config.patch}) at {cfg.size} px"
    return Prepared(task, rows, cfg, model_view(view, model.config).to_record(), meta, backbone, what)
