"""MODEL: a trained localization classifier, its file, and its predictions.

A MODEL is a protloc checkpoint (protloc.checkpoint: plain tensors and data only, loads with
`torch.load(weights_only=True)`, written atomically):

    config, model      the backbone (ViTConfig, state dict), as in a pretraining checkpoint, so
                       `protloc embed --weights MODEL` embeds with it (its view settings: the
                       views' size, normalize, dataset_stats and pool). Present when the
                       classifier was trained from images (fine-tuned, or frozen).
    classifier
      head             the head's state dict (feature standardization mean/std included)
      head_kind        linear | mlp
      dim              the embedding width the head takes
      classes          class names, in output order
      multilabel       a sigmoid per class (predicted at >= 0.5) instead of a softmax
      views            the view record (protloc.data.ViewOptions.to_record: size, normalize,
                       dataset_stats, pool, tiles, cells, channels, ...): predict's defaults
                       (prediction_view; the masks of cells excepted)
      backbone         the backbone the head was trained on (for a fine-tuned one: its start):
                       {"included": true, "fine_tuned", "weights", "sha256", ...}, or for a head
                       trained on an embeddings file, from the file's meta: {"included": false,
                       "weights": absolute path or "random", "sha256", "seed", "config"}
      finetune         the training settings (protloc.finetune.FinetuneConfig)
      trained_on       labels file and row count, and the fit's training and validation rows,
                       epochs (best, run) or, for the linear probe, its chosen C
      cv               the cross-validated macro F1 (mean, std, runs), when one ran

A head without its backbone needs it at prediction time: `--backbone CKPT`, or the file at the
stored path; either must have the stored SHA-256. A random backbone is rebuilt from its config
and seed, as `protloc embed --weights random` built it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from protloc.checkpoint import (FORMAT, VERSION, file_sha256, load_checkpoint, load_weights, model_from_checkpoint,
                                save_checkpoint)
from protloc.data import ViewOptions
from protloc.errors import ProtlocError
from protloc.head import Head, probabilities
from protloc.folds import predict
from protloc.model import ViTConfig, VisionTransformer
from protloc.output import atomic_path

log = logging.getLogger(__name__)

def backbone_reference(meta: dict) -> dict:
    """What an embeddings file's meta says about the backbone that made it (for a head trained
    on the file); the path made absolute against the directory embed ran in."""
    weights = meta.get("weights")
    if weights not in (None, "random"):
        weights = os.path.normpath(os.path.join(meta.get("cwd") or os.getcwd(), weights))
    return {"included": False, "weights": weights, "sha256": meta.get("sha256"), "seed": meta.get("seed"),
            "config": meta.get("config")}


def save_classifier(path, head: Head, *, classes: list[str], multilabel: bool, views: dict, backbone_ref: dict,
                    finetune: dict, trained_on: dict, cv: dict | None = None,
                    backbone: VisionTransformer | None = None) -> None:
    """Write MODEL atomically. `views`: the view record the head was trained with (ViewOptions.to_record,
    or protloc.data.view_record of an embeddings file's meta). With `backbone`, its weights go in as the
    checkpoint's model, its config recording that view (so embed views images the same way)."""
    payload = {"head": {k: v.detach().cpu() for k, v in head.state_dict().items()}, "head_kind": head.kind,
               "dim": int(head.mean.numel()), "classes": list(classes), "multilabel": bool(multilabel),
               "views": views,
               "backbone": {**backbone_ref, "included": backbone is not None,
                            "fine_tuned": not finetune.get("freeze", True)},
               "finetune": finetune, "trained_on": trained_on, "cv": cv}
    if backbone is not None:
        config = dataclasses.replace(backbone.config, normalize=views.get("normalize") or backbone.config.normalize,
                                     dataset_stats=views.get("dataset_stats"), view_size=views.get("size"),
                                     pool=views.get("pool") or backbone.config.pool)
        save_checkpoint(path, config, backbone.state_dict(), classifier=payload)
        return
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, "classifier": payload}, tmp)


@dataclass
class Classifier:
    head: Head
    classes: list[str]
    multilabel: bool
    views: dict
    backbone_ref: dict
    checkpoint: dict  # the whole file (the backbone's weights when included)
    source: str

    @property
    def dim(self) -> int:
        return int(self.head.mean.numel())

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(n, classes) probabilities of embedding rows x (n, dim)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ProtlocError(f"{self.source}: the head takes {self.dim}-d embeddings, got shape {x.shape}")
        with torch.no_grad():
            return probabilities(self.head(torch.from_numpy(x)), self.multilabel)

    def predicted(self, probs: np.ndarray) -> list[str]:
        """Per row: the predicted class, or the `;`-joined classes (multi-label)."""
        return [";".join(self.classes[j] for j in np.flatnonzero(row)) for row in predict(probs, self.multilabel)]


def load_classifier(path) -> Classifier:
    ckpt = load_checkpoint(path)
    c = ckpt.get("classifier")
    if not isinstance(c, dict):
        raise ProtlocError(f"{path}: not a classifier (a backbone checkpoint?): make one with `protloc finetune`")
    try:
        head = Head(c["dim"], len(c["classes"]), c["head_kind"])
        load_weights(head, c["head"], f"{path} (head)")
    except (KeyError, TypeError, ValueError) as e:
        raise ProtlocError(f"{path}: classifier entry is unusable ({e})") from None
    return Classifier(head.eval(), list(c["classes"]), bool(c["multilabel"]), dict(c["views"]), dict(c["backbone"]),
                      ckpt, str(path))


