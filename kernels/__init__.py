"""protloc.kernels: the hot path, and the one place that picks its backend.

`PROTLOC_BACKEND=auto|triton|torch` (default auto). `auto` runs a Triton kernel when its inputs
are on CUDA (or TRITON_INTERPRET=1 is set) and a Triton kernel exists for the op, the torch
reference otherwise. The torch references are the spec; every Triton kernel is tested against
its reference.
"""

import os

from protloc.kernels.attention import attention_torch
from protloc.kernels.patch_embed import patch_embed_torch

BACKENDS = ("auto", "triton", "torch")

# op name -> Triton implementation; filled in as kernels land (see kernels/*.py).
TRITON_OPS = {}


def backend(op, tensor):
    """The backend that runs `op` on `tensor`: 'triton' or 'torch'."""
    choice = os.environ.get("PROTLOC_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"PROTLOC_BACKEND={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if op not in TRITON_OPS:
            raise RuntimeError(f"PROTLOC_BACKEND=triton: this build has no Triton kernel for {op}")
        return "triton"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return "triton" if op in TRITON_OPS and (tensor.is_cuda or interpreted) else "torch"


def patch_embed(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed=None):
    """Pixels (B, C, H, W) -> tokens (B, 1 + T, D); see kernels/patch_embed.py for shapes."""
    fn = TRITON_OPS["patch_embed"] if backend("patch_embed", pixels) == "triton" else patch_embed_torch
    return fn(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed)


def attention(q, k, v, cu_seqlens, max_seqlen):
    """Packed varlen attention, (total, H, Dh) -> (total, H, Dh); see kernels/attention.py."""
    fn = TRITON_OPS["attention"] if backend("attention", q) == "triton" else attention_torch
    return fn(q, k, v, cu_seqlens, max_seqlen)


__all__ = ["BACKENDS", "attention", "attention_torch", "backend", "patch_embed", "patch_embed_torch"]
