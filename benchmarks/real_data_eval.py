"""Do protloc's self-supervised features beat random weights and raw pixels on real cells?

    python benchmarks/real_data_eval.py [--sets synth,yeast,hpa_cells,hpa_dictionary] [--recipe small]
                                        [--steps N] [--out benchmarks/results/real_data_eval_cpu-2core.txt]
    python benchmarks/real_data_eval.py --sets synth --synth demo/cells --checkpoint demo/dino.pt  # make demo

One table. For each labelled real set in ../shared/data, and for protloc's synthetic cells, three
kinds of features of the same views, scored on the same folds:

    raw         the view's pixels as stored, resized to 16 x 16 per channel, each feature standardized
                over the set (the baseline any learned feature must beat)
    random      the recipe's ViT at initialization, embedded with the recipe's view
    pretrained  the same ViT after DINO pretraining with the recipe on the set's own images (no
                labels), from that initialization: 1200 steps (600 for the two HPA sets, whose
                views cost more to read), so that each fits 15 minutes on 2 CPU cores; its
                minutes are reported

Each is scored by protloc's weighted k-NN (k = 5, 10, 20) and by the linear probe of `finetune
--freeze`: macro F1 of the pooled out-of-fold predictions, and per fold mean ± std (5 folds).
Folds are grouped wherever the set allows (a group never on both sides of a split):

    synth           `protloc synth` (320 fields of 96 px, 80 proteins, 10 classes): grouped by protein
    yeast           1,131 real 64-px yeast cells (GFP protein, RFP reference), mitochondria vs
                    cytosol; each of its 3 genes has one class, so grouped folds could not test a
                    class while training on it: stratified folds, not grouped
    hpa_cells       62 real 128-px HPA cells (nucleus, protein, microtubules), 3 genes of one class
                    each: stratified folds, not grouped
    hpa_dictionary  82 real 820-px HPA fields of 28 classes, cut into 256-px tiles seen at 64 px;
                    grouped by field (a field's tiles on one side); the class with one field cannot
                    be measured and is left out of scoring (protloc.folds)

The recipe's settings are used as they are, except the crop scale of hpa_dictionary's pretraining:
its views are tiles of 8 % of a field, so its crops are drawn at the tiles' scale, not of whole
fields (a matter of the view's geometry, set before any result was seen).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from table import Table  # benchmarks/table.py

from protloc.checkpoint import model_from_checkpoint
from protloc.crossval import cross_validate as cross_validate_head, plan, summarize
from protloc.data import ViewOptions, loader, resize, usable
from protloc.dataset_stats import DatasetStats
from protloc.finetune import FinetuneConfig, FrozenTask, embed_all, labelled_rows
from protloc.folds import scored_classes
from protloc.knn import cross_validate as cross_validate_knn
from protloc.labels import match_rows, read_labels
from protloc.pretrain import Trainer, build_models, recorded_config
from protloc.recipes import RECIPES, changes, differences, resolve
from protloc.sources import discover
from protloc.synth import write_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KS = (5, 10, 20)
FOLDS = 5
RAW_SIZE = 16


@dataclass
class EvalSet:
    name: str
    data: list[str]  # DATA arguments of the images
    labels: str
    id_column: str | None = None
    label_column: str = "label"
    group_column: str | None = None  # None: stratified folds, not grouped
    channel_suffixes: list[str] | None = None
    tile: int | None = None  # views: tiles of this size, else whole images
    steps: int = 1200  # pretraining steps: what fits 15 minutes on 2 CPU cores
    pretrain: dict = field(default_factory=dict)  # settings beside the recipe's (the view's geometry)


def real_sets(synth_dir: str) -> dict[str, EvalSet]:
    return {
        "synth": EvalSet("synth", [synth_dir], os.path.join(synth_dir, "labels.csv"), group_column="group"),
        "yeast": EvalSet("yeast", [str(SHARED / "yeast_crops")], str(SHARED / "yeast_crops" / "labels.csv"),
                         id_column="protein_file", label_column="control_localization",
                         channel_suffixes=["gfp", "rfp"]),
        "hpa_cells": EvalSet("hpa_cells", [str(SHARED / "hpa_cells")], str(SHARED / "hpa_cells" / "labels.csv"),
                             id_column="protein_file", label_column="hpa_main_location",
                             channel_suffixes=["blue", "green", "red"], steps=600),
        # a 256-px tile is 10 % of an 820-px field: crops of 4-16 % of the field, at the tiles' scale
        "hpa_dictionary": EvalSet("hpa_dictionary", [str(SHARED / "hpa_dictionary" / "images")],
                                  str(SHARED / "hpa_dictionary" / "labels.csv"), group_column="group", tile=256,
                                  steps=600, pretrain={"global_scale": (0.04, 0.16)}),
    }


def matched_rows(ids: list[str], s: EvalSet):
    labels = read_labels(s.labels, id_column=s.id_column, label_column=s.label_column, group_column=s.group_column)
    return match_rows(ids, labels, channel_suffixes=s.channel_suffixes)


def raw_pixels(sources, s: EvalSet, workers: int) -> tuple[list[str], np.ndarray]:
    """Each view's stored pixels resized to RAW_SIZE x RAW_SIZE per channel, flattened, then each
    feature standardized over the set: (ids, (N, C * RAW_SIZE**2))."""
    ids, rows = [], []
    for item in loader(sources, ViewOptions(normalize="none", tile=s.tile), workers):
        if usable(item, "fail"):
            ids.append(item.id)
            rows.append(resize(item.pixels.astype(np.float32), RAW_SIZE).ravel())
    x = np.stack(rows)
    return ids, (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)


def scores(ids: list[str], x: np.ndarray, s: EvalSet) -> dict:
    """k-NN per k and the linear probe: (pooled macro F1, per-fold mean, per-fold std)."""
    matched = matched_rows(ids, s)
    out = {f"knn{r.k}": (r.f1_macro_pooled, r.f1_macro_mean, r.f1_macro_std)
           for r in cross_validate_knn(x, matched, ks=KS, folds=FOLDS)}
    rows = labelled_rows(matched)
    scored = scored_classes(rows.y, rows.groups, rows.classes, s.labels, FOLDS, matched.groups is not None)
    task = FrozenTask(x[matched.rows], rows, FinetuneConfig(freeze=True, head="linear"))
    runs, pooled = cross_validate_head(task, rows.y, rows.multilabel, plan(rows.y, rows.groups, rows.multilabel,
                                                                           FOLDS, 1, 0, 1.0, 0.0), scored=scored)
    report = summarize(runs, pooled, rows.y, rows.classes, rows.multilabel, scored)
    out["probe"] = (report["macro_f1_pooled"]["mean"], report["macro_f1"]["mean"], report["macro_f1"]["std"])
    return out


def starting_point(s: EvalSet, sources, recipe: str, steps: int | None, checkpoint: str | None, workers: int,
                   tmp: str):
    """(initial backbone, pretrained backbone or a Trainer to produce it, the view, pool).

    With `checkpoint` (a `protloc pretrain` run on the set), its teacher is the pretrained backbone and
    its initialization is rebuilt from its recorded settings (build_models seeds its first draw)."""
    if checkpoint is None:
        cfg = resolve(recipe, {"steps": steps or s.steps, **s.pretrain})
        trainer = Trainer(sources, cfg, os.path.join(tmp, f"{s.name}.pt"), workers=workers, checkpoint_every=10**9)
        initial, pretrained, stats = copy.deepcopy(trainer.teacher.backbone), trainer, trainer.view.dataset_stats
    else:
        pretrained, ckpt = model_from_checkpoint(checkpoint)
        cfg = recorded_config(checkpoint, ckpt)
        recorded = pretrained.config.dataset_stats
        stats = DatasetStats.from_dict(recorded, checkpoint) if recorded else None
        initial = build_models(cfg, pretrained.config.channels, stats)[0].backbone
    opts = ViewOptions(size=cfg.embed_size, tile=s.tile, normalize=cfg.normalize, dataset_stats=stats,
                       pool=cfg.embed_pool)
    return initial, pretrained, opts, cfg


def evaluate(s: EvalSet, recipe: str, steps: int | None, checkpoint: str | None, workers: int, table: Table,
             tmp: str) -> None:
    sources = discover(s.data, channel_suffixes=s.channel_suffixes)
    initial, pretrained, opts, cfg = starting_point(s, sources, recipe, steps, checkpoint, workers, tmp)
    rows = {"raw": scores(*raw_pixels(sources, s, workers), s),
            "random": scores(*embed_all(initial, sources, opts, workers=workers), s)}
    if isinstance(pretrained, Trainer):
        t0 = time.perf_counter()
        pretrained.run()
        note = f"{cfg.steps} steps, {(time.perf_counter() - t0) / 60:.1f} min"
        pretrained = pretrained.teacher.backbone
    else:
        note = f"{cfg.steps} steps: {checkpoint}"
    rows["pretrained"] = scores(*embed_all(pretrained, sources, opts, workers=workers), s)
    for kind, row in rows.items():
        cells = "  ".join(f"{p:.3f} {m:.3f}±{sd:.3f}" for p, m, sd in row.values())
        table.add(f"{s.name:<15} {kind:<11} {cells}  {note if kind == 'pretrained' else ''}".rstrip())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="synth,yeast,hpa_cells,hpa_dictionary")
    ap.add_argument("--recipe", default="small")
    ap.add_argument("--steps", type=int, help="pretraining steps of every set (default: each set's own, "
                    "which fit 15 minutes on 2 CPU cores)")
    ap.add_argument("--checkpoint", metavar="CKPT", help="score this `protloc pretrain` run on the one set given "
                    "instead of pretraining (its recorded settings, its initialization rebuilt for random)")
    ap.add_argument("--synth", metavar="DIR", help="the synth set: this `protloc synth DIR --n 320 --size 96 --seed 0` "
                    "folder (default: one written to a temporary folder)")
    ap.add_argument("--workers", type=int, default=1, help="loader processes")
    ap.add_argument("--out", help="also write the table to this file, row by row")
    args = ap.parse_args()
    names = args.sets.split(",")
    if args.checkpoint and len(names) != 1:
        ap.error("--checkpoint scores one set: give --sets NAME")
    if args.checkpoint:  # the run's settings where they differ from its recipe's (steps aside)
        run = recorded_config(args.checkpoint)
        recipe = run.recipe
        changed = {k: v for k, v in differences(run, RECIPES[recipe]).items() if k != "steps"}
        what = f"recipe {recipe}" + "".join(f", {k}={v}" for k, v in changed.items()) + f": {args.checkpoint}"
    else:
        recipe = args.recipe
        what = (f"recipe {recipe} (the reference's except "
                + ", ".join(f"{k}={v}" for k, v in changes(recipe).items()) + ")")
    table = Table(args.out)
    table.add(f"# protloc real-data evaluation: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads; {what}")
    table.add(f"# macro F1: pooled out-of-fold, and per fold mean±std ({FOLDS} folds); k-NN (protloc knn, T 0.07) "
              "and the linear probe (finetune --freeze)")
    table.add(f"{'set':<15} {'features':<11} " + "  ".join(f"{c:<19}" for c in [f"k-NN k={k}" for k in KS] + ["probe"]))
    with tempfile.TemporaryDirectory() as tmp:
        synth_dir = args.synth or os.path.join(tmp, "synth")
        sets = real_sets(synth_dir)
        for name in names:
            s = sets[name]
            if name == "synth" and not args.synth:
                write_dataset(synth_dir, n=320, size=96, seed=0)
            elif not Path(s.labels).is_file():
                table.add(f"{name:<15} skipped: {s.labels} is missing")
                continue
            torch.manual_seed(0)
            evaluate(s, recipe, args.steps, args.checkpoint, args.workers, table, tmp)


if __name__ == "__main__":
    main()
