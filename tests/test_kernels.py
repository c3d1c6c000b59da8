"""The torch references of protloc.kernels against naive, independent computations."""

import math

import numpy as np
import pytest
import torch

from protloc import kernels
from protloc.errors import ProtlocError
from protloc.kernels.reference import attention_torch, patch_embed_torch


def naive_patch_embed(pixels, scale, shift, weight, bias, pos, cls, channel_embed):
    """Loop over images, channels and patches: slow, obviously right."""
    B, C, H, W = pixels.shape
    D, _, p, _ = weight.shape
    gh, gw = H // p, W // p
    x = pixels.double() * scale.double()[:, :, None, None] + shift.double()[:, :, None, None]
    out = []
    for b in range(B):
        rows = [cls.double() + pos[0].double()]
        groups = [list(range(C))] if channel_embed is None else [[c] for c in range(C)]
        for g, chans in enumerate(groups):
            for i in range(gh):
                for j in range(gw):
                    patch = x[b, chans, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
                    t = weight.double().reshape(D, -1) @ patch + bias.double() + pos[1 + i * gw + j].double()
                    if channel_embed is not None:
                        t = t + channel_embed[g].double()
                    rows.append(t)
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["fused", "channel"])
@pytest.mark.parametrize("C,p,H,W,B,dtype", [
    (1, 8, 16, 16, 1, torch.float32),
    (2, 8, 37, 45, 2, torch.uint16),   # not multiples of the patch: trailing pixels dropped
    (3, 16, 33, 16, 1, torch.uint8),
    (4, 8, 24, 8, 3, torch.float32),
    (5, 16, 48, 32, 1, torch.uint16),
])
def test_patch_embed_matches_naive(layout, C, p, H, W, B, dtype):
    g = torch.Generator().manual_seed(C * 100 + p)
    D = 24
    hi = 255 if dtype == torch.uint8 else 4000
    pixels = torch.randint(0, hi, (B, C, H, W), generator=g).to(dtype)
    scale = torch.rand(B, C, generator=g) / hi
    shift = torch.randn(B, C, generator=g)
    weight = torch.randn(D, C if layout == "fused" else 1, p, p, generator=g) * 0.05
    bias = torch.randn(D, generator=g)
    pos = torch.randn(1 + (H // p) * (W // p), D, generator=g)
    cls = torch.randn(D, generator=g)
    chan = torch.randn(C, D, generator=g) if layout == "channel" else None
    out = patch_embed_torch(pixels, scale, shift, weight, bias, pos, cls, chan)
    T = (H // p) * (W // p) * (1 if layout == "fused" else C)
    assert out.shape == (B, 1 + T, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_patch_embed(pixels, scale, shift, weight, bias, pos, cls, chan),
                               atol=1e-4, rtol=1e-4)


def test_patch_embed_gradients_reach_weight_bias_pos_and_channel_embedding():
    pixels = torch.rand(2, 3, 16, 16)
    params = [torch.randn(8, 1, 8, 8, requires_grad=True), torch.randn(8, requires_grad=True),
              torch.randn(5, 8, requires_grad=True), torch.randn(8, requires_grad=True),
              torch.randn(3, 8, requires_grad=True)]
    w, b, pos, cls, chan = params
    patch_embed_torch(pixels, torch.ones(2, 3), torch.zeros(2, 3), w, b, pos, cls, chan).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in params)


def naive_attention(q, k, v, cu_seqlens):
    out = torch.empty_like(q)
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1).double() for t in (q, k, v))  # (H, L, Dh)
        att = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out[s:e] = (att @ vs).transpose(0, 1).to(q.dtype)
    return out


@pytest.mark.parametrize("lengths", [[1], [197, 197], [37, 1, 145, 37, 5], [17, 17, 17]])
def test_attention_matches_naive_forward_and_backward(lengths):
    g = torch.Generator().manual_seed(len(lengths))
    total, H, Dh = sum(lengths), 3, 16
    q, k, v = (torch.randn(total, H, Dh, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = attention_torch(q, k, v, cu, max(lengths))
    ref = naive_attention(q, k, v, cu)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_never_crosses_sequences():
    q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    before = attention_torch(q, k, v, cu, 6)
    v2 = v.clone()
    v2[4:] += 100.0  # change the second sequence only
    after = attention_torch(q, k, v2, cu, 6)
    torch.testing.assert_close(before[:4], after[:4])
    assert not torch.allclose(before[4:], after[4:])


def test_backend_selection(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv("PROTLOC_BACKEND", raising=False)
    assert kernels.backend("attention", t) == "torch"  # CPU tensor, no interpreter
    monkeypatch.setenv("PROTLOC_BACKEND", "torch")
    assert kernels.backend("patch_embed", t) == "torch"
    monkeypatch.setenv("PROTLOC_BACKEND", "cuda-please")
    with pytest.raises(ProtlocError, match="PROTLOC_BACKEND"):
        kernels.backend("attention", t)
    monkeypatch.setenv("PROTLOC_BACKEND", "triton")
    if "attention" not in kernels.TRITON_OPS:
        with pytest.raises(ProtlocError, match="no Triton kernel"):
            kernels.backend("attention", t)


def test_loop_bound_takes_the_interpreters_one_element_scalars():
    """A runtime scalar is a 1-element array under the interpreter; Triton 3.6 turns a loop bound into an int
    with int(array), which numpy >= 2.4 refuses. loop_bound hands `range` a Python int instead."""
    tl = pytest.importorskip("triton.language")
    from triton.runtime.interpreter import TensorHandle

    from protloc.kernels.interpreter import INTERPRETED, loop_bound

    if not INTERPRETED:
        pytest.skip("the interpreter's scalars (TRITON_INTERPRET=1)")

    bound = tl.tensor(TensorHandle(np.array([7], dtype=np.int32), tl.int32), tl.int32)
    assert list(range(0, loop_bound(bound), 3)) == [0, 3, 6]
