"""Embedding speed on this machine, side by side in one run: `protloc embed`'s loop on TIFFs, the
model alone on ready batches, and the float32 matrix-product rate of the machine as the bound.

    python benchmarks/bench_embed.py [--n 128] [--archs vit_tiny,vit_small] [--size 224] [--workers 0,2]
                                     [--field 256] [--rounds 3] [--threads 2] [--device cpu] [--out FILE]

Data: `protloc synth` fields (--field px, nucleus + protein, uint16 OME-TIFF) resized to --size.
Each round, interleaved (medians over the rounds, so a shared machine slows all alike):
  model         VisionTransformer.embed on the --n images as ready uint16 batches (what embed's
                loop hands the model), inference mode: the model alone
  embed         protloc.embed.embed over the files with each --workers count: decoding, resizing,
                normalization, batching, the model; "waiting" is its share of wall time spent
                waiting for decoded batches (the rest is the model's)
  matmul bound  the model's FLOPs per image (torch's FlopCounterMode) at the float32 matrix-product
                rate measured at the model's largest product shapes in the same round
float32 on the CPU (bf16 autocast with --device cuda). One warm-up batch is excluded.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from protloc.data import ViewOptions, batches, loader, model_view
from protloc.device import autocast
from protloc.embed import EmbedStats, embed
from protloc.model import ViTConfig, VisionTransformer
from protloc.sources import discover
from protloc.synth import write_dataset

from bench_pretrain import matmul_rate  # benchmarks/bench_pretrain.py
from table import Table  # benchmarks/table.py


def ready_batches(model, sources, opts, batch_size):
    """The batches embed's loop hands the model: (pixels, scale, shift, channel names)."""
    stream = batches(loader(sources, model_view(opts, model.config), 0), batch_size)
    return [(b.pixels, b.scale, b.shift, b.channel_names) for b in stream]


def model_alone(model, ready, device) -> float:
    """Seconds to embed the ready batches."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(torch.device(device)):
        for pixels, scale, shift, names in ready:
            model.embed(pixels.to(device), scale.to(device), shift.to(device), names).float().cpu()
    sync()
    return time.perf_counter() - start


def embed_files(model, sources, opts, workers, batch_size, device) -> tuple[float, float]:
    """(seconds, seconds waiting for data) of embed over the files."""
    stats = EmbedStats()
    start = time.perf_counter()
    for _ in embed(model, sources, opts, batch_size=batch_size, device=device, workers=workers, stats=stats):
        pass
    return time.perf_counter() - start, stats.data_wait_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="images per measurement")
    ap.add_argument("--archs", default="vit_tiny,vit_small")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--field", type=int, default=256)
    ap.add_argument("--workers", default="0,2", help="loader worker counts to compare")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(args.out)
    table.add(f"# protloc embed speed: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), device {args.device}; load average {os.getloadavg()[0]:.2f} "
              "at the start")
    table.add(f"# {args.n} synthetic {args.field}x{args.field} 2-channel uint16 fields resized to {args.size}, "
              f"patch {args.patch}, batch {args.batch_size}; median of {args.rounds} interleaved rounds")
    table.add(f"{'arch':<10} {'what':<22} {'img/s':>7} {'vs model':>9} {'of bound':>9} {'waiting for data':>17}")
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, n=args.n, size=args.field, channels=["nucleus", "protein"], seed=0)
        sources = discover([tmp])
        opts = ViewOptions(size=args.size, normalize="image")
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            model = VisionTransformer(ViTConfig(arch=arch, patch=args.patch)).eval().to(args.device)
            ready = ready_batches(model, sources, opts, args.batch_size)
            with torch.inference_mode(), FlopCounterMode(display=False) as flops:
                model.embed(*ready[0][:3], ready[0][3])
            gflop = flops.get_total_flops() / 1e9 / len(ready[0][0])  # per image
            tokens, dim = args.batch_size * ((args.size // args.patch) ** 2 + 1), model.dim
            shapes = [(tokens, dim, 3 * dim), (tokens, dim, 4 * dim), (tokens, 4 * dim, dim), (tokens, dim, dim)]
            model_alone(model, ready[:1], args.device)  # warm-up
            rates, alone, files = [], [], {w: [] for w in workers}
            for _ in range(args.rounds):
                rates.append(matmul_rate(shapes, torch.device(args.device)))
                alone.append(args.n / model_alone(model, ready, args.device))
                for w in workers:
                    wall, wait = embed_files(model, sources, opts, w, args.batch_size, args.device)
                    files[w].append((args.n / wall, wait / wall))
            rate, model_rate = statistics.median(rates), statistics.median(alone)
            bound = rate / gflop  # images/s at the matrix-product rate
            table.add(f"{arch:<10} {'model alone':<22} {model_rate:>7.1f} {1:>8.2f}x {model_rate / bound:>9.2f} "
                      f"{'-':>17}")
            for w in workers:
                r = statistics.median(x for x, _ in files[w])
                waiting = statistics.median(y for _, y in files[w])
                table.add(f"{arch:<10} {f'embed, {w} workers':<22} {r:>7.1f} {r / model_rate:>8.2f}x "
                          f"{r / bound:>9.2f} {waiting:>16.0%}")
            table.add(f"# {arch}: {gflop:.2f} GFLOP per image; float32 matrix products at {rate:.0f} GFLOP/s: "
                      f"bound {bound:.1f} img/s")


if __name__ == "__main__":
    main()
