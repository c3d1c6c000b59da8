"""Varlen flash attention (Triton) vs the torch ways of attending over DINO's multi-crop pack (CUDA).

    python benchmarks/bench_attention.py [--quick] [--sweep] [--batch-size 64] [--out FILE]

Shapes: a batch of 64 images, each 2 global + 8 local crops, packed as `VisionTransformer.forward_pack`
packs them (all global crops, then all local crops): tokens per image 2 x (196 C + 1) + 8 x (36 C + 1),
C = 1 (fused layout: 197 and 37 tokens) and the channel-wise layout at C = 2 and 4; ViT-S (6 heads x 64)
and ViT-B (12 heads x 64); bf16. Forward, and forward + backward (dq, dk, dv of a fixed output gradient).

Implementations:
  triton     kernels/attention.py: one launch over the whole pack
  per-size   attention_torch (the reference / CPU path): one SDPA per run of equal lengths, flash backend
             (its cu_seqlens.tolist() host sync included, as in training)
  padded     every sequence padded to the longest, SDPA with a key-padding mask: memory-efficient backend
             (flash takes no mask); attention only, the pad / unpad copies not timed
  varlen     torch.nn.attention.varlen.varlen_attn (flash varlen), where this torch has it

ms: median of CUDA-event timings after warm-up (triton.testing.do_bench). Rows are printed (and written to
--out) as measured. TFLOP/s counts the useful work
only, 4 * L^2 * head_dim * heads per sequence forward and 3.5x that forward + backward (the backward's
five matmuls are 2.5x the forward's two); "% mm" is that rate over the measured bf16 matmul rate (8192^3).
The target on an H100: triton >= 1.3x per-size forward + backward.
"""

import argparse
import contextlib
import importlib
import platform
import sys

import torch
import torch.nn.functional as F

from protloc.kernels.reference import attention_torch

from table import Table  # benchmarks/table.py

ARCHS = {"ViT-S": 6, "ViT-B": 12}  # heads; head_dim 64 for both


def crop_lengths(C):
    """Token counts of a global and a local crop: patches (224 / 16)^2 and (96 / 16)^2 per channel, + CLS."""
    return 196 * C + 1, 36 * C + 1


