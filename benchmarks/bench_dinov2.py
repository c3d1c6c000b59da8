"""Step time of DINOv2 / iBOT's pretrain flags over plain DINO, at the demo's CPU recipe.

    python benchmarks/bench_dinov2.py [--steps 4] [--repeats 3] [--device cpu] [--out FILE]

`make demo`'s pretraining (vit_tiny/8, depth 4, out_dim 1024, batch norm in the head, batch 32,
2 x 64-px global crops, no local crops) on `protloc synth` cells (96 x 96), with each of
`--koleo 0.1`, `--centering sinkhorn`, `--ibot 1` (DINOv2's mask ratios 0.1-0.5 of half the
global crops) and all three. The batches are decoded first; a step is multi-crop, masks, teacher
and student forward, losses, backward, AdamW and EMA. The configurations take turns, `--repeats`
times `--steps` steps each after one warm-up step, so a busy machine slows them all alike. Each
reports its median wall time per step and its median CPU time per step: the process's, which
other jobs on a shared machine do not inflate (the fairer figure for a one-thread CPU run).
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from protloc.augment import MultiCropConfig
from protloc.distributed import World
from protloc.pretrain import PretrainConfig, Trainer
from protloc.sources import discover
from protloc.synth import write_dataset

DEMO = dict(arch="vit_tiny", patch=8, depth=4, out_dim=1024, use_bn_in_head=True, batch_size=32, lr=0.0016,
            warmup_epochs=10, warmup_teacher_temp_epochs=0, momentum_teacher=0.99, freeze_last_layer=0,
            crops=MultiCropConfig(global_size=64, local_crops=0))
FLAGS = {"DINO (demo)": {}, "--koleo 0.1": dict(koleo=0.1), "--centering sinkhorn": dict(centering="sinkhorn"),
         "--ibot 1": dict(ibot=1.0), "all three": dict(koleo=0.1, centering="sinkhorn", ibot=1.0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per turn")
    ap.add_argument("--repeats", type=int, default=3, help="turns of every configuration")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, n=DEMO["batch_size"] * (args.steps + 1), size=96, seed=0)
        sources = discover([tmp])
        trainers, batches = {}, None
        for name, flags in FLAGS.items():
            cfg = PretrainConfig(**DEMO, **flags, steps=600)
            trainers[name] = Trainer(sources, cfg, os.path.join(tmp, "p.pt"), world=World(device=device), workers=0,
                                     checkpoint_every=10**9)
            if batches is None:  # the same decoded images for every configuration
                batches = list(trainers[name].batches(args.steps + 1))
            trainers[name].train_step(batches[0])  # warm-up
        wall, cpu = {name: [] for name in FLAGS}, {name: [] for name in FLAGS}
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start, start_cpu = time.perf_counter(), time.process_time()
                for items in batches[1:]:
                    trainer.train_step(items)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall[name].append((time.perf_counter() - start) / args.steps)
                cpu[name].append((time.process_time() - start_cpu) / args.steps)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    lines = [f"# protloc pretrain step time with DINOv2 / iBOT flags: {platform.machine()}, {where}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
             "# make demo's recipe: vit_tiny/8 depth 4, out_dim 1024, bn in head, batch 32, 2 x 64 px, no local crops; "
             f"median of {args.repeats} turns of {args.steps} steps",
             f"{'flags':<22} {'wall s/step':>12} {'overhead':>9} {'CPU s/step':>11} {'overhead':>9}"]
    base, base_cpu = statistics.median(wall["DINO (demo)"]), statistics.median(cpu["DINO (demo)"])
    for name in FLAGS:
        t, c = statistics.median(wall[name]), statistics.median(cpu[name])
        lines.append(f"{name:<22} {t:>12.3f} {100 * (t / base - 1):>+8.0f}% "
                     f"{c:>11.3f} {100 * (c / base_cpu - 1):>+8.0f}%")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
