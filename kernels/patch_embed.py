"""Fused channel-wise patch embedding: raw pixels -> normalized patches -> tokens, in one pass.

    pixels        (B, C, H, W)  uint8 / uint16 / float16 / bfloat16 / float32, any strides
    scale, shift  (B, C)        float32: the normalization x * scale + shift per (image, channel)
    weight        (D, Cg, p, p) the projection; Cg = C (`fused` layout) or 1 (`channel` layout);
                                p = 8, 16, 24, 32, ... (`takes_patch`; ValueError otherwise)
    bias          (D,)
    pos_embed     (1 + N, D)    positional embedding at this view's grid (N = H//p * W//p)
    cls_token     (D,)
    channel_embed (C, D) | None embedding of each input channel (`channel` layout)
    returns       (B, 1 + G*N, D): CLS, then G groups of N patch tokens; G = 1 (fused) or C (channel)

The spec is `patch_embed_torch` in kernels/reference.py. Done in torch this is five passes over
memory: cast, normalize, unfold+matmul (conv), add the embeddings, concatenate behind the CLS.
Here it is one GEMM whose A operand is gathered straight from the raw pixels and normalized in
registers, and whose epilogue adds bias, positional and channel embeddings and stores into the
token buffer after the CLS slot: the pixels are read once and the tokens written once.

The GEMM view, with G groups of Cg channels (fused: G = 1, Cg = C; channel: G = C, Cg = 1):
    rows  m = (b, g, t)       M = B * G * N   one token per (image, group, patch)
    cols  k = (c, y, x)       K = Cg * p * p  one pixel of the patch per channel of the group
    out[b, 1 + g*N + t, :] = A[m, :] @ weight.view(D, K).T + bias + pos[1 + t] + chan[g]

Backward (pixels, scale and shift take no gradient): d_weight = A.T @ d_out is a Triton kernel
that gathers A from the pixels again instead of materializing the unfolded patches (B*C*H*W
elements in the GEMM dtype), split over row chunks into fp32 partial sums that are added up
afterwards (deterministic, no atomics). The gradients of bias, positional, CLS and channel
embeddings are plain sums of d_out over batch, group and patch: one torch reduction over d_out.
"""

import torch
import triton
import triton.language as tl

from protloc.kernels.interpreter import INTERPRETED, loop_bound

# The GPU configs. A K block must lie within one channel's patch: BLOCK_K divides p * p (see
# `takes_patch`), else a block would read past the patch into the next channel and past the weight.
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
BWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# under the interpreter, one small config: it is ~1000x slower and autotuning there means nothing
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]
# p * p must be a multiple of the largest BLOCK_K (64; every BLOCK_K divides it)
PATCH_AREA_MULTIPLE = max(c.kwargs["BLOCK_K"] for c in FWD_CONFIGS + BWD_CONFIGS)


def takes_patch(p):
    """Whether the kernel takes patch size p (8, 16, 24, 32, ...); the same rule under the interpreter as on a GPU."""
    return p * p % PATCH_AREA_MULTIPLE == 0


@triton.jit
def _gather_patches(pixels, scale, shift, rows, row_ok, c, kk,
                    N, G, Cg, GW, s_pb, s_pc, s_ph, s_pw, P: tl.constexpr):
    """A[rows, k] for the K block of channel `c` (within the group) at pixel offsets `kk`, normalized in fp32."""
    t = rows % N  # patch
    bg = rows // N  # image * G + group
    b = bg // G
    g = bg % G
    gy = t // GW
    gx = t % GW
    channel = g * Cg + c
    base = b.to(tl.int64) * s_pb + channel * s_pc + (gy * P) * s_ph + (gx * P) * s_pw  # (BLOCK_M,)
    py = kk // P
    px = kk % P
    offsets = base[:, None] + (py * s_ph + px * s_pw)[None, :]  # (BLOCK_M, BLOCK_K)
    x = tl.load(pixels + offsets, mask=row_ok[:, None], other=0).to(tl.float32)
    norm = bg * Cg + c  # = image * C + channel: the (B, C) normalization tables are contiguous
    s = tl.load(scale + norm, mask=row_ok, other=0.0)
    sh = tl.load(shift + norm, mask=row_ok, other=0.0)
    return x * s[:, None] + sh[:, None]