def resolve_backbone(clf: Classifier, backbone_path=None, model_channels=None) -> tuple[VisionTransformer, dict]:
    """The backbone whose embeddings the head takes, and meta describing it (as embed's).
    `model_channels` names a foreign backbone's input channels (as at training)."""
    ref, src = clf.backbone_ref, clf.source
    if ref.get("included"):
        if backbone_path is not None:
            raise ProtlocError(f"{src}: holds its own backbone; --backbone is for heads trained on embeddings files")
        model = VisionTransformer(ViTConfig.from_dict(clf.checkpoint["config"]))
        load_weights(model, clf.checkpoint["model"], src)
        meta = {"weights": src, "sha256": file_sha256(src)}
    elif backbone_path is None and ref.get("weights") == "random":
        torch.manual_seed(ref["seed"])  # as protloc.embed.load_backbone built it
        model = VisionTransformer(ViTConfig.from_dict(ref["config"]))
        meta = {"weights": "random", "seed": ref["seed"]}
    else:
        path = backbone_path or ref.get("weights")
        want = ref.get("sha256")
        if path is None:
            raise ProtlocError(f"{src}: trained on embeddings that name no backbone (a bare .npy): "
                               "pass --backbone CKPT, the checkpoint that made them")
        if not os.path.isfile(path):
            raise ProtlocError(f"{src}: needs the backbone {path} (sha256 {str(want)[:12]}...) that made its training "
                               "embeddings; it is missing: pass --backbone CKPT")
        got = file_sha256(path)
        if not want:
            log.warning("%s: cannot check --backbone %s: the training embeddings recorded no checksum", src, path)
        elif got != want:
            raise ProtlocError(f"{path}: not the backbone {src} was trained on (sha256 {got[:12]}..., "
                               f"expected {want[:12]}...)")
        model, _ = model_from_checkpoint(path, model_channels)
        meta = {"weights": str(path), "sha256": got}
    if model.dim != clf.dim:
        raise ProtlocError(f"{src}: the head takes {clf.dim}-d embeddings, the backbone makes {model.dim}-d ones")
    return model, {**meta, "config": model.config.to_dict()}


def prediction_view(clf: Classifier, given: dict, backbone_path=None) -> tuple[VisionTransformer, ViewOptions, dict]:
    """The backbone and its meta (resolve_backbone) and the view with which predict embeds images for `clf`: the
    view recorded in MODEL (what it does not record, as the backbone records it), each ViewOptions
    field in `given` (the flags given) instead. The masks of cells belong to the data and are never
    inherited: with new ones a MODEL's tiles give way; without any, a MODEL trained on cells
    classifies whole images (with a warning)."""
    recorded = ViewOptions.from_record(clf.views, clf.source)
    model, meta = resolve_backbone(clf, backbone_path, given.get("model_channels", recorded.model_channels))
    recorded = ViewOptions.from_record(clf.views, clf.source, model.config)
    view = dataclasses.replace(recorded, cells=None)
    if given.get("cells") and "tile" not in given:
        view = dataclasses.replace(view, tile=None, stride=None)
    if not given.get("cells") and recorded.cells:
        log.warning("%s was trained on single cells (--cells %s); without --cells whole images are classified",
                    clf.source, recorded.cells)
        view = dataclasses.replace(view, aggregate=None)
    return model, dataclasses.replace(view, **given), meta


def check_embeddings_backbone(clf: Classifier, meta: dict, source: str) -> None:
    """Embeddings (their file's `meta`, named `source`) must come from the backbone the head takes:
    the MODEL's own (`protloc embed --weights MODEL`), or for a frozen one the backbone it was
    trained on. A file that records no backbone (a bare .npy, another tool's AnnData) is trusted.
    Raises ProtlocError naming the file and the backbone to embed with."""
    ref = clf.backbone_ref
    if ref.get("fine_tuned"):
        same = meta.get("sha256") == file_sha256(clf.source)
    elif meta.get("weights") == "random":
        same = (ref.get("weights") == "random" and ref.get("seed") == meta.get("seed")
                and ref.get("config") == meta.get("config"))
    elif meta.get("sha256"):
        same = meta["sha256"] in {ref.get("sha256")} | ({file_sha256(clf.source)} if ref.get("included") else set())
    else:
        return
    if not same:
        raise ProtlocError(f"{source}: made by another backbone ({meta.get('weights')}) than the one {clf.source} "
                           f"takes; embed with --weights {clf.source}, or predict from the images")


def tsv_header(classes: list[str]) -> str:
    return "\t".join(["id", "predicted", *classes]) + "\n"


def tsv_rows(ids: list[str], predicted: list[str], probs: np.ndarray) -> str:
    """One line per row: id, predicted class(es), one probability per class (6 decimals)."""
    return "".join("\t".join([i, p, *(f"{v:.6f}" for v in row)]) + "\n" for i, p, row in zip(ids, predicted, probs))
