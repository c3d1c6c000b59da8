"""Compile every Triton kernel of protloc for CUDA GPUs without a GPU: registers, spills, shared memory.

    python benchmarks/compile_check.py [--arch 90,80] [--quick] [--out FILE]

Why: a GPU is lent for minutes; a kernel that does not compile, spills registers, or asks for more
shared memory than the GPU gives one block (that fails only at launch) is caught here, on any
machine with Triton, before one is.

How: the host wrappers (kernels/patch_embed.py, kernels/attention.py) run on CPU tensors at the
training shapes, and each kernel launch becomes an ahead-of-time compile of every block
configuration (each autotune config of the patch embedding, the fixed configs of attention) for
each target, through Triton's own launch path (`warmup`), under a stand-in driver that names the
target: the kernels are specialized exactly as a launch on that GPU would specialize them.
Triton's bundled ptxas does the last step; its log gives the registers and spills, the kernel's
metadata the shared memory. Compile seconds are reported too: the first GPU run pays them.

Cases (training shapes: 64 images, 2 channels, 224 x 224 global and 96 x 96 local crops, ViT-S):
  patch_embed  forward and weight gradient, `fused` and `channel` layouts, patch 16 and 8:
               float32 pixels with bf16 GEMMs (pretraining, under autocast), uint16 pixels in bf16
               (embedding, the GPU tests), fp16 and fp32 (the GPU tests)
  attention    forward, preprocess, dK/dV, dQ: head_dim 64 (every protloc ViT) in bf16, fp16 and
               fp32, and head_dim 32 and 128 (the GPU tests) in the same
--quick: the bf16 pretraining and attention cases at patch 16 and head_dim 64 only.

Exit 1 when a kernel fails to compile or needs more shared memory than its target allows; spills
are flagged. Exit 0 with a message, nothing compiled, where Triton or its CUDA backend is missing
(Triton ships it for Linux x86-64). Run it without TRITON_INTERPRET (the interpreter compiles nothing).
"""

import argparse
import contextlib
import io
import os
import platform
import re
import sys
import tempfile
import time

import torch

from table import Table  # benchmarks/table.py

# the most dynamic shared memory one block may use (bytes, with the opt-in), per compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
BATCH, CHANNELS, GLOBAL, LOCAL, LOCAL_CROPS, DIM, HEADS = 64, 2, 224, 96, 8, 384, 6


class TargetDriver:
    """What Triton's launch path asks the active driver while it compiles: the target, a device, a stream."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one JIT cache per target

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def launches_compile(kernels, record):
    """Within: a launch of any of `kernels` compiles each of its configs instead, record(kernel, log, seconds)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def compile_one(fn, args, grid, kwargs):
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):  # ptxas's log, printed by Triton (knobs.nvidia.dump_ptxas_log)
            compiled = JITFunction.run(fn, *args, grid=grid, warmup=True, **kwargs)
        record(compiled, kwargs, log.getvalue(), time.perf_counter() - start)

    def instead(kernel):
        def run(*args, grid, warmup, **kwargs):
            if isinstance(kernel, Autotuner):
                for config in kernel.configs:
                    compile_one(kernel.fn, args, grid, {**kwargs, **config.all_kwargs()})
            else:
                compile_one(kernel, args, grid, kwargs)
        return run

    for kernel in kernels:
        kernel.run = instead(kernel)  # an instance attribute: kernel[grid](...) calls it
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run


def patch_embed_cases(quick):
    """(label, layout, patch, pixel dtype, GEMM dtype, with weight gradient)."""
    cases = []
    for layout in ("fused", "channel"):
        for p in (16,) if quick else (16, 8):
            cases.append(("pretrain", layout, p, torch.float32, torch.bfloat16, True))
            if not quick:
                cases += [("embed, tests", layout, p, torch.uint16, torch.bfloat16, True),
                          ("tests", layout, p, torch.uint16, torch.float16, True),
                          ("tests", layout, p, torch.uint16, torch.float32, True)]
    return cases


