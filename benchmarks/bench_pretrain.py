"""Pretraining speed on this machine, side by side in one run: the DINO reference's step, protloc's
model step (per crop size and packed), the whole `protloc pretrain` step on TIFFs, and the float32
matrix-product rate of the machine as the bound.

    python benchmarks/bench_pretrain.py [--reference DIR] [--rounds 3] [--threads 2] [--out FILE]
        [--arch vit_small --patch 16 --depth 12 --batch-size 8 --global-size 224 --local-size 96
         --local-crops 8 --out-dim 65536 --field 256 --fields 16 --workers 0]

Every timing is interleaved: each round runs one step of every contender in turn, and the table
gives the median over the rounds, so a machine shared with other work slows all of them alike.
  reference     DIR: a checkout of facebookresearch/dino; its vit_small-style ViT, DINOHead,
                DINOLoss, utils.clip_gradients, AdamW over utils.get_params_groups and its EMA
                loop, on ready crops (PIL and torchvision, which its modules import for data
                loading, are stubbed: nothing of them runs in a step)
  model         protloc's Trainer.model_step on ready crops: teacher and student forward, DINO
                loss, backward, per-parameter clipping, AdamW, EMA (--pack auto: per crop size on
                a CPU), and packed (--pack on)
  end to end    the loop of `protloc pretrain` on OME-TIFF fields of --field px (protloc synth):
                decoding (--workers loader processes; 0: in the main process), images to the
                device and multi-crop, the model step; the share of each stage (decode is the
                wait for the loader)
  matmul bound  the step's FLOPs (torch's FlopCounterMode: matrix products, convolutions,
                attention, forward and backward) at the float32 matrix-product rate measured at the
                shapes of the step's largest products
Defaults: the issue's configuration (ViT-S/16, batch 8, 2 x 224 + 8 x 96, out_dim 65536).
`make demo`'s recipe on large fields: --arch vit_tiny --patch 8 --depth 4 --batch-size 32
--global-size 64 --local-crops 0 --out-dim 1024 --normalize dataset --field 1024 --fields 64.
"""

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from protloc.augment import MultiCropConfig
from protloc.model import ARCHS
from protloc.pretrain import PretrainConfig, Trainer
from protloc.sources import discover
from protloc.synth import write_dataset

from table import Table  # benchmarks/table.py


