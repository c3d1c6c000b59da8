"""Embedding throughput on this machine: images/s and the share of wall time spent waiting for data.

    python benchmarks/bench_embed.py [--n 256] [--archs vit_tiny,vit_small] [--size 224] [--workers 0,2]

Data: `protloc synth` fields (256 x 256, nucleus + protein, uint16 OME-TIFF) resized to --size.
The model runs in float32 on the CPU (or bf16 autocast on CUDA with --device cuda). A warm-up
batch is excluded from the timing.
"""

import argparse
import os
import platform
import tempfile
import time

import torch

from protloc.data import ViewOptions
from protloc.embed import EmbedStats, embed
from protloc.model import ViTConfig, VisionTransformer
from protloc.sources import discover
from protloc.synth import write_dataset


def run(model, sources, opts, workers, batch_size, device):
    list(embed(model, sources[:batch_size], opts, batch_size=batch_size, device=device, workers=0))  # warm-up
    stats = EmbedStats()
    start = time.perf_counter()
    for _ in embed(model, sources, opts, batch_size=batch_size, device=device, workers=workers, stats=stats):
        pass
    wall = time.perf_counter() - start
    return stats.images / wall, stats.data_wait_s / wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="images per measurement")
    ap.add_argument("--archs", default="vit_tiny,vit_small")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", default="0,2", help="loader worker counts to compare")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    print(f"# protloc embed throughput: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}")
    print(f"# {args.n} synthetic 256x256 2-channel uint16 fields resized to {args.size}, patch {args.patch}, "
          f"batch {args.batch_size}")
    print(f"{'arch':<10} {'workers':>7} {'images/s':>9} {'waiting for data':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, n=args.n, size=256, channels=["nucleus", "protein"], seed=0)
        sources = discover([tmp])
        opts = ViewOptions(size=args.size, normalize="image")
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            model = VisionTransformer(ViTConfig(arch=arch, patch=args.patch))
            for workers in (int(w) for w in args.workers.split(",")):
                rate, waiting = run(model, sources, opts, workers, args.batch_size, args.device)
                print(f"{arch:<10} {workers:>7} {rate:>9.1f} {waiting:>16.0%}", flush=True)


if __name__ == "__main__":
    main()