def run_patch_embed(module, layout, p, pixel_dtype, dtype, backward):
    """The forward (and weight-gradient) wrapper at the global crop's shape; every launch compiles instead."""
    B, C, D = BATCH, CHANNELS, DIM
    Cg = C if layout == "fused" else 1
    pixels = torch.zeros(B, C, GLOBAL, GLOBAL, dtype=pixel_dtype)
    scale, shift = torch.ones(B, C), torch.zeros(B, C)
    weight, bias = torch.zeros(D, Cg, p, p), torch.zeros(D)
    pos, cls = torch.zeros(1 + (GLOBAL // p) ** 2, D), torch.zeros(D)
    chan = torch.zeros(C, D) if layout == "channel" else None
    out = module.patch_embed_forward(pixels, scale, shift, weight, bias, pos, cls, chan, dtype)
    if backward:
        module.patch_embed_weight_grad(pixels, scale, shift, torch.zeros_like(out), weight, chan is not None, dtype)


def attention_cases(quick):
    """(head_dim, dtype)."""
    head_dims = (64,) if quick else (64, 32, 128)
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    return [(d, dtype) for d in head_dims for dtype in dtypes]


def run_attention(module, head_dim, dtype):
    """Forward and backward wrappers on a DINO pack (globals, then locals); every launch compiles instead."""
    lengths = [(GLOBAL // 16) ** 2 + 1] * (2 * BATCH) + [(LOCAL // 16) ** 2 + 1] * (LOCAL_CROPS * BATCH)
    total = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, o, do = (torch.zeros(total, HEADS, head_dim, dtype=dtype) for _ in range(5))
    lse = torch.zeros(HEADS, total)
    tables = {}
    module._forward(q, k, v, cu, tables)
    module._backward(do, q, k, v, o, lse, cu, tables)


def ptxas_report(log):
    """(registers, spill bytes stored, spill bytes loaded) from ptxas -v's log."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None, *(map(int, spills.groups()) if spills else (None, None)))


def cuda_backend_problem():
    """Why CUDA kernels cannot be compiled here, or None."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: the interpreter compiles nothing (unset it)"
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 32))
        if not hasattr(triton.knobs, "nvidia"):
            return f"Triton {triton.__version__} has no nvidia knobs (ptxas log)"
    except Exception as e:  # ImportError, or a Triton without the nvidia backend
        return f"no Triton CUDA backend ({type(e).__name__}: {e})"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90,80", help="compute capabilities to compile for (of 80, 86, 89, 90)")
    ap.add_argument("--quick", action="store_true", help="the bf16 training cases only")
    ap.add_argument("--out", help="also write the table to this file, row by row")
    args = ap.parse_args()
    archs = [int(a) for a in args.arch.split(",")]
    if unknown := [a for a in archs if a not in SHARED_LIMIT]:
        ap.error(f"--arch {unknown}: known are {sorted(SHARED_LIMIT)}")
    problem = cuda_backend_problem()
    if problem:
        print(f"compile_check: {problem}; nothing compiled")
        return 0

    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    patch_embed = importlib.import_module("protloc.kernels.patch_embed")
    attention = importlib.import_module("protloc.kernels.attention")
    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="protloc-compile-check-")  # compile everything afresh
    triton.knobs.nvidia.dump_ptxas_log = True

    table = Table(args.out)
    table.add(f"# protloc kernels compiled ahead of time: triton {triton.__version__}, torch {torch.__version__}, "
              f"python {platform.python_version()}; sm_{', sm_'.join(map(str, archs))}")
    table.add(f"# training shapes: {BATCH} images x {CHANNELS} channels, {GLOBAL} / {LOCAL} px crops, "
              f"D {DIM}, {HEADS} heads; shared = dynamic shared memory per block")
    table.add(f"{'arch':<6} {'case':<52} {'kernel':<24} {'config':<22} {'warps':>5} {'stages':>6} {'regs':>5} "
              f"{'spill st/ld B':>13} {'shared KB':>9} {'s':>5}  verdict")
    failures, spilled, compiled = [], [], 0
    for arch in archs:
        driver.set_active(TargetDriver(GPUTarget("cuda", arch, 32)))
        case = ""

        def record(kernel, kwargs, log, seconds):
            nonlocal compiled
            if not log:  # no ptxas log: this specialization was compiled before, in another case
                return
            compiled += 1
            regs, stores, loads = ptxas_report(log)
            shared = kernel.metadata.shared
            blocks = "x".join(str(v) for k, v in kwargs.items() if k.startswith("BLOCK"))
            verdict = "ok"
            if shared > SHARED_LIMIT[arch]:
                verdict = f"FAIL: shared memory over the sm_{arch} limit of {SHARED_LIMIT[arch] // 1024} KB"
                failures.append(f"sm_{arch} {case} {kernel.name} {blocks}: {verdict}")
            elif stores or loads:
                verdict = "spills"
                spilled.append(f"sm_{arch} {case} {kernel.name} {blocks}")
            table.add(f"sm_{arch:<3} {case:<52} {kernel.name:<24} {blocks:<22} {kernel.metadata.num_warps:>5} "
                      f"{kernel.metadata.num_stages:>6} {regs if regs is not None else '?':>5} "
                      f"{f'{stores}/{loads}':>13} {shared / 1024:>9.1f} {seconds:>5.1f}  {verdict}")

        runs = [(f"patch_embed {label}: {layout} p{p} {str(px)[6:]} {str(dt)[6:]}" + (" +bwd" if bwd else ""),
                 lambda layout=layout, p=p, px=px, dt=dt, bwd=bwd: run_patch_embed(patch_embed, layout, p, px, dt, bwd))
                for label, layout, p, px, dt, bwd in patch_embed_cases(args.quick)]
        runs += [(f"attention head_dim {d} {str(dt)[6:]} fwd+bwd",
                  lambda d=d, dt=dt: run_attention(attention, d, dt)) for d, dt in attention_cases(args.quick)]
        kernels = [patch_embed._patch_embed_fwd, patch_embed._patch_embed_bwd_weight, attention._fwd_kernel,
                   attention._bwd_preprocess_kernel, attention._bwd_dkdv_kernel, attention._bwd_dq_kernel]
        with launches_compile(kernels, record):
            for case, run in runs:
                try:
                    run()
                except Exception as e:  # a compile error: say which case, go on with the others
                    message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                    failures.append(f"sm_{arch} {case}: {type(e).__name__}: {message}")
                    table.add(f"sm_{arch:<3} {case:<52} FAILED to compile: {type(e).__name__}: {message}")
    table.add(f"# {compiled} kernels compiled, {len(failures)} failed, {len(spilled)} spill registers to memory")
    for line in failures:
        table.add(f"# FAIL {line}")
    for line in spilled:
        table.add(f"# spills {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
