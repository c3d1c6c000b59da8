"""Frozen-head and fine-tuned macro F1 of a backbone pretrained with protloc, next to random init.

    python benchmarks/finetune_evidence.py [--steps 600] [--seeds 3] [--ft-seeds 2] [--ft-epochs 5] [--threads 1]

On ../shared/data/yeast_crops (1,131 real 64 x 64 yeast cells, GFP-tagged protein + RFP cytosolic
reference; mitochondria 782, cytosol 349):

1. a backbone is pretrained with DINO for --steps steps by `--recipe small` (protloc/recipes.py:
   vit_tiny/8 with 4 blocks, dataset normalization, KoLeo; 600 steps take about 6 minutes on a
   2-core CPU); the random-init backbone is the same network before those steps; both view the
   cells as the recipe records (64 px, the data set's normalization);
2. both backbones are evaluated on the same folds with protloc's own code and the defaults of
   `protloc finetune`: k-NN (k = 10, DINO's weighted vote, as `protloc knn`), the linear probe on
   frozen embeddings (logistic regression, C by inner cross-validation: the --freeze default), and
   full fine-tuning of backbone and head (head lr 1e-3, backbone x 0.1, the pretraining
   augmentations without local crops, --ft-epochs epochs of one pass each (--min-steps 0), the
   best epoch on a 10 % validation split: the fine-tuning defaults except the step count, cut so
   the script fits ~20 minutes on 2 cores).

Folds are stratified but not grouped: the 3 genes each have one class, so grouped folds would test
a class never seen in training (as benchmarks/real_data_eval.py). Macro F1 is mean ± std
(population) over folds x seeds. The header records the CPU load, since the machine may be shared.
"""

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from protloc.crossval import cross_validate, plan
from protloc.data import ViewOptions
from protloc.finetune import FinetuneConfig, FrozenTask, FullTask, embed_all, labelled_rows
from protloc.knn import cross_validate as knn_cross_validate
from protloc.labels import match_rows, read_labels
from protloc.pretrain import Trainer
from protloc.recipes import resolve
from protloc.sources import discover

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SUFFIXES = ["gfp", "rfp"]
SIZE = 64


def yeast():
    folder = SHARED / "yeast_crops"
    labels = read_labels(folder / "labels.csv", id_column="protein_file", label_column="control_localization",
                         group_column="gene")
    sources = discover([str(folder)], channel_suffixes=SUFFIXES)
    matched = match_rows([s.id for s in sources], labels, channel_suffixes=SUFFIXES)
    matched.groups = None  # stratified, not grouped (see above)
    return [sources[r] for r in matched.rows], labelled_rows(matched), matched


def scores(runs) -> str:
    f1 = [r.macro_f1 for r in runs]
    return f"{np.mean(f1):.3f} ± {np.std(f1):.3f}"


def evaluate(name, backbone, view, sources, rows, matched, args):
    """k-NN, frozen linear head and full fine-tuning macro F1 of one backbone: {protocol: text}."""
    out, t0 = {}, time.perf_counter()
    ids, x = embed_all(backbone, sources, view, batch_size=64, workers=args.workers)
    assert ids == rows.ids
    knn = knn_cross_validate(x, matched, ks=(10,), folds=args.folds)[0]
    out["knn"] = f"{knn.f1_macro_mean:.3f} ± {knn.f1_macro_std:.3f}"
    frozen = FrozenTask(x, rows, FinetuneConfig(freeze=True, head="linear"))
    runs, _ = cross_validate(frozen, rows.y, False, plan(rows.y, None, False, args.folds, args.seeds, val_fraction=0.0))
    out["frozen"] = scores(runs)
    t1 = time.perf_counter()
    cfg = FinetuneConfig(freeze=False, epochs=args.ft_epochs, min_steps=0, batch_size=32, size=SIZE)
    full = FullTask(backbone, sources, rows, cfg, view, workers=args.workers)
    runs, _ = cross_validate(full, rows.y, False, plan(rows.y, None, False, args.folds, args.ft_seeds,
                                                       val_fraction=0.1))
    out["full"] = scores(runs)
    print(f"# {name}: k-NN and frozen head {t1 - t0:.0f} s, fine-tuning {len(runs)} fits "
          f"{(time.perf_counter() - t1) / 60:.1f} min; {os.getloadavg()[0]:.1f} load", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="DINO pretraining steps")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the frozen head's cross-validation")
    ap.add_argument("--ft-seeds", type=int, default=2, help="seeds of full fine-tuning")
    ap.add_argument("--ft-epochs", type=int, default=5, help="epochs of each full fine-tuning fit")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); on a busy shared machine 1 can be several times faster")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = SHARED / "yeast_crops"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing")
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"# {torch.get_num_threads()} CPU threads, torch {torch.__version__}; load average at start "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} (1, 5, 15 min)")
    sources, rows, matched = yeast()
    counts = dict(zip(rows.classes, rows.y.sum(0).tolist()))
    print(f"# yeast_crops: {len(rows.ids)} cells {counts}, {SIZE} x {SIZE}, gfp + rfp; {args.folds} stratified folds "
          "(not grouped: one class per gene)")

    cfg = resolve("small", {"steps": args.steps})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(sources, cfg, os.path.join(tmp, "dino.pt"), workers=args.workers, checkpoint_every=10**9)
        random_init = copy.deepcopy(trainer.teacher.backbone)  # the starting point of the pretraining
        view = ViewOptions(size=cfg.embed_size, normalize=cfg.normalize, dataset_stats=trainer.view.dataset_stats)
        t0 = time.perf_counter()
        trainer.run()
        minutes = (time.perf_counter() - t0) / 60
        pretrained = trainer.teacher.backbone
    print(f"# pretraining: --recipe small, {args.steps} DINO steps in {minutes:.1f} min; "
          f"{os.getloadavg()[0]:.1f} load", flush=True)

    results = {"random-init": evaluate("random-init", random_init, view, sources, rows, matched, args),
               f"pretrained ({args.steps} steps)":
                   evaluate("pretrained", pretrained, view, sources, rows, matched, args)}
    protocols = {"knn": f"k-NN, k = 10 ({args.folds} folds)",
                 "frozen": f"frozen linear head ({args.folds} folds x {args.seeds} seeds)",
                 "full": f"full fine-tuning, {args.ft_epochs} epochs ({args.folds} folds x {args.ft_seeds} seeds)"}
    width = max(map(len, protocols.values())) + 2
    print(f"{'macro F1':<{width}}" + "".join(f"{name:<24}" for name in results))
    for key, label in protocols.items():
        print(f"{label:<{width}}" + "".join(f"{r[key]:<24}" for r in results.values()))
    print(f"# total {(time.perf_counter() - start) / 60:.1f} min; load average at end "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
