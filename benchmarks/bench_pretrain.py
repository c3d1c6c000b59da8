"""Pretraining speed on this machine, side by side in one run: the DINO reference's step, protloc's
model step (per crop size and packed), the whole `protloc pretrain` step on TIFFs, and the float32
matrix-product rate of the machine as the bound.

    python benchmarks/bench_pretrain.py [--reference DIR] [--rounds 3] [--threads 2] [--out FILE]
        [--archs vit_small --patch 16 --depth 12 --batch-size 8 --global-size 224 --local-size 96
         --local-crops 8 --out-dim 65536 --field 256 --fields 16 --workers 0 --normalize image]
        [--device cuda --backends torch,triton]

Every timing is interleaved: each round runs one step of every contender in turn, and the table
gives the median over the rounds, so a machine shared with other work slows all of them alike.
  reference     DIR: a checkout of facebookresearch/dino; its vit_small-style ViT, DINOHead,
                DINOLoss, utils.clip_gradients, AdamW over utils.get_params_groups and its EMA
                loop, on ready crops (PIL and torchvision, which its modules import for data
                loading, are stubbed: nothing of them runs in a step)
  model         protloc's Trainer.model_step on ready crops: teacher and student forward, DINO
                loss, backward, per-parameter clipping, AdamW, EMA; one transformer pass per crop
                size (--pack off: what auto picks on a CPU) and packed (--pack on: auto's pick
                where the Triton kernels run; --backends compares PROTLOC_BACKEND values)
  end to end    the loop of `protloc pretrain` (--pack auto) on OME-TIFF fields of --field px (protloc synth):
                decoding (--workers loader processes; 0: in the main process), images to the
                device and multi-crop, the model step; the share of each stage (decode is the
                wait for the loader)
  matmul bound  the step's FLOPs (torch's FlopCounterMode: matrix products, convolutions,
                attention, forward and backward) at the matrix-product rate (float32; bf16 on a GPU)
                measured at the shapes of the step's largest products
Defaults: the issue's configuration (ViT-S/16, batch 8, 2 x 224 + 8 x 96, out_dim 65536).
`make demo`'s recipe on large fields: --archs vit_tiny --patch 8 --depth 4 --batch-size 32
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
from protloc.distributed import World
from protloc.model import ARCHS
from protloc.pretrain import PretrainConfig, Trainer
from protloc.sources import discover
from protloc.synth import write_dataset

from table import Table  # benchmarks/table.py


def reference_step(ref_dir, crops, args, arch, device):
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
    dim, heads = ARCHS[arch]

    def model(drop_path):  # its vit_small(), at any width and depth
        vit = vits.VisionTransformer(patch_size=args.patch, embed_dim=dim, depth=args.depth, num_heads=heads,
                                     mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                     drop_path_rate=drop_path, in_chans=crops[0].shape[1])
        return utils.MultiCropWrapper(vit, vits.DINOHead(dim, args.out_dim, use_bn=False, norm_last_layer=True))
    torch.manual_seed(0)
    student, teacher = model(0.1).to(device), model(0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    n_crops = len(crops)
    loss_fn = main_dino.DINOLoss(args.out_dim, n_crops, 0.04, 0.04, 0, 1).to(device)
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


def matmul_rate(shapes, device=torch.device("cpu"), repeats=3) -> float:
    """GFLOP/s of the matrix products (m, k, n) in `shapes`, each run `repeats` times: float32 on a
    CPU, bf16 on a GPU (the precision the model runs at there)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pairs = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
             for m, k, n in shapes]

    def products():
        for _ in range(repeats):
            for a, b in pairs:
                a @ b
    products()
    return repeats * sum(2 * m * k * n for m, k, n in shapes) / synced(device, products) / 1e9


