"""Pretraining step throughput: packed multi-crop (one transformer pass) vs one pass per crop size,
end to end and the model's share alone.

    python benchmarks/bench_pretrain.py [--archs vit_tiny,vit_small] [--batch-size 8] [--steps 3]
                                        [--device cuda --backends torch,triton] [--out FILE]

DINO's default crops (2 x 224 + 8 x 96, patch 16) on `protloc synth` fields (256 x 256,
nucleus + protein). Two timings per row, each after one untimed warm-up step:
  step   the whole training step, Trainer.train_step: decoding (in the main process), multi-crop,
         teacher and student forward, loss, backward, AdamW, EMA;
  model  the model's share on ready crops: teacher and student forward, loss, backward, gradient
         clipping, AdamW, EMA, on the crops of one batch, made once before the timing.
Decoding and the Python multi-crop do not change with the backend, so the Triton kernels' gain
shows in the model column; the step column says what a user gets. float32 on CPU; bf16 autocast
with --device cuda, where --backends compares the Triton kernels (PROTLOC_BACKEND=triton) with the
torch path.
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

from table import Table  # benchmarks/table.py


def ready_crops(trainer, items):
    """The crops of one batch, as train_step makes them: (crops, names, n_crops, masks)."""
    images, names = trainer.images(items)
    crops, n_crops, masks = trainer.crops(images, names, seed=0)
    return crops, names, n_crops, masks


def model_step(trainer, crops, names, n_crops, masks):
    """Trainer.model_step on ready crops: forward, loss, backward, clipping, AdamW and EMA (schedules at step 0)."""
    trainer.model_step(crops, names, n_crops, masks, step=0)


def timed(device, steps, fn):
    """Seconds for `steps` calls of fn, the device's queue drained before and after."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return time.perf_counter() - start


def images_per_second(sources, arch, pack, args, out):
    """(end-to-end step, model step) images per second."""
    cfg = PretrainConfig(arch=arch, patch=16, out_dim=args.out_dim, batch_size=args.batch_size,
                         steps=args.steps + 1, pack=pack,
                         crops=MultiCropConfig(global_size=args.global_size, local_size=args.local_size,
                                               local_crops=args.local_crops))
    trainer = Trainer(sources, cfg, out, world=World(device=torch.device(args.device)), workers=0,
                      checkpoint_every=10**9)
    batches = trainer.batches(cfg.steps)
    first = next(batches)
    trainer.train_step(first)  # warm-up: compiles and autotunes the kernels at these shapes
    step_s = timed(args.device, args.steps, lambda: trainer.train_step(next(batches)))
    crops = ready_crops(trainer, first)
    model_step(trainer, *crops)  # warm-up
    model_s = timed(args.device, args.steps, lambda: model_step(trainer, *crops))
    images = args.steps * args.batch_size
    return images / step_s, images / model_s


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
    ap.add_argument("--out", help="also write the table to this file, row by row")
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    table = Table(args.out)
    table.add(f"# protloc pretrain step throughput: {platform.machine()}, {device}, torch {torch.__version__}")
    table.add(f"# batch {args.batch_size}, crops 2 x {args.global_size} + {args.local_crops} x {args.local_size}, "
         f"patch 16, out_dim {args.out_dim}, {args.steps} timed steps after 1 warm-up; images/s")
    table.add("# step: the whole train_step (decoding, multi-crop, model); model: forward, loss, backward, AdamW, EMA "
         "on ready crops")
    table.add(f"{'arch':<10} {'backend':<8} {'packed step':>12} {'per-size step':>14} {'packed model':>13} "
         f"{'per-size model':>15} {'model: packed/per-size':>23}")
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
                table.add(f"{arch:<10} {backend:<8} {packed[0]:>12.2f} {per_size[0]:>14.2f} {packed[1]:>13.2f} "
                     f"{per_size[1]:>15.2f} {packed[1] / per_size[1]:>22.2f}x")
            if (arch, "triton") in packed_by_backend and (arch, "torch") in packed_by_backend:
                step_k, model_k = packed_by_backend[arch, "triton"]
                step_t, model_t = packed_by_backend[arch, "torch"]
                table.add(f"{arch:<10} packed, triton over torch: model step {model_k / model_t:.2f}x, "
                     f"end to end {step_k / step_t:.2f}x")


if __name__ == "__main__":
    main()
