"""Fused flash attention over packed variable-length sequences (DINO's multi-crop pack), forward + backward.

    q, k, v     (total_tokens, heads, head_dim)  sequences back to back; any strides with a unit last stride
                                                 (e.g. the views of `qkv.view(total, 3, H, Dh).unbind(1)`)
    cu_seqlens  (n_seq + 1,) int32               sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]
    max_seqlen  int                              accepted for the reference's signature; unused (see the grid)
    returns     (total_tokens, heads, head_dim)  in the input dtype; non-causal, scale 1/sqrt(head_dim),
                                                 no token attends across sequences

head_dim 32, 64 or 128; float16 / bfloat16 on CUDA (float32 too, exact: tl.dot runs in IEEE fp32), float32
under the interpreter (TRITON_INTERPRET=1). Spec: `attention_torch` in kernels/reference.py.

Why fused: a DINO student batch packs 2 global crops (197 tokens) and 8 local crops (37 tokens) per image.
Padding them to one length wastes ~4.4x the attention work; the reference path (per-size SDPA) launches
once per run of equal lengths and again for every backward. Here one launch covers the whole pack, and
no program is spent on padding: the grid is (query block of a sequence, head), mapped through a small
table built on the device.

Flash attention (online softmax, fp32 accumulators): the forward never forms the (L, L) score matrix and
saves only the output and the log-sum-exp per (head, token) (fp32, in log2 units, for exp2). The backward
recomputes the probabilities block by block: a preprocess kernel forms delta = rowsum(dO * O), one kernel
per (key block, head) accumulates dK and dV over the query blocks of the same sequence, and one kernel per
(query block, head) accumulates dQ over the key blocks (no atomics: deterministic).
"""

import math

import torch
import triton
import triton.language as tl

from protloc.kernels.interpreter import INTERPRETED, loop_bound

HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634  # softmax runs in base 2 (exp2 is the fast instruction): e^x = 2^(x * log2 e)


