"""Does a short DINO pretraining beat a random-init ViT? k-NN macro F1 before and after.

    python benchmarks/pretrain_evidence.py [--steps 570] [--data synth,yeast]

For each data set: the k-NN macro F1 (k = 10 and 20, 5-fold cross-validation) of the
random-init backbone, then --steps of pretraining (570 take 4.3-4.8 minutes on this 2-core CPU;
the time is reported), then the same evaluation of the pretrained teacher backbone, which
started from those random weights. The recipe is `make demo`'s, cut from 600 steps to 570 to fit five minutes.

    synth  `protloc synth` fields (--n 320, 96 x 96, nucleus + protein, 10 classes); folds are
           grouped by protein, so no protein is on both sides
    yeast  ../shared/data/yeast_crops: 1,131 real 64 x 64 cells (GFP protein + RFP reference),
           mitochondria vs cytosol. Its 3 genes each have one class, so grouped folds would test
           classes never seen in training: folds are stratified but not grouped.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from protloc.augment import MultiCropConfig
from protloc.data import ViewOptions
from protloc.embed import embed
from protloc.knn import cross_validate
from protloc.labels import match_rows, read_labels
from protloc.pretrain import PretrainConfig, Trainer
from protloc.sources import discover
from protloc.synth import write_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def knn_f1(model, sources, labels, size, suffixes, grouped):
    ids, rows = [], []
    for batch_ids, vectors in embed(model, sources, ViewOptions(size=size), workers=2):
        ids += batch_ids
        rows.append(vectors)
    matched = match_rows(ids, labels, channel_suffixes=suffixes)
    if not grouped:
        matched.groups = None
    results = cross_validate(np.concatenate(rows), matched, ks=(10, 20), folds=5)
    return {r.k: (r.f1_macro_mean, r.f1_macro_std) for r in results}


def run(name, sources, labels, args, size, suffixes=None, grouped=True):
    crops = MultiCropConfig(global_size=size, local_size=size // 2, local_crops=args.local_crops)
    base = dict(arch=args.arch, patch=args.patch, depth=args.depth, out_dim=args.out_dim, batch_size=args.batch_size,
                lr=args.lr, momentum_teacher=args.momentum, warmup_epochs=args.warmup_epochs, warmup_teacher_temp_epochs=0.0,
                freeze_last_layer=0.0, use_bn_in_head=not args.no_bn_in_head, crops=crops)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(sources, PretrainConfig(**base, steps=args.steps), os.path.join(tmp, "dino.pt"),
                          workers=args.workers, checkpoint_every=10**9)
        random_f1 = knn_f1(trainer.teacher.backbone, sources, labels, size, suffixes, grouped)  # the starting point
        t0 = time.perf_counter()
        trainer.run()
        minutes = (time.perf_counter() - t0) / 60
        dino_f1 = knn_f1(trainer.teacher.backbone, sources, labels, size, suffixes, grouped)
    for k in (10, 20):
        print(f"{name:<6} {k:>3} {random_f1[k][0]:.3f} ± {random_f1[k][1]:.3f}   {dino_f1[k][0]:.3f} ± {dino_f1[k][1]:.3f}"
              f"   {args.steps:>5} steps, {minutes:.1f} min", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=570, help="pretraining steps per data set")
    ap.add_argument("--data", default="synth,yeast")
    ap.add_argument("--n", type=int, default=320, help="synthetic fields")
    ap.add_argument("--arch", default="vit_tiny")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--out-dim", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.0016, help="at a batch of 256 (x batch / 256)")
    ap.add_argument("--warmup-epochs", type=float, default=10.0)
    ap.add_argument("--momentum", type=float, default=0.99)
    ap.add_argument("--local-crops", type=int, default=0, help="0: a short CPU run learns faster without them")
    ap.add_argument("--no-bn-in-head", action="store_true", help="DINO's ViT default head, without batch norm")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {args.arch}/{args.patch} depth {args.depth}, out_dim {args.out_dim}, batch {args.batch_size}, "
          f"lr {args.lr} (warm-up {args.warmup_epochs} epochs), teacher momentum {args.momentum}, "
          f"2 global + {args.local_crops} local crops, batch norm in head: {not args.no_bn_in_head}; "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'data':<6} {'k':>3} {'random-init F1':<16} {'pretrained F1':<16} pretraining")
    for name in args.data.split(","):
        if name == "synth":
            with tempfile.TemporaryDirectory() as tmp:
                write_dataset(tmp, n=args.n, size=96, seed=0)
                run("synth", discover([tmp]), read_labels(os.path.join(tmp, "labels.csv")), args, size=64)
        elif name == "yeast":
            folder = SHARED / "yeast_crops"
            if not folder.is_dir():
                print(f"yeast: {folder} is missing, skipped")
                continue
            labels = read_labels(folder / "labels.csv", id_column="protein_file",
                                 label_column="control_localization", group_column="gene")
            run("yeast", discover([str(folder)], channel_suffixes=["gfp", "rfp"]), labels, args, size=64,
                suffixes=["gfp", "rfp"], grouped=False)


if __name__ == "__main__":
    main()
