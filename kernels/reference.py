"""The torch references of protloc.kernels: the spec every Triton kernel is tested against, and
the path on CPUs (and wherever Triton is missing). Shapes are documented on each function.
"""

import torch
import torch.nn.functional as F


def patch_embed_torch(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed=None):
    """Channel-wise patch embedding: raw pixels -> normalized patches -> tokens, CLS included.

        pixels        (B, C, H, W)  uint8 / uint16 / float; H, W cropped down to multiples of p
        scale, shift  (B, C)        float32, per-(image, channel) normalization x * scale + shift
        weight        (D, Cin, p, p) projection; Cin = C (`fused` layout) or 1 (`channel` layout)
        bias          (D,)
        pos_embed     (1 + N, D)    positional embedding at this grid (row 0 is the CLS position)
        cls_token     (D,)
        channel_embed (C, D) or None  learned embedding of each input channel's name (`channel` layout)
        returns       (B, 1 + T, D) tokens: CLS, then T = N (fused) or C * N (channel, channel-major)

    Why one function: done naively this is five passes over memory (cast, normalize, unfold, matmul,
    add embeddings, concatenate with CLS). This torch version is the spec and the CPU path; a fused
    Triton kernel reads the pixels once and writes the token buffer once.
    """
    B, C, H, W = pixels.shape
    D, c_in, p, _ = weight.shape
    gh, gw = H // p, W // p
    x = pixels[:, :, : gh * p, : gw * p].float() * scale[:, :, None, None] + shift[:, :, None, None]
    x = x.to(weight.dtype)
    if channel_embed is None:
        if c_in != C:
            raise ValueError(f"fused patch embedding takes {c_in} channels, got {C}")
        tokens = F.conv2d(x, weight, bias, stride=p)  # (B, D, gh, gw)
        tokens = tokens.flatten(2).transpose(1, 2) + pos_embed[1:]  # (B, N, D)
    else:
        if c_in != 1 or channel_embed.shape[0] != C:
            raise ValueError(f"channel-wise patch embedding needs a 1-channel projection and {C} channel embeddings")
        tokens = F.conv2d(x.reshape(B * C, 1, gh * p, gw * p), weight, bias, stride=p)  # (B*C, D, gh, gw)
        tokens = tokens.flatten(2).transpose(1, 2).reshape(B, C, gh * gw, D)  # (B, C, N, D)
        tokens = tokens + pos_embed[1:] + channel_embed[None, :, None, :]
        tokens = tokens.reshape(B, C * gh * gw, D)  # channel-major: all patches of channel 0 first
    cls = (cls_token + pos_embed[0]).to(tokens.dtype).expand(B, 1, D)
    return torch.cat([cls, tokens], dim=1)


def attention_torch(q, k, v, cu_seqlens, max_seqlen):
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
