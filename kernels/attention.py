"""Attention over packed variable-length sequences (DINO's multi-crop pack).

    q, k, v     (total_tokens, heads, head_dim)  sequences stored back to back
    cu_seqlens  (n_seq + 1,) int32               sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]
    max_seqlen  int                              longest sequence
    returns     (total_tokens, heads, head_dim)  non-causal; no token attends across sequences

Packing lets the 2 global and N local crops of a DINO batch (different token counts) run through
one transformer pass without padding. This torch version is the spec and the CPU path: it splits
the pack into runs of consecutive sequences of equal length (a DINO pack has two: the global
crops, then the local crops), views each run as a (n, L) batch without copying, and calls
scaled_dot_product_attention once per run; a fused varlen flash-attention kernel does the whole
pack in one launch.
"""

import torch
import torch.nn.functional as F


def attention_torch(q, k, v, cu_seqlens, max_seqlen):
    total, heads, head_dim = q.shape
    runs = []  # (sequences, length) of each run of consecutive equal-length sequences
    for L in cu_seqlens.diff().tolist():
        if runs and runs[-1][1] == L:
            runs[-1][0] += 1
        else:
            runs.append([1, L])
    rows = [n * L for n, L in runs]
    outs = []
    # split, not slicing: its backward is one concatenation, not a zero-filled full-size gradient per run
    for (n, L), qr, kr, vr in zip(runs, q.split(rows), k.split(rows), v.split(rows)):
        qb, kb, vb = (t.view(n, L, heads, head_dim).transpose(1, 2) for t in (qr, kr, vr))  # (n, H, L, Dh)
        out = F.scaled_dot_product_attention(qb, kb, vb)
        outs.append(out.transpose(1, 2).reshape(n * L, heads, head_dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