@triton.autotune(configs=INTERPRETER_CONFIGS if INTERPRETED else FWD_CONFIGS, key=["K", "D", "Cg"])
@triton.jit
def _patch_embed_fwd(pixels, scale, shift, weight, bias, pos, chan, out,
                     M, N, K, D, G, Cg, GW,
                     s_pb, s_pc, s_ph, s_pw, s_ob, s_ot,
                     P: tl.constexpr, HAS_CHAN: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, loop_bound(Cg)):
        for k0 in range(0, P * P, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = _gather_patches(pixels, scale, shift, rows, row_ok, c, kk, N, G, Cg, GW, s_pb, s_pc, s_ph, s_pw, P)
            # weight is (D, K) row-major; this is its (BLOCK_K, BLOCK_N) transposed tile
            w = tl.load(weight + cols[None, :] * K + (c * P * P + kk)[:, None], mask=col_ok[None, :], other=0.0)
            acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PRECISION)
    # epilogue: + bias + positional (+ channel) embedding, stored after the CLS slot
    t = rows % N
    bg = rows // N
    b = bg // G
    g = bg % G
    ok = row_ok[:, None] & col_ok[None, :]
    acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(pos + (1 + t)[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_CHAN:
        acc += tl.load(chan + g[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    token = b.to(tl.int64) * s_ob + (1 + g * N + t) * s_ot  # (BLOCK_M,)
    tl.store(out + token[:, None] + cols[None, :], acc.to(out.dtype.element_ty), mask=ok)


@triton.autotune(configs=INTERPRETER_CONFIGS if INTERPRETED else BWD_CONFIGS, key=["K", "D", "Cg"])
@triton.jit
def _patch_embed_bwd_weight(pixels, scale, shift, grad, partial,
                            M, N, K, D, G, Cg, GW, rows_per_split,
                            s_pb, s_pc, s_ph, s_pw, s_gb, s_gt,
                            P: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[split] (K, D) = A[rows of split].T @ d_out[rows of split], A gathered from the pixels."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    c = (pid_k * BLOCK_K) // (P * P)
    kk = (pid_k * BLOCK_K) % (P * P) + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(loop_bound(start), loop_bound(stop), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < stop
        a = _gather_patches(pixels, scale, shift, rows, row_ok, c, kk, N, G, Cg, GW, s_pb, s_pc, s_ph, s_pw, P)
        t = rows % N
        bg = rows // N
        token = (bg // G).to(tl.int64) * s_gb + (1 + (bg % G) * N + t) * s_gt
        dy = tl.load(grad + token[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a.to(dy.dtype)), dy, acc, input_precision=PRECISION)
    k_rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(partial + split.to(tl.int64) * K * D + k_rows[:, None] * D + cols[None, :], acc, mask=col_ok[None, :])


def _compute_dtype(weight, device):
    """The GEMM input dtype: autocast's on CUDA when active, else the weight's."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return weight.dtype


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs; fp32 stays exact


def _shape(pixels, weight, channelwise: bool):
    B, C, H, W = pixels.shape
    D, Cg, p, _ = weight.shape
    G = C if channelwise else 1
    if G * Cg != C:
        raise ValueError(f"a projection over {Cg} channel(s) cannot embed {C}-channel images in this layout")
    if not takes_patch(p):
        raise ValueError(f"patch size {p}: the Triton kernel needs p * p to be a multiple of {PATCH_AREA_MULTIPLE} "
                         f"(patch 8, 16, 24, 32, ...); use the torch path (PROTLOC_BACKEND=torch)")
    return B, C, D, Cg, G, p, H // p, W // p


def patch_embed_forward(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed, compute_dtype):
    B, C, D, Cg, G, p, gh, gw = _shape(pixels, weight, channel_embed is not None)
    N, K = gh * gw, Cg * p * p
    out_dtype = torch.promote_types(compute_dtype, pos_embed.dtype)
    out = torch.empty(B, 1 + G * N, D, device=pixels.device, dtype=out_dtype)
    out[:, 0] = (cls_token + pos_embed[0]).to(out_dtype)  # (D,), broadcast over the batch
    M = B * G * N
    if M == 0:
        return out
    w = weight.reshape(D, K).to(compute_dtype).contiguous()
    scale, shift = scale.float().contiguous(), shift.float().contiguous()
    pos = pos_embed.contiguous()
    chan = channel_embed.contiguous() if channel_embed is not None else pos  # any pointer; unused without HAS_CHAN
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_N"]))  # noqa: E731
    _patch_embed_fwd[grid](pixels, scale, shift, w, bias.contiguous(), pos, chan, out,
                           M, N, K, D, G, Cg, gw, *pixels.stride(), out.stride(0), out.stride(1),
                           P=p, HAS_CHAN=channel_embed is not None, PRECISION=_precision(compute_dtype))
    return out


def patch_embed_weight_grad(pixels, scale, shift, grad, weight, has_chan, compute_dtype):
    """d_weight (D, Cg, p, p) in fp32 from the pixels and d_out (B, 1 + G*N, D)."""
    B, C, D, Cg, G, p, gh, gw = _shape(pixels, weight, has_chan)
    N, K = gh * gw, Cg * p * p
    M = B * G * N
    grad = grad.to(compute_dtype)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    # enough (K block, D block, row split) programs to fill the GPU, each split at least 256 rows
    sms = torch.cuda.get_device_properties(pixels.device).multi_processor_count if pixels.is_cuda else 4
    tiles = triton.cdiv(K, 64) * triton.cdiv(D, 64)
    splits = max(1, min(triton.cdiv(M, 256), triton.cdiv(4 * sms, tiles)))
    rows_per_split = triton.cdiv(M, splits)
    partial = torch.empty(splits, K, D, device=pixels.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(D, meta["BLOCK_N"]), splits)  # noqa: E731
    _patch_embed_bwd_weight[grid](pixels, scale.float().contiguous(), shift.float().contiguous(), grad, partial,
                                  M, N, K, D, G, Cg, gw, rows_per_split, *pixels.stride(), grad.stride(0),
                                  grad.stride(1), P=p, PRECISION=_precision(compute_dtype))
    return partial.sum(0).t().reshape(D, Cg, p, p)  # (K, D) -> (D, Cg, p, p)


class PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed):
        compute_dtype = _compute_dtype(weight, pixels.device)
        out = patch_embed_forward(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed,
                                  compute_dtype)
        ctx.save_for_backward(pixels, scale, shift, weight)
        ctx.compute_dtype = compute_dtype
        ctx.has_chan = channel_embed is not None
        ctx.dtypes = (bias.dtype, pos_embed.dtype, cls_token.dtype, channel_embed.dtype if ctx.has_chan else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        pixels, scale, shift, weight = ctx.saved_tensors
        B, C, D, Cg, G, p, gh, gw = _shape(pixels, weight, ctx.has_chan)
        N = gh * gw
        d_weight = d_bias = d_pos = d_cls = d_chan = None
        if ctx.needs_input_grad[3]:
            d_weight = patch_embed_weight_grad(pixels, scale, shift, grad, weight, ctx.has_chan, ctx.compute_dtype)
            d_weight = d_weight.to(weight.dtype)
        per_patch = grad[:, 1:].float().reshape(B, G, N, D).sum(0)  # (G, N, D): the one pass over d_out
        d_first = grad[:, 0].float().sum(0)  # (D,): the CLS row, = d_cls = d_pos[0]
        bias_dtype, pos_dtype, cls_dtype, chan_dtype = ctx.dtypes
        if ctx.needs_input_grad[4]:
            d_bias = per_patch.sum((0, 1)).to(bias_dtype)
        if ctx.needs_input_grad[5]:
            d_pos = torch.cat([d_first[None], per_patch.sum(0)]).to(pos_dtype)  # (1 + N, D)
        if ctx.needs_input_grad[6]:
            d_cls = d_first.to(cls_dtype)
        if ctx.has_chan and ctx.needs_input_grad[7]:
            d_chan = per_patch.sum(1).to(chan_dtype)  # (C, D)
        return None, None, None, d_weight, d_bias, d_pos, d_cls, d_chan


def patch_embed_triton(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed=None):
    """Same contract as kernels.reference.patch_embed_torch, fused (see the module docstring)."""
    return PatchEmbedFunction.apply(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed)
