"""What the CLS token looks at: the last block's attention over the patches, per head.

DINO's famous pictures (Caron et al. 2021, Fig. 1) show, for each head of the last block, the
softmax(q k^T / sqrt(d)) row of the CLS query over the patch tokens: without labels, heads
learn to attend to the object. Here the blocks before the last run as usual (protloc.model,
through protloc.kernels); the last block's attention probabilities, which the fused attention
kernels never materialize, are recomputed in plain torch from its qkv projection.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from protloc.data import ViewOptions, load_item, model_view, usable
from protloc.model import VisionTransformer
from protloc.sources import Source


@torch.no_grad()
def cls_attention(model: VisionTransformer, pixels, scale, shift, channel_names=None) -> torch.Tensor:
    """Pixels (B, C, H, W) -> (B, heads, T) attention of the last block's CLS query over the T
    non-CLS tokens (each row of the full softmax, CLS included, sums to 1)."""
    model = model.eval()
    tokens = model.tokens(pixels, scale, shift, channel_names)  # (B, 1 + T, D)
    B, L, D = tokens.shape
    cu_seqlens = torch.arange(0, (B + 1) * L, L, device=tokens.device, dtype=torch.int32)
    x = tokens.reshape(B * L, D)
    for block in model.blocks[:-1]:
        x = block(x, cu_seqlens, L)
    last = model.blocks[-1]
    heads = last.attn.heads
    qkv = last.attn.qkv(last.norm1(x)).view(B, L, 3, heads, D // heads)
    q, k = qkv[:, 0, 0], qkv[:, :, 1]  # the CLS query (B, H, Dh); all keys (B, L, H, Dh)
    logits = torch.einsum("bhd,blhd->bhl", q.float(), k.float()) / math.sqrt(D // heads)
    return logits.softmax(dim=-1)[:, :, 1:]


@dataclasses.dataclass
class AttentionMap:
    id: str
    pixels: np.ndarray  # (C, H, W) the model's input, as it saw it (after resizing and channel mapping)
    channel_names: list[str]
    maps: np.ndarray  # (heads, grid_h, grid_w): CLS attention per patch (summed over channels in the channel layout)
    patch: int


def attention_maps(model: VisionTransformer, sources: list[Source], opts: ViewOptions,
                   device="cpu") -> list[AttentionMap]:
    """The CLS attention maps of each image (read and normalized as `protloc embed` would)."""
    config = model.config
    opts = model_view(opts, config)
    model = model.to(device)
    out = []
    for i, source in enumerate(sources):  # one at a time: images may differ in size, and there are few
        item = load_item(i, source, opts)
        usable(item, "fail")  # its warnings logged, its error raised
        pixels = torch.from_numpy(item.pixels[None]).to(device)
        scale, shift = (torch.from_numpy(v[None]).to(device) for v in (item.scale, item.shift))
        attn = cls_attention(model, pixels, scale, shift, item.channel_names)[0].cpu()  # (heads, T)
        p = config.patch
        grid_h, grid_w = item.pixels.shape[1] // p, item.pixels.shape[2] // p
        maps = attn.reshape(attn.shape[0], -1, grid_h, grid_w).sum(1)  # channel layout: C x N tokens
        out.append(AttentionMap(item.id, item.pixels.astype(np.float32), list(item.channel_names),
                                maps.numpy(), p))
    return out
