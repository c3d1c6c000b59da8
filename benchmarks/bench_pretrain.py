"""Pretraining step throughput: packed multi-crop (one transformer pass) vs one pass per crop size.

    python benchmarks/bench_pretrain.py [--archs vit_tiny,vit_small] [--batch-size 8] [--steps 3]
                                        [--device cuda --backends torch,triton] [--out FILE]

DINO's default crops (2 x 224 + 8 x 96, patch 16) on `protloc synth` fields (256 x 256,
nucleus + protein). A step is everything: decoding (in the main process), multi-crop,
teacher and student forward, loss, backward, AdamW, EMA. The first step is a warm-up and not
timed. float32 on CPU; bf16 autocast with --device cuda, where --backends compares the Triton
kernels (PROTLOC_BACKEND=triton) with the torch path end to end.
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
    ap.add_argument("--backends", default="torch", help="PROTLOC_BACKEND values to compare, e.g. torch,triton")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    lines = [f"# protloc pretrain step throughput: {platform.machine()}, {device}, torch {torch.__version__}",
             f"# batch {args.batch_size}, crops 2 x {args.global_size} + {args.local_crops} x {args.local_size}, "
             f"patch 16, out_dim {args.out_dim}, {args.steps} timed steps after 1 warm-up",
             f"{'arch':<10} {'backend':<8} {'packed img/s':>13} {'per-size img/s':>15} {'speed-up':>9}"]
    print("\n".join(lines), flush=True)
    packed_by_backend = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, n=args.batch_size * (args.steps + 1), size=256, seed=0)
        sources = discover([tmp])
        for arch in args.archs.split(","):
            for backend in args.backends.split(","):
                os.environ["PROTLOC_BACKEND"] = backend
                packed = images_per_second(sources, arch, True, args, os.path.join(tmp, "p.pt"))
                per_size = images_per_second(sources, arch, False, args, os.path.join(tmp, "s.pt"))
                packed_by_backend[arch, backend] = packed
                lines.append(f"{arch:<10} {backend:<8} {packed:>13.2f} {per_size:>15.2f} {packed / per_size:>8.2f}x")
                print(lines[-1], flush=True)
            if (arch, "triton") in packed_by_backend and (arch, "torch") in packed_by_backend:
                ratio = packed_by_backend[arch, "triton"] / packed_by_backend[arch, "torch"]
                lines.append(f"{arch:<10} packed, triton over torch: {ratio:.2f}x")
                print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
