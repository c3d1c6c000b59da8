"""protloc.kernels: the hot path, and the one place that picks its backend.

`PROTLOC_BACKEND=auto|triton|torch` (default auto). `auto` runs a Triton kernel when its inputs
are on CUDA and a Triton kernel exists for the op, the torch reference otherwise; `triton` forces
the kernels (on CPU tensors that takes TRITON_INTERPRET=1, which is how the tests run them).
Either way, shapes a kernel does not take (patch sizes, head dims; each kernel module says which)
run on the reference. The torch references (kernels/reference.py) are the spec; every Triton
kernel (kernels/<op>.py) is tested against its reference. Where Triton is not installed (it
ships for Linux x86-64), the references serve alone.
"""

import importlib
import os

from protloc.errors import ProtlocError
from protloc.kernels.reference import attention_torch, patch_embed_torch

BACKENDS = ("auto", "triton", "torch")

# op name -> its Triton kernel module (kernels/<op>.py), for the kernels this install can run
TRITON_OPS = {}
for _op in ("patch_embed", "attention"):
    try:
        TRITON_OPS[_op] = importlib.import_module(f"protloc.kernels.{_op}")
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise


def backend(op, tensor):
    """The backend that runs `op` on `tensor`: 'triton' or 'torch'. A PROTLOC_BACKEND the install cannot honour
    is the user's to fix: ProtlocError."""
    choice = os.environ.get("PROTLOC_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ProtlocError(f"PROTLOC_BACKEND={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if op not in TRITON_OPS:
            raise ProtlocError(f"PROTLOC_BACKEND=triton: this install has no Triton kernel for {op} "
                               "(is triton installed?)")
        return "triton"
    return "triton" if op in TRITON_OPS and tensor.is_cuda else "torch"


def patch_embed(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed=None):
    """Pixels (B, C, H, W) -> tokens (B, 1 + T, D); shapes in kernels/reference.py.

    The Triton kernel takes patch sizes 8, 16, 24, 32, ... (p * p a multiple of 64; protloc's
    models have 8 or 16); others run on the torch path."""
    use_triton = (backend("patch_embed", pixels) == "triton"
                  and TRITON_OPS["patch_embed"].takes_patch(weight.shape[-1]))
    fn = TRITON_OPS["patch_embed"].patch_embed_triton if use_triton else patch_embed_torch
    return fn(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed)


def attention(q, k, v, cu_seqlens, max_seqlen):
    """Packed varlen attention, (total, H, Dh) -> (total, H, Dh); shapes in kernels/reference.py.

    The Triton kernel takes head dims 32, 64 and 128 (every protloc architecture has 64); others
    run on the torch path."""
    use_triton = backend("attention", q) == "triton" and q.shape[-1] in TRITON_OPS["attention"].HEAD_DIMS
    fn = TRITON_OPS["attention"].attention_triton if use_triton else attention_torch
    return fn(q, k, v, cu_seqlens, max_seqlen)


__all__ = ["BACKENDS", "TRITON_OPS", "attention", "attention_torch", "backend", "patch_embed", "patch_embed_torch"]
