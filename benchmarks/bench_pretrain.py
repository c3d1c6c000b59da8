"""Pretraining step throughput: packed multi-crop (one transformer pass) vs one pass per crop size.

    python benchmarks/bench_pretrain.py [--archs vit_tiny,vit_small] [--batch-size 8] [--steps 3]

DINO's default crops (2 x 224 + 8 x 96, patch 16) on `protloc synth` fields (256 x 256,
nucleus + protein). A step is everything: decoding (in the main process), multi-crop,
teacher and student forward, loss, backward, AdamW, EMA. The first step is a warm-up and not
timed. float32 on CPU; bf16 autocast with --device cuda.
"""

import argparse
import os
import platform
import tempfile
import time

import torch

from protloc.augment import MultiCropConfig
from protloc.distributed import World
from protloc.pretrain import PretrainConfig, Trainer
from protloc.sources import discover
from protloc.synth import write_dataset


def images_per_second(sources, arch, pack, args, out):
    cfg = PretrainConfig(arch=arch, patch=16, out_dim=args.out_dim, batch_size=args.batch_size,
                         steps=args.steps + 1, pack=pack,
                         crops=MultiCropConfig(global_size=args.global_size, local_size=args.local_size,
                                               local_crops=args.local_crops))
    trainer = Trainer(sources, cfg, out, world=World(device=torch.device(args.device)), workers=0,
                      checkpoint_every=10**9)
    batches = trainer.batches(cfg.steps)
    trainer.train_step(next(batches))  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for items in batches:
        trainer.train_step(items)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="vit_tiny,vit_small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"# protloc pretrain step throughput: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}")
    print(f"# batch {args.batch_size}, crops 2 x {args.global_size} + {args.local_crops} x {args.local_size}, "
          f"patch 16, out_dim {args.out_dim}, {args.steps} timed steps after 1 warm-up")
    print(f"{'arch':<10} {'packed img/s':>13} {'per-size img/s':>15} {'speed-up':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, n=args.batch_size * (args.steps + 1), size=256, seed=0)
        sources = discover([tmp])
        for arch in args.archs.split(","):
            packed = images_per_second(sources, arch, True, args, os.path.join(tmp, "p.pt"))
            per_size = images_per_second(sources, arch, False, args, os.path.join(tmp, "s.pt"))
            print(f"{arch:<10} {packed:>13.2f} {per_size:>15.2f} {packed / per_size:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
