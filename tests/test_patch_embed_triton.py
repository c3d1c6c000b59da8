"""The fused Triton patch embedding against its torch reference, forward and backward.

Without a GPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on
tiny shapes in float32, also at every GPU autotune config's block sizes; `-m gpu` runs the compiled
kernel at model shapes in every GEMM dtype. Both go through `check_against_float64`.
"""

import os

import pytest
import torch

from protloc import kernels
from protloc.kernels.reference import patch_embed_torch

triton_kernel = pytest.importorskip("protloc.kernels.patch_embed")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests (TRITON_INTERPRET=1) run on the CPU")


def make_inputs(B, C, H, W, p, D, layout, pixel_dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hi = 255 if pixel_dtype == torch.uint8 else 4095
    pixels = torch.randint(0, hi + 1, (B, C, H, W), generator=g).to(pixel_dtype)
    scale = (torch.rand(B, C, generator=g) + 0.5) / hi
    shift = torch.randn(B, C, generator=g)
    params = dict(
        weight=torch.randn(D, C if layout == "fused" else 1, p, p, generator=g) * 0.05,
        bias=torch.randn(D, generator=g),
        pos_embed=torch.randn(1 + (H // p) * (W // p), D, generator=g),
        cls_token=torch.randn(D, generator=g),
        channel_embed=torch.randn(C, D, generator=g) if layout == "channel" else None,
    )
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    params = {k: move(v) for k, v in params.items()}
    for t in params.values():
        if t is not None:
            t.requires_grad_(True)
    return move(pixels), move(scale), move(shift), params


def forward_backward(fn, pixels, scale, shift, params, grad_seed=1):
    out = fn(pixels, scale, shift, **params)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    names = [k for k, v in params.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(out, [params[k] for k in names], grad)
    return out, dict(zip(names, grads))


# max |error| allowed, relative to the reference's largest value; the 16-bit GEMMs round their
# inputs, so their errors grow with K = C * p * p
TOLERANCES = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def check_against_float64(device, dtype, B, C, H, W, p, D, layout, pixel_dtype):
    """The kernel in `dtype` (16-bit: under CUDA autocast) against the reference at float64, forward and
    backward. float64, not float32: torch lets cuDNN convolutions and matmuls use TF32 (a 10-bit
    mantissa) by default on a GPU, which puts a float32 reference's own error above the tolerance."""
    pixels, scale, shift, params = make_inputs(B, C, H, W, p, D, layout, pixel_dtype, device=device, seed=C * 10 + p)
    exact = {k: None if v is None else v.detach().double().requires_grad_() for k, v in params.items()}
    want, want_grads = forward_backward(patch_embed_torch, pixels, scale, shift, exact)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        got, got_grads = forward_backward(triton_kernel.patch_embed_triton, pixels, scale, shift, params)
    assert got.shape == want.shape and got.dtype == torch.float32
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert got_grads[name].dtype == params[name].dtype
        largest = want_grads[name].abs().max().item()
        torch.testing.assert_close(got_grads[name].double(), want_grads[name], atol=tol * largest, rtol=tol, msg=name)


@needs_interpreter
@pytest.mark.parametrize("layout", ["fused", "channel"])
@pytest.mark.parametrize("B,C,H,W,p,D,pixel_dtype", [
    (1, 1, 16, 16, 8, 16, torch.float32),
    (2, 2, 37, 29, 8, 24, torch.uint16),    # trailing pixels past the last whole patch are ignored
    (1, 3, 16, 40, 8, 40, torch.uint8),
    (1, 4, 24, 8, 8, 17, torch.float16),    # D not a multiple of the block
    (1, 5, 33, 17, 16, 24, torch.uint16),   # one 16 x 16 patch per channel: 1 + 5 tokens
    (3, 2, 48, 32, 16, 32, torch.bfloat16),
])
def test_interpreted_kernel_matches_reference(layout, B, C, H, W, p, D, pixel_dtype):
    check_against_float64("cpu", torch.float32, B, C, H, W, p, D, layout, pixel_dtype)


def pin_configs(monkeypatch, fwd, bwd):
    """Run the kernels with GPU autotune configs FWD_CONFIGS[fwd] and BWD_CONFIGS[bwd] alone: with one config
    the autotuner times nothing and runs that one, so a test checks it (autotuning checks only the fastest)."""
    monkeypatch.setattr(triton_kernel._patch_embed_fwd, "configs", [triton_kernel.FWD_CONFIGS[fwd]])
    monkeypatch.setattr(triton_kernel._patch_embed_bwd_weight, "configs", [triton_kernel.BWD_CONFIGS[bwd]])


@needs_interpreter
@pytest.mark.parametrize("layout,p,fwd,bwd", [("fused", 8, 0, 0), ("channel", 16, 1, 1), ("channel", 8, 2, 2),
                                              ("fused", 16, 3, 0)])
def test_gpu_configs_under_the_interpreter(monkeypatch, layout, p, fwd, bwd):
    """The index arithmetic at each GPU autotune config's block sizes (BLOCK_K 64 and 32 within patches of
    64 and 256 pixels), with partial row and column blocks and, but for fused p = 16, the weight gradient
    split into 2 or 3 row chunks."""
    pin_configs(monkeypatch, fwd, bwd)
    size = 96 if p == 8 else 144  # 144 or 81 patches per channel
    check_against_float64("cpu", torch.float32, 2, 2, size, size, p, 136, layout, torch.uint16)


def test_patch_sizes_the_kernel_takes_fit_every_block():
    assert triton_kernel.takes_patch(8) and triton_kernel.takes_patch(16)  # every protloc model's
    configs = triton_kernel.FWD_CONFIGS + triton_kernel.BWD_CONFIGS + triton_kernel.INTERPRETER_CONFIGS
    for p in range(1, 65):
        fits = all(p * p % c.kwargs["BLOCK_K"] == 0 for c in configs)
        assert triton_kernel.takes_patch(p) == fits, p


@pytest.mark.parametrize("p", [4, 12, 14])
def test_refuses_patch_sizes_whose_blocks_would_leave_the_patch(p, monkeypatch):
    """p * p = 16, 144, 196: a K block of 32 or 64 pixels would read past the patch and the weight."""
    pixels, scale, shift, params = make_inputs(1, 2, 2 * p, 2 * p, p, 16, "channel", torch.uint16)
    with pytest.raises(ValueError, match=f"patch size {p}"):
        triton_kernel.patch_embed_triton(pixels, scale, shift, **params)
    monkeypatch.setenv("PROTLOC_BACKEND", "triton")  # the dispatcher runs the reference instead
    torch.testing.assert_close(kernels.patch_embed(pixels, scale, shift, **params),
                               patch_embed_torch(pixels, scale, shift, **params), rtol=0, atol=0)


@needs_interpreter
def test_interpreted_kernel_takes_strided_pixels_and_skips_unneeded_grads():
    pixels = make_inputs(1, 4, 16, 24, 8, 16, "fused", torch.uint16)[0]
    view = pixels[:, 1:3, :, 8:]  # non-contiguous (1, 2, 16, 16)
    _, scale, shift, params = make_inputs(1, 2, 16, 16, 8, 16, "fused", torch.uint16)
    params["bias"].requires_grad_(False)
    want, want_grads = forward_backward(patch_embed_torch, view, scale, shift, params)
    got, got_grads = forward_backward(triton_kernel.patch_embed_triton, view, scale, shift, params)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_grads["weight"], want_grads["weight"], atol=2e-4, rtol=1e-4)


@needs_interpreter
def test_model_tokens_through_the_dispatcher(monkeypatch):
    from protloc.model import ViTConfig, VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, layout="channel", depth=1, img_size=32))
    pixels = torch.randint(0, 4096, (2, 2, 24, 16), dtype=torch.int32).to(torch.uint16)
    scale, shift = torch.full((2, 2), 1 / 4096), torch.zeros(2, 2)
    outs = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("PROTLOC_BACKEND", name)
        model.zero_grad()
        tokens = model.tokens(pixels, scale, shift, ["nucleus", "protein"])
        tokens.square().sum().backward()
        outs[name] = tokens.detach(), model.patch_embed.proj.weight.grad.clone(), model.channel_embed.grad.clone()
    for got, want in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("layout,C,p,size,fwd,bwd", [  # per dtype, every forward and backward config once
    ("fused", 2, 16, 224, 0, 0), ("fused", 4, 8, 224, 1, 1), ("channel", 2, 16, 224, 2, 2),
    ("channel", 4, 8, 96, 3, 0), ("fused", 3, 16, 97, 0, 1),
])
def test_compiled_kernel_matches_reference(monkeypatch, dtype, layout, C, p, size, fwd, bwd):
    """Pinned configs: each is checked, and the 15 cases compile 30 kernels where autotuning would compile
    all 7 configs per shape and dtype (~100 compiles, minutes of a GPU run) and check only the fastest."""
    pin_configs(monkeypatch, fwd, bwd)
    check_against_float64("cuda", dtype, 8, C, size, size, p, 384, layout, torch.uint16)
