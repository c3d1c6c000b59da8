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

import torch
import torch.nn.functional as F


def patch_embed_torch(pixels, scale, shift, weight, bias, pos_embed, cls_token, channel_embed=None):
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