@triton.jit
def _locate(pid, SEQ, ENDS, CU, n_seq, BLOCK: tl.constexpr):
    """Program id -> (first row of its sequence, sequence length, first row of its block within the sequence).
    Programs past the last block get length 0."""
    seq = tl.load(SEQ + pid)  # sequence of this block; n_seq for the spare programs of the grid's bound
    valid = seq < n_seq
    seq = tl.minimum(seq, n_seq - 1)
    start = tl.load(CU + seq)
    length = tl.load(CU + seq + 1) - start
    first = tl.load(ENDS + seq) - tl.cdiv(length, BLOCK)  # program id of the sequence's first block
    return start.to(tl.int64), tl.where(valid, length, 0), (pid - first) * BLOCK


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEQ, ENDS, CU, n_seq, total, qk_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    start, L, m0 = _locate(tl.program_id(0), SEQ, ENDS, CU, n_seq, BLOCK_M)
    if L == 0:
        return
    h = tl.program_id(1)
    offs_m = m0 + tl.arange(0, BLOCK_M)  # query rows within the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + start * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    k_ptrs = K + start * stride_kt + h * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]  # K^T block
    v_ptrs = V + start * stride_vt + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, loop_bound(L), BLOCK_N):
        col_ok = n0 + offs_n < L
        kt = tl.load(k_ptrs + n0 * stride_kt, mask=col_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(col_ok[None, :], s, float("-inf"))  # keys past the sequence's end
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has a valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=col_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + start * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h * total + start + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, total, stride_ot, stride_oh, stride_dot, stride_doh,
                           HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # delta = rowsum(dO * O) per (head, token): the softmax backward's dot(P, dP) row term
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < total
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + h * total + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, SEQ, ENDS, CU, n_seq, total, sm_scale, qk_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # one block of keys, all query blocks of its sequence; works with transposed scores S^T (keys x queries)
    start, L, n0 = _locate(tl.program_id(0), SEQ, ENDS, CU, n_seq, BLOCK_N)
    if L == 0:
        return
    h = tl.program_id(1)
    offs_n = n0 + tl.arange(0, BLOCK_N)  # key rows within the sequence
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < L
    k = tl.load(K + start * stride_kt + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(V + start * stride_vt + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    qt_ptrs = Q + start * stride_qt + h * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None]  # Q^T block
    do_ptrs = DO + start * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for m0 in range(0, loop_bound(L), BLOCK_M):
        q_ok = m0 + offs_m < L
        qt = tl.load(qt_ptrs + m0 * stride_qt, mask=q_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_M)
        # +inf log-sum-exp for rows past the end: their probabilities come out exactly 0
        lse = tl.load(LSE + h * total + start + m0 + offs_m, mask=q_ok, other=float("inf"))
        pt = tl.exp2(tl.dot(k, qt, input_precision=PRECISION) * qk_scale - lse[None, :])  # P^T (BLOCK_N, BLOCK_M)
        do = tl.load(do_ptrs + m0 * stride_dot, mask=q_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        delta = tl.load(DELTA + h * total + start + m0 + offs_m, mask=q_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T
        dst = pt * (dpt - delta[None, :])  # dS^T, softmax backward
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    tl.store(DK + start * stride_dkt + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + start * stride_dvt + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SEQ, ENDS, CU, n_seq, total, sm_scale, qk_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # one block of queries, all key blocks of its sequence
    start, L, m0 = _locate(tl.program_id(0), SEQ, ENDS, CU, n_seq, BLOCK_M)
    if L == 0:
        return
    h = tl.program_id(1)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + start * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + start * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + h * total + start + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + h * total + start + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + start * stride_kt + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    vt_ptrs = V + start * stride_vt + h * stride_vh + offs_n[None, :] * stride_vt + offs_d[:, None]  # V^T block
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, loop_bound(L), BLOCK_N):
        col_ok = n0 + offs_n < L
        k = tl.load(k_ptrs + n0 * stride_kt, mask=col_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        vt = tl.load(vt_ptrs + n0 * stride_vt, mask=col_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)  # keys past the end (zero keys would still score 2^-lse)
        dp = tl.dot(do, vt, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + start * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------- host side


def _config(head_dim, dtype, interpreted=INTERPRETED):
    """Block sizes and launch options: fwd (BLOCK_M, BLOCK_N), dK/dV (BLOCK_M, BLOCK_N), dQ (BLOCK_M, BLOCK_N).

    Fixed, not autotuned: the grid is built from the outer block size, and DINO's 37-token local crops
    favour small query blocks (a 128-row block would be 71% padding). Under the interpreter the blocks are
    small and unequal so that tiny test sequences exercise several blocks, partial blocks and BLOCK_M != BLOCK_N.
    """
    if interpreted:
        return dict(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16), num_warps=4, num_stages=1)
    # 8 warps for head_dim 128 and for float32 (IEEE fp32 dots run on the FMA units, operands in registers):
    # with 4, registers spill (seen compiling for sm_80 and sm_90 with ptxas)
    warps = 8 if head_dim == 128 or dtype == torch.float32 else 4
    if dtype == torch.float32:  # 2x the bytes of bf16 per tile: small tiles, shallow pipeline
        return dict(fwd=(32, 32), dkdv=(32, 32), dq=(32, 32), num_warps=warps, num_stages=2)
    return dict(fwd=(64, 64), dkdv=(32, 64), dq=(64, 32), num_warps=warps, num_stages=2 if head_dim == 128 else 3)


def _block_table(cu_seqlens, total, block, cache=None):
    """(program -> sequence) table for a grid over the blocks of `block` rows of every sequence.

    The grid takes the bound cdiv(total, block) + n_seq >= sum_i cdiv(L_i, block), known on the host
    without reading cu_seqlens (no device sync); its spare programs map to n_seq and return at once.
    Returns (grid size, seq (grid,) int32, ends (n_seq,) int32: one past each sequence's last block);
    memoized per block size in `cache` (a dict: the forward's tables serve the backward)."""
    if cache is not None and block in cache:
        return cache[block]
    n_seq = cu_seqlens.numel() - 1
    grid = triton.cdiv(total, block) + n_seq
    ends = ((cu_seqlens.diff() + block - 1) // block).cumsum(0).to(torch.int32)  # (n_seq,)
    pid = torch.arange(grid, device=cu_seqlens.device, dtype=torch.int32)
    seq = torch.searchsorted(ends, pid, right=True, out_int32=True)  # (grid,) first sequence ending after pid
    if cache is not None:
        cache[block] = grid, seq, ends
    return grid, seq, ends


def _check(q, k, v, cu_seqlens):
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention_triton: q, k, v must share a (total, heads, head_dim) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention_triton: head_dim {q.shape[-1]} not supported (supported: {HEAD_DIMS}); "
                         f"use the torch path (PROTLOC_BACKEND=torch)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention_triton: q, k, v must share a float16 / bfloat16 / float32 dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not INTERPRETED and not q.is_cuda:
        raise ValueError("attention_triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < (2 if q.shape[0] else 1) or cu_seqlens.device != q.device:
        raise ValueError("attention_triton: cu_seqlens must be a 1-d tensor of n_seq + 1 offsets on q's device")


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, cu_seqlens, tables):
    """-> o (total, H, Dh) in q's dtype, lse (H, total) float32 (log2 units)."""
    total, H, Dh = q.shape
    cfg = _config(Dh, q.dtype)
    o = torch.empty(total, H, Dh, device=q.device, dtype=q.dtype)
    lse = torch.empty(H, total, device=q.device, dtype=torch.float32)
    BM, BN = cfg["fwd"]
    grid, seq, ends = _block_table(cu_seqlens, total, BM, tables)
    sm_scale = 1.0 / math.sqrt(Dh)
    precision = "ieee" if q.dtype == torch.float32 else None  # exact fp32 dots; None: the default (16-bit)
    _fwd_kernel[(grid, H)](
        q, k, v, o, lse, seq, ends, cu_seqlens, cu_seqlens.numel() - 1, total, sm_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        HEAD_DIM=Dh, BLOCK_M=BM, BLOCK_N=BN, PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, lse


def _backward(do, q, k, v, o, lse, cu_seqlens, tables):
    """-> dq, dk, dv (total, H, Dh) in q's dtype."""
    total, H, Dh = q.shape
    cfg = _config(Dh, q.dtype)
    n_seq = cu_seqlens.numel() - 1
    sm_scale = 1.0 / math.sqrt(Dh)
    precision = "ieee" if q.dtype == torch.float32 else None
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    dq, dk, dv = (torch.empty(total, H, Dh, device=q.device, dtype=q.dtype) for _ in range(3))

    delta = torch.empty_like(lse)  # (H, total) float32
    PRE = 64
    _bwd_preprocess_kernel[(triton.cdiv(total, PRE), H)](
        o, do, delta, total, o.stride(0), o.stride(1), do.stride(0), do.stride(1), HEAD_DIM=Dh, BLOCK=PRE)

    BM, BN = cfg["dkdv"]
    grid, seq, ends = _block_table(cu_seqlens, total, BN, tables)
    _bwd_dkdv_kernel[(grid, H)](
        q, k, v, do, dk, dv, lse, delta, seq, ends, cu_seqlens, n_seq, total, sm_scale, sm_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        HEAD_DIM=Dh, BLOCK_M=BM, BLOCK_N=BN, PRECISION=precision, **launch)

    BM, BN = cfg["dq"]
    grid, seq, ends = _block_table(cu_seqlens, total, BM, tables)
    _bwd_dq_kernel[(grid, H)](
        q, k, v, do, dq, lse, delta, seq, ends, cu_seqlens, n_seq, total, sm_scale, sm_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1),
        HEAD_DIM=Dh, BLOCK_M=BM, BLOCK_N=BN, PRECISION=precision, **launch)
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        ctx.empty = q.shape[0] == 0
        if ctx.empty:  # nothing to launch
            return torch.empty_like(q)
        ctx.tables = {}  # block size -> program table, built once per call
        o, lse = _forward(q, k, v, cu_seqlens, ctx.tables)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        return o

    @staticmethod
    def backward(ctx, do):
        if ctx.empty:
            return torch.zeros_like(do), torch.zeros_like(do), torch.zeros_like(do), None
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(_unit_last_stride(do), q, k, v, o, lse, cu_seqlens, ctx.tables)
        return dq, dk, dv, None


def attention_triton(q, k, v, cu_seqlens, max_seqlen):
    """Packed varlen attention, (total, H, Dh) -> (total, H, Dh); the same contract as `attention_torch`."""
    _check(q, k, v, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    return _VarlenAttention.apply(q, k, v, cu_seqlens.contiguous())
