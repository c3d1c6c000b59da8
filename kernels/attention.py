"""Attention over packed variable-length sequences (DINO's multi-crop pack).

    q, k, v     (total_tokens, heads, head_dim)  sequences stored back to back
    cu_seqlens  (n_seq + 1,) int32               sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]
    max_seqlen  int                              longest sequence
    returns     (total_tokens, heads, head_dim)  non-causal; no token attends across sequences

Packing lets the 2 global and N local crops of a DINO batch (different token counts) run through
one transformer pass without padding. This torch version is the spec and the CPU path: it groups
sequences of equal length and calls scaled_dot_product_attention once per length; a fused varlen
flash-attention kernel does the whole pack in one launch.
"""

import torch
import torch.nn.functional as F


def attention_torch(q, k, v, cu_seqlens, max_seqlen):
    total, heads, head_dim = q.shape
    starts = cu_seqlens[:-1].tolist()
    lengths = cu_seqlens.diff().tolist()
    if len(set(lengths)) == 1:  # one length (a plain batch): a view, no gather
        n, L = len(lengths), lengths[0]
        qb, kb, vb = (t.view(n, L, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (n, H, L, Dh)
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(total, heads, head_dim)

    pieces, rows = [], []
    for L in sorted(set(lengths)):
        seq_starts = torch.tensor([s for s, n in zip(starts, lengths) if n == L], device=q.device)
        index = (seq_starts[:, None] + torch.arange(L, device=q.device)).reshape(-1)  # (n * L,)
        n = seq_starts.numel()
        qb, kb, vb = (t[index].view(n, L, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb)  # (n, H, L, Dh)
        pieces.append(out.transpose(1, 2).reshape(n * L, heads, head_dim))
        rows.append(index)
    order = torch.empty(total, dtype=torch.long, device=q.device)
    order[torch.cat(rows)] = torch.arange(total, device=q.device)  # where each packed row landed
    return torch.cat(pieces)[order]
