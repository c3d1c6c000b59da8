"""The Triton varlen attention kernel (kernels/attention.py) against its torch reference.

Without a GPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any
test module imports protloc, as @triton.jit reads it when the kernel module is imported) on tiny packs
in float32; `-m gpu` runs the compiled kernel at DINO shapes in float32 / float16 / bfloat16. Both go
through the same checks (`check_against_float64`, and the model test parametrized by device).
"""

import math
import os

import pytest
import torch

from protloc.kernels.reference import attention_torch
from protloc.model import ViTConfig, VisionTransformer

attn = pytest.importorskip("protloc.kernels.attention")  # the module (protloc.kernels.attention is the op)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests (TRITON_INTERPRET=1) run on the CPU")
needs_cuda = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pack(lengths, heads, head_dim, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v as the model makes them (strided views of one qkv tensor), the leaf qkv, and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, generator=g).to(device, dtype).requires_grad_()
    cu = torch.tensor([0] + lengths).cumsum(0).to(device=device, dtype=torch.int32)
    return (*qkv.unbind(1), qkv, cu)


def run(fn, lengths, heads, head_dim, **kw):
    """Output and (dq, dk, dv) of fn on a pack, for a fixed random output gradient."""
    q, k, v, qkv, cu = pack(lengths, heads, head_dim, **kw)
    out = fn(q, k, v, cu, max(lengths))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    return out, dqkv.unbind(1)


def relative_error(a, b):
    """max |a - b| / max |b|, b the reference (float64); over 1 (the scale of the random inputs) where
    max |b| is smaller: a 1-token sequence's dq and dk are exactly 0, its rounding errors are not."""
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


# max |error| / max |reference| against a float64 reference, forward and backward
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (2e-2, 3e-2)}


def check_against_float64(lengths, heads, head_dim, dtype=torch.float32, device="cpu"):
    """The kernel in `dtype` against the reference at float64, output and (dq, dk, dv)."""
    out, grads = run(attn.attention_triton, lengths, heads, head_dim, dtype=dtype, device=device)
    ref, ref_grads = run(attention_torch, lengths, heads, head_dim, dtype=torch.float64, device=device)
    fwd_tol, bwd_tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    assert relative_error(out, ref) <= fwd_tol
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.dtype == dtype
        assert relative_error(a, b) <= bwd_tol, f"d{name}"


# ------------------------------------------------------------------ host side: no kernel launch


def test_block_table_maps_programs_to_sequence_blocks():
    lengths = [37, 0, 197, 1, 64]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    grid, seq, ends = attn._block_table(cu, sum(lengths), 64)
    blocks = [s for s, L in enumerate(lengths) for _ in range(math.ceil(L / 64))]  # 1 + 0 + 4 + 1 + 1
    assert grid >= len(blocks) and seq.dtype == ends.dtype == torch.int32
    assert seq.tolist() == blocks + [len(lengths)] * (grid - len(blocks))  # spare programs: past the last sequence
    assert ends.tolist() == [1, 1, 5, 6, 7]


@pytest.mark.parametrize("shape,dtype,match", [
    ((5, 2, 48), torch.float32, "head_dim 48"),
    ((5, 2, 16), torch.float32, "head_dim 16"),
    ((5, 2, 32), torch.float64, "dtype"),
])
def test_rejects_unsupported_inputs(shape, dtype, match):
    q = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        attn.attention_triton(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5)


# ------------------------------------------------------------------ interpreter (CPU, float32)


@interpreted
@pytest.mark.parametrize("lengths,heads,head_dim", [
    ([1], 2, 32),
    ([37, 1, 5], 2, 32),
    ([17, 33, 17], 2, 32),  # lengths off the block sizes, several blocks per sequence
    ([40, 3], 2, 64),
    ([5, 0, 3], 2, 32),  # an empty sequence: no block, no program
    ([20, 1], 1, 128),
])
def test_matches_reference_forward_and_backward(lengths, heads, head_dim):
    check_against_float64(lengths, heads, head_dim)