def synced(device, fn):
    """Seconds of one call of fn, the device's queue drained before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(sources, tmp, arch, args, table):
    """The rows of one (arch, PROTLOC_BACKEND): every contender's step, interleaved over the rounds."""
    device = torch.device(args.device)
    cfg = PretrainConfig(arch=arch, patch=args.patch, depth=args.depth, out_dim=args.out_dim,
                         normalize=args.normalize, batch_size=args.batch_size, steps=10**6, freeze_last_layer=0.0,
                         crops=MultiCropConfig(global_size=args.global_size, local_size=args.local_size,
                                               local_crops=args.local_crops))

    def trainer(pack, workers=0):
        return Trainer(sources, dataclasses.replace(cfg, pack=pack), os.path.join(tmp, f"{pack}.pt"),
                       world=World(device=device), workers=workers, checkpoint_every=10**9)
    per_size, packed, e2e = trainer("off"), trainer("on"), trainer("auto", args.workers)
    images = per_size.images(next(iter(per_size.batches(1))))
    crops, n_crops, masks = per_size.crops(images, seed=0)
    names = images.names
    steps = {"model, per crop size (--pack off)": lambda: per_size.model_step(crops, names, n_crops, masks, 0),
             "model, packed (--pack on)": lambda: packed.model_step(crops, names, n_crops, masks, 0)}
    if args.reference:
        ref_crops = [c for c in crops for c in c.unflatten(0, (-1, args.batch_size))]  # one tensor per crop
        steps = {"DINO reference": reference_step(args.reference, ref_crops, args, arch, device), **steps}
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
    steps[f"end to end on TIFFs (--pack auto: {'on' if e2e.pack else 'off'})"] = end_to_end
    for fn in steps.values():  # warm-up: compiles and autotunes the kernels at these shapes
        synced(device, fn)
    for v in stage_s.values():
        v.clear()
    times = {name: [] for name in steps}
    rates = []
    for _ in range(args.rounds):
        rates.append(matmul_rate(shapes, device))
        for name, fn in steps.items():
            times[name].append(synced(device, fn))
    rate = statistics.median(rates)
    backend = os.environ.get("PROTLOC_BACKEND", "auto")
    table.add(f"# {arch}/{args.patch}, PROTLOC_BACKEND={backend}: {gflop:.0f} GFLOP per model step; matrix products "
              f"({tokens} x {dim} x {4 * dim} and alike) at {rate:.0f} GFLOP/s: bound {gflop / rate:.2f} s")
    base = next(iter(steps))
    for name, t in times.items():
        s = statistics.median(t)
        table.add(f"{arch:<10} {backend:<7} {name:<44} {s:>9.3f} {args.batch_size / s:>8.2f} "
                  f"{statistics.median(times[base]) / s:>8.2f}x {gflop / rate / s:>9.2f}")
    shares = {k: statistics.median(v) for k, v in stage_s.items()}
    total = sum(shares.values())
    model = statistics.median(times["model, packed (--pack on)" if e2e.pack else "model, per crop size (--pack off)"])
    table.add(f"# {arch}: end to end / model step alone {model / statistics.median(times[name]):.2f}; stages of the "
              "end-to-end step: " + ", ".join(f"{k} {v / total:.0%}" for k, v in shares.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", metavar="DIR", help="a checkout of facebookresearch/dino to time beside protloc")
    ap.add_argument("--rounds", "--steps", type=int, default=3, help="interleaved rounds (one step of each per round)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--archs", default="vit_small")
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default=None, help="PROTLOC_BACKEND values to compare, e.g. torch,triton")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    table = Table(args.out)
    table.add(f"# protloc pretrain speed: {platform.machine()}, {device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {'bf16 autocast' if args.device.startswith('cuda') else 'float32'}"
              f"; load average {os.getloadavg()[0]:.2f} at the start")
    table.add(f"# depth {args.depth}, batch {args.batch_size}, crops 2 x {args.global_size} + {args.local_crops} x "
              f"{args.local_size}, out_dim {args.out_dim}; {args.fields} fields of {args.field} x {args.field} px "
              f"(2 channels, uint16), normalize {args.normalize}, {args.workers} loader workers; median of "
              f"{args.rounds} interleaved rounds")
    table.add(f"{'arch':<10} {'backend':<7} {'':<44} {'s / step':>9} {'img / s':>8} {'vs first':>9} {'of bound':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, n=args.fields, size=args.field, seed=0)
        sources = discover([tmp])
        for arch in args.archs.split(","):
            for backend in (args.backends.split(",") if args.backends else [None]):
                if backend is not None:
                    os.environ["PROTLOC_BACKEND"] = backend
                measure(sources, tmp, arch, args, table)
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