def sdpa_backend(*names):
    """A context that restricts SDPA to the named backends, where this torch can."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, n) for n in names])


def varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def implementations(q, k, v, qkv, cu, lengths, heads, head_dim):
    """name -> (forward fn, the leaves to differentiate). q, k, v are views of the (total, 3, H, Dh) leaf qkv."""
    from protloc.kernels.attention import attention_triton

    max_len = max(lengths)
    impls = {"triton": (lambda: attention_triton(q, k, v, cu, max_len), [qkv])}

    def per_size():
        with sdpa_backend("FLASH_ATTENTION"):
            return attention_torch(q, k, v, cu, max_len)
    impls["per-size"] = (per_size, [qkv])

    # padded: (n_seq, H, L_max, Dh) leaves, a key-padding mask broadcast over heads and queries
    n = len(lengths)
    lens = torch.tensor(lengths, device=q.device)
    keep = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # (n, L_max)
    padded = []
    for t in (q, k, v):
        p = t.new_zeros(n, max_len, heads, head_dim)
        p[keep] = t.detach()
        padded.append(p.transpose(1, 2).contiguous().requires_grad_())
    mask = keep[:, None, None, :]

    def padded_sdpa():
        with sdpa_backend("EFFICIENT_ATTENTION"):
            return F.scaled_dot_product_attention(*padded, attn_mask=mask)
    impls["padded"] = (padded_sdpa, padded)

    fn = varlen_attn()
    if fn is not None:
        impls["varlen"] = (lambda: fn(q, k, v, cu, cu, max_len, max_len), [qkv])
    return impls


def measured_matmul_rate():
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / do_bench(lambda: a @ a, return_mode="median") / 1e9  # TFLOP/s


def make_pack(batch, C, heads, head_dim=64):
    g_len, l_len = crop_lengths(C)
    lengths = [g_len] * (2 * batch) + [l_len] * (8 * batch)  # forward_pack order: globals, then locals
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = qkv.unbind(1)
    return q, k, v, qkv, cu, lengths


def time_pass(fn, leaves, backward):
    from triton.testing import do_bench

    out = fn()
    grad = torch.randn_like(out)

    def step():
        out = fn()
        if backward:
            torch.autograd.grad(out, leaves, grad)
    return do_bench(step, warmup=25, rep=100 if backward else 50, return_mode="median")


def sweep(batch, table):
    """Triton block configurations, forward + backward, at ViT-S C = 1 and 4 (pick the default from this)."""
    attn = importlib.import_module("protloc.kernels.attention")  # the module (protloc.kernels.attention is the op)
    default = attn._config
    candidates = [  # fwd, dkdv, dq (BLOCK_M, BLOCK_N), num_warps, num_stages
        ((64, 64), (32, 64), (64, 32), 4, 3),
        ((64, 32), (32, 64), (64, 32), 4, 3),
        ((128, 64), (32, 64), (64, 32), 8, 3),
        ((128, 128), (64, 128), (128, 64), 8, 2),
        ((64, 64), (64, 64), (64, 64), 4, 2),
        ((64, 64), (16, 64), (64, 16), 4, 4),
        ((32, 64), (32, 32), (32, 32), 4, 3),
    ]
    table.add("# sweep: triton block configurations, forward + backward ms")
    table.add(f"{'fwd':>10}{'dkdv':>10}{'dq':>10}{'warps':>6}{'stages':>7}{'S C=1 fwd':>11}{'S C=1 f+b':>11}"
                 f"{'S C=4 f+b':>11}")
    packs = [make_pack(batch, C, 6) for C in (1, 4)]
    try:
        for fwd, dkdv, dq, warps, stages in candidates:
            cfg = dict(fwd=fwd, dkdv=dkdv, dq=dq, num_warps=warps, num_stages=stages)
            attn._config = lambda head_dim, dtype, cfg=cfg: cfg
            row = f"{str(fwd):>10}{str(dkdv):>10}{str(dq):>10}{warps:>6}{stages:>7}"
            for i, (q, k, v, qkv, cu, lengths) in enumerate(packs):
                fn = lambda: attn.attention_triton(q, k, v, cu, max(lengths))  # noqa: E731
                try:
                    passes = (False, True) if i == 0 else (True,)
                    row += "".join(f"{time_pass(fn, [qkv], b):>11.3f}" for b in passes)
                except Exception as e:  # a configuration that does not compile or fit shared memory
                    row += f"  failed: {type(e).__name__}"
                    break
            table.add(row)
    finally:
        attn._config = default


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (for benchmarks/gpu_check.sh)")
    ap.add_argument("--sweep", action="store_true", help="also time a few Triton block configurations")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", help="also write the table to this file, row by row")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU; nothing measured")
        return 0
    import triton

    matmul = measured_matmul_rate()
    table = Table(args.out)
    table.add(f"# varlen attention, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}, python {platform.python_version()}")
    table.add(f"# measured bf16 matmul {matmul:.0f} TFLOP/s; batch {args.batch_size} x (2 global + 8 local crops), "
              "bf16, head_dim 64; ms = median; per-size = flash SDPA per run, padded = mem-efficient SDPA + mask")
    table.add(f"{'arch':<6}{'C':>2}{'tokens':>8} {'pass':<8}{'impl':<9}{'ms':>9}{'TFLOP/s':>9}{'% mm':>6}"
              f"{'vs per-size':>12}{'max|diff|':>10}")
    shapes = [(arch, C) for C in (1, 2, 4) for arch in ARCHS]
    if args.quick:
        shapes = [("ViT-S", 1), ("ViT-B", 1), ("ViT-S", 4)]
    for arch, C in shapes:
        heads = ARCHS[arch]
        q, k, v, qkv, cu, lengths = make_pack(args.batch_size, C, heads)
        fwd_flops = sum(4 * L * L * 64 * heads for L in lengths)
        impls = implementations(q, k, v, qkv, cu, lengths, heads, 64)
        with torch.no_grad():  # the Triton output against the reference's (bf16 both)
            diff = (impls["triton"][0]() - impls["per-size"][0]()).abs().max().item()
        for name, flops, backward in (("forward", fwd_flops, False), ("fwd+bwd", 3.5 * fwd_flops, True)):
            times = {}
            for impl, (fn, leaves) in impls.items():
                try:
                    times[impl] = time_pass(fn, leaves, backward)
                except Exception as e:  # e.g. a backend this torch / GPU lacks for these shapes
                    table.add(f"# {arch} C={C} {name} {impl}: not run ({type(e).__name__}: {str(e)[:80]})")
            for impl, ms in times.items():
                tflops = flops / ms / 1e9
                speedup = f"{times['per-size'] / ms:.2f}x" if "per-size" in times else "-"
                table.add(f"{arch:<6}{C:>2}{sum(lengths):>8} {name:<8}{impl:<9}{ms:>9.3f}"
                             f"{tflops:>9.1f}{100 * tflops / matmul:>5.0f}%{speedup:>12}"
                             + (f"{diff:>10.1e}" if impl == "triton" and not backward else ""))
        del q, k, v, qkv, impls
        torch.cuda.empty_cache()
    if args.sweep:
        sweep(args.batch_size, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
