"""Fused Triton patch embedding vs the torch reference, forward and forward + backward (CUDA).

    python benchmarks/bench_patch_embed.py [--quick] [--out FILE]

Shapes: batch 64 of uint16 224 x 224 images, C = 2 and 4, patch 16 and 8, D = 384 and 768, both
token layouts, under bf16 autocast (how the model runs on a GPU). Per row: milliseconds (the
median of CUDA-event timings: `median_ms`; triton.testing.do_bench returns the mean unless told),
achieved GB/s and TFLOP/s, the floor (the larger of bytes / measured copy bandwidth and FLOPs /
measured bf16 matmul rate) and how far above it the kernel is; the target on an H100 is >= 2x the
reference and within 1.5x of the floor. The backward's weight gradient is also timed two ways, the
choice measured: the Triton kernel that re-gathers the patches from the pixels, and unfold + one
cuBLAS GEMM over the materialized patches. Rows are printed (and written to --out) as measured.

Bytes counted (the unavoidable traffic): forward reads the pixels and writes the fp32 tokens;
backward reads the pixels again and the fp32 token gradient. FLOPs: 2 * M * K * D per GEMM
(M tokens, K = Cg * p * p), one forward and one for the weight gradient.
"""

import argparse
import platform
import sys

import torch
import torch.nn.functional as F

from protloc.kernels.reference import patch_embed_torch

from table import Table  # benchmarks/table.py


def median_ms(fn):
    """Median milliseconds of fn over CUDA-event timings after warm-up."""
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def measured_rates():
    """(copy bandwidth in GB/s, bf16 matmul TFLOP/s) of this GPU, measured."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    bandwidth = 2 * x.numel() / median_ms(lambda: x.clone()) / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return bandwidth, 2 * 8192**3 / median_ms(lambda: a @ a) / 1e9


def inputs(B, C, size, p, D, layout):
    g = torch.Generator(device="cuda").manual_seed(0)
    pixels = torch.randint(0, 4096, (B, C, size, size), device="cuda", generator=g).to(torch.uint16)
    scale = torch.full((B, C), 1 / 4096, device="cuda")
    shift = torch.zeros(B, C, device="cuda")
    N = (size // p) ** 2
    params = [torch.randn(D, C if layout == "fused" else 1, p, p, device="cuda") * 0.02,
              torch.zeros(D, device="cuda"), torch.randn(1 + N, D, device="cuda") * 0.02,
              torch.zeros(D, device="cuda"), torch.randn(C, D, device="cuda") * 0.02 if layout == "channel" else None]
    for t in params:
        if t is not None:
            t.requires_grad_(True)
    return pixels, scale, shift, params


def unfold_weight_grad(pixels, scale, shift, grad, weight, layout):
    """The alternative backward: materialize the normalized patches (M, K) in bf16, one cuBLAS GEMM."""
    B, C, H, W = pixels.shape
    D, Cg, p, _ = weight.shape
    x = (pixels.float() * scale[:, :, None, None] + shift[:, :, None, None]).to(torch.bfloat16)
    if layout == "channel":
        x = x.reshape(B * C, 1, H, W)
    patches = F.unfold(x, p, stride=p).transpose(1, 2).reshape(-1, Cg * p * p)  # (M, K)
    return patches.t() @ grad[:, 1:].reshape(-1, D).to(torch.bfloat16)  # (K, D)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (for benchmarks/gpu_check.sh)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", help="also write the table to this file, row by row")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_patch_embed: needs a CUDA GPU; nothing measured")
        return
    import triton

    from protloc.kernels.patch_embed import patch_embed_triton, patch_embed_weight_grad

    bandwidth, matmul = measured_rates()
    table = Table(args.out)
    table.add(f"# patch embedding, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}, {platform.python_version()}")
    table.add(f"# measured: copy {bandwidth:.0f} GB/s, bf16 matmul {matmul:.0f} TFLOP/s; batch {args.batch_size}, "
              "uint16 224 x 224, bf16 autocast; ms = median; d_weight: the weight gradient alone, two ways")
    table.add(f"{'layout':<8}{'C':>2}{'p':>3}{'D':>5} {'pass':<8}{'torch ms':>9}{'triton ms':>10}{'speed-up':>9}"
              f"{'GB/s':>7}{'TFLOP/s':>8}{'floor ms':>9}{'x floor':>8}")
    shapes = [(layout, C, p, D) for layout in ("fused", "channel") for C in (2, 4) for p in (16, 8) for D in (384, 768)]
    if args.quick:
        shapes = [("fused", 2, 16, 384), ("fused", 4, 8, 768), ("channel", 2, 16, 384), ("channel", 4, 16, 768)]
    for layout, C, p, D in shapes:
        pixels, scale, shift, params = inputs(args.batch_size, C, 224, p, D, layout)
        G, Cg = (1, C) if layout == "fused" else (C, 1)
        M, K = args.batch_size * G * (224 // p) ** 2, Cg * p * p
        out_bytes = args.batch_size * (1 + M // args.batch_size) * D * 4
        flops = 2 * M * K * D
        grad = torch.randn(args.batch_size, 1 + M // args.batch_size, D, device="cuda")
        trainable = [t for t in params if t is not None]
        for name, bytes_, fl in (("forward", pixels.nbytes + out_bytes, flops),
                                 ("fwd+bwd", 2 * pixels.nbytes + 2 * out_bytes, 2 * flops)):
            times = {}
            for impl, fn in (("torch", patch_embed_torch), ("triton", patch_embed_triton)):
                def run():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = fn(pixels, scale, shift, *params)
                    if name == "fwd+bwd":
                        torch.autograd.grad(out, trainable, grad)
                times[impl] = median_ms(run)
            floor = max(bytes_ / bandwidth / 1e6, fl / matmul / 1e9)
            t = times["triton"]
            table.add(f"{layout:<8}{C:>2}{p:>3}{D:>5} {name:<8}{times['torch']:>9.3f}{t:>10.3f}"
                      f"{times['torch'] / t:>8.2f}x{bytes_ / t / 1e6:>7.0f}{fl / t / 1e9:>8.1f}"
                      f"{floor:>9.3f}{t / floor:>7.2f}x")
        # the weight gradient alone: Triton gather kernel vs unfold + cuBLAS
        weight = params[0]
        ms_triton = median_ms(lambda: patch_embed_weight_grad(pixels, scale, shift, grad, weight, layout == "channel",
                                                              torch.bfloat16))
        ms_cublas = median_ms(lambda: unfold_weight_grad(pixels, scale, shift, grad, weight, layout))
        table.add(f"{layout:<8}{C:>2}{p:>3}{D:>5} d_weight: triton gather {ms_triton:.3f} ms, "
                  f"unfold + cuBLAS {ms_cublas:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