def reference_step(ref_dir, crops, args):
    """A step function of the DINO reference at this configuration, on `crops` (its list of crop batches)."""
    for name in ("PIL", "torchvision"):  # imported by its modules for data loading only
        stub = types.ModuleType(name)
        for attr in ("Image", "ImageFilter", "ImageOps", "datasets", "transforms", "models"):
            setattr(stub, attr, types.ModuleType(attr))
        sys.modules.setdefault(name, stub)
    sys.path.insert(0, ref_dir)
    import main_dino
    import utils
    import vision_transformer as vits
    if not torch.distributed.is_initialized():  # its DINOLoss all-reduces the center: a group of one process
        store = tempfile.NamedTemporaryFile(prefix="dino_ref_store_", delete=False).name
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    dim, heads = ARCHS[args.arch]

    def model(drop_path):  # its vit_small(), at any width and depth
        vit = vits.VisionTransformer(patch_size=args.patch, embed_dim=dim, depth=args.depth, num_heads=heads,
                                     mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                     drop_path_rate=drop_path, in_chans=crops[0].shape[1])
        return utils.MultiCropWrapper(vit, vits.DINOHead(dim, args.out_dim, use_bn=False, norm_last_layer=True))
    torch.manual_seed(0)
    student, teacher = model(0.1), model(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    n_crops = len(crops)
    loss_fn = main_dino.DINOLoss(args.out_dim, n_crops, 0.04, 0.04, 0, 1)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = 5e-4 * args.batch_size / 256
        if i == 0:
            group["weight_decay"] = 0.04

    def step():  # main_dino.train_one_epoch's body, data loading and logging aside
        teacher_output = teacher(crops[:2])
        student_output = student(crops)
        loss = loss_fn(student_output, teacher_output, 0)
        optimizer.zero_grad()
        loss.backward()
        utils.clip_gradients(student, 3.0)
        utils.cancel_gradients_last_layer(1, student, 1)  # the last layer trains, as protloc's here
        optimizer.step()
        with torch.no_grad():
            m = 0.996
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        loss.item()
    return step


def matmul_rate(shapes, repeats=3) -> float:
    """float32 GFLOP/s of the matrix products (m, k, n) in `shapes`, each run `repeats` times."""
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    for a, b in pairs:
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        for a, b in pairs:
            a @ b
    return repeats * sum(2 * m * k * n for m, k, n in shapes) / (time.perf_counter() - start) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", metavar="DIR", help="a checkout of facebookresearch/dino to time beside protloc")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one step of each per round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--field", type=int, default=256, help="side of the synthetic TIFF fields, px")
    ap.add_argument("--fields", type=int, default=16, help="number of fields")
    ap.add_argument("--workers", type=int, default=0, help="loader processes of the end-to-end loop")
    ap.add_argument("--normalize", default="image", help="the run's --normalize (the dino recipe's: image)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(args.out)
    table.add(f"# protloc pretrain speed: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, float32; load average {os.getloadavg()[0]:.2f} at the start")
    table.add(f"# {args.arch}/{args.patch} depth {args.depth}, batch {args.batch_size}, crops 2 x {args.global_size}"
              f" + {args.local_crops} x {args.local_size}, out_dim {args.out_dim}; {args.fields} fields of "
              f"{args.field} x {args.field} px (2 channels, uint16), normalize {args.normalize}, {args.workers} "
              "loader workers; "
              f"median of {args.rounds} interleaved rounds")
    cfg = PretrainConfig(arch=args.arch, patch=args.patch, depth=args.depth, out_dim=args.out_dim,
                         normalize=args.normalize, batch_size=args.batch_size, steps=10**6, freeze_last_layer=0.0,
                         crops=MultiCropConfig(global_size=args.global_size, local_size=args.local_size,
                                               local_crops=args.local_crops))
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, n=args.fields, size=args.field, seed=0)
        sources = discover([tmp])

        def trainer(pack, workers=0):
            return Trainer(sources, dataclasses.replace(cfg, pack=pack), os.path.join(tmp, f"{pack}.pt"),
                           workers=workers, checkpoint_every=10**9)
        per_size, packed, e2e = trainer("auto"), trainer("on"), trainer("auto", args.workers)
        items = next(iter(per_size.batches(1)))
        images = per_size.images(items)
        names = images.names
        crops, n_crops, masks = per_size.crops(images, seed=0)
        steps = {"model, per crop size (--pack auto)": lambda: per_size.model_step(crops, names, n_crops, masks, 0),
                 "model, packed (--pack on)": lambda: packed.model_step(crops, names, n_crops, masks, 0)}
        if args.reference:
            ref_crops = [c for c in crops for c in c.unflatten(0, (-1, args.batch_size))]  # one tensor per crop
            steps = {"DINO reference": reference_step(args.reference, ref_crops, args), **steps}
        with FlopCounterMode(display=False) as flops:
            per_size.model_step(crops, names, n_crops, masks, 0)
        gflop = flops.get_total_flops() / 1e9
        tokens = args.batch_size * 2 * ((args.global_size // args.patch) ** 2 + 1)
        dim = per_size.student.backbone.dim
        shapes = [(tokens, dim, 3 * dim), (tokens, dim, 4 * dim), (tokens, 4 * dim, dim), (tokens, dim, dim)]

        batches = iter(e2e.batches(10**6))
        stage_s = {k: [] for k in ("decode", "crop", "forward", "backward", "optimizer")}

        def end_to_end():
            start = time.perf_counter()
            items = next(batches)
            decode = time.perf_counter() - start
            e2e.train_step(items)
            stage_s["decode"].append(decode)
            for k, v in e2e.stage_s.items():
                stage_s[k].append(v)
        steps["end to end on TIFFs (--pack auto)"] = end_to_end
        for fn in steps.values():  # warm-up
            fn()
        for v in stage_s.values():
            v.clear()
        times = {name: [] for name in steps}
        rates = []
        for _ in range(args.rounds):
            rates.append(matmul_rate(shapes))
            for name, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
    rate = statistics.median(rates)
    table.add(f"# matmul bound: {gflop:.0f} GFLOP per model step at {rate:.0f} GFLOP/s (float32 products "
              f"{tokens} x {dim} x {4 * dim} and alike, median of the rounds) = {gflop / rate:.2f} s")
    base = "DINO reference" if args.reference else "model, per crop size (--pack auto)"
    model = statistics.median(times["model, per crop size (--pack auto)"])
    table.add(f"{'':<36} {'s / step':>9} {'img / s':>8} {'vs ' + base.split(',')[0]:>18} {'of the bound':>13}")
    for name, t in times.items():
        s = statistics.median(t)
        table.add(f"{name:<36} {s:>9.2f} {args.batch_size / s:>8.2f} "
                  f"{statistics.median(times[base]) / s:>17.2f}x {gflop / rate / s:>12.2f}")
    end = statistics.median(times["end to end on TIFFs (--pack auto)"])
    shares = {k: statistics.median(v) for k, v in stage_s.items()}
    total = sum(shares.values())
    table.add(f"# end to end / model step alone: {model / end:.2f}; stages of the end-to-end step: "
              + ", ".join(f"{k} {v / total:.0%}" for k, v in shares.items()))


if __name__ == "__main__":
    main()