@interpreted
def test_gpu_block_sizes_under_the_interpreter(monkeypatch):
    """The index arithmetic at the 16-bit GPU block sizes (64 x 64 forward, 32 x 64 dK/dV, 64 x 32 dQ)."""
    gpu_config = attn._config
    monkeypatch.setattr(attn, "_config", lambda d, dtype: gpu_config(d, torch.bfloat16, interpreted=False))
    check_against_float64([70, 5, 130], 1, 32)


@interpreted
def test_never_attends_across_sequences():
    q, k, v, _, cu = pack([20, 13], 2, 32)
    q, k, v = (t.detach().clone() for t in (q, k, v))
    before = attn.attention_triton(q, k, v, cu, 20)
    k[20:] += 3.0  # change the second sequence only
    v[20:] += 100.0
    after = attn.attention_triton(q, k, v, cu, 20)
    assert torch.equal(before[:20], after[:20])
    assert not torch.allclose(before[20:], after[20:])


@interpreted
def test_empty_pack():
    q = torch.zeros(0, 2, 32, requires_grad=True)
    out = attn.attention_triton(q, q, q, torch.zeros(1, dtype=torch.int32), 0)
    assert out.shape == (0, 2, 32)
    out.sum().backward()
    assert q.grad.shape == q.shape


def model_outputs_and_grads(model, token_sets):
    xs = [t.clone().requires_grad_() for t in token_sets]
    outs = model.forward_pack(xs)
    # weights on the outputs' device: a CPU vector times CUDA outputs would fail before any kernel ran
    loss = sum((o * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum() for o in outs)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, xs + params, allow_unused=True)
    return outs, grads


# device -> (architecture, token sets (crops, tokens) of two crop sizes, autocast dtype or None,
#            forward and backward tolerance on relative_error)
MODEL_CASES = {
    "cpu": ("vit_tiny", [(2, 17), (3, 5)], None, 1e-4, 1e-4),  # 3 heads x 64, float32 under the interpreter
    "cuda": ("vit_small", [(2, 197), (8, 37)], torch.bfloat16, 3e-2, 5e-2),  # 6 heads x 64, DINO's crops
}


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interpreted),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_model_forward_pack_triton_matches_torch_backend(device, monkeypatch):
    arch, crops, dtype, fwd_tol, bwd_tol = MODEL_CASES[device]
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(arch=arch, depth=2, img_size=32)).to(device)
    token_sets = [torch.randn(n, L, model.config.dim).to(device) for n, L in crops]
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PROTLOC_BACKEND", backend)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            results[backend] = model_outputs_and_grads(model, token_sets)
    (outs_t, grads_t), (outs_k, grads_k) = results["torch"], results["triton"]
    for a, b in zip(outs_k, outs_t):
        assert relative_error(a, b.double()) <= fwd_tol
    assert [a is None for a in grads_k] == [b is None for b in grads_t]
    for a, b in zip(grads_k, grads_t):
        if b is not None:
            assert relative_error(a, b.double()) <= bwd_tol


@interpreted
def test_model_pack_equals_per_crop_through_the_kernel(monkeypatch):
    monkeypatch.setenv("PROTLOC_BACKEND", "triton")
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(arch="vit_tiny", depth=1, img_size=32))
    globals_, locals_ = torch.randn(2, 17, 192), torch.randn(3, 5, 192)
    packed = model.forward_pack([globals_, locals_])
    torch.testing.assert_close(packed[0], model.forward_pack([globals_])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1], model.forward_pack([locals_])[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ GPU: the compiled kernel

GPU_SHAPES = [  # (lengths, heads, head_dim)
    ([197] * 4 + [37] * 16, 6, 64),  # DINO ViT-S: global then local crops of 2 images
    ([785, 145, 1, 1], 4, 64),  # channel-wise C = 4 global and local crops, 1-token sequences
    ([1] * 5 + [200, 37], 2, 32),
    ([197, 37, 100], 4, 128),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("lengths,heads,head_dim", GPU_SHAPES)
def test_gpu_matches_reference(lengths, heads, head_dim, dtype):
    check_against_float64(lengths, heads, head_dim, dtype, device="cuda")
