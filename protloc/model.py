"""A minimal DINO Vision Transformer with two token layouts.

Parameter names follow the DINO reference (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`) so official DINO and
DINO4Cells backbones load by name. Models pretrained with iBOT's masked-patch loss also hold
DINOv2's `mask_token` (ViTConfig.mask_token), which stands in for masked patches.

Token layouts:
- `fused`: one token per patch from all C channels (Conv over C*p*p); C is fixed by the weights.
- `channel`: each channel is patch-embedded alone by a shared 1-channel projection, plus a learned
  embedding of the channel's name (`channel_embed`, one row per name of the model's vocabulary);
  positional embeddings are shared across channels: C*N + 1 tokens. Any subset or order of
  known channels can be embedded.

The transformer runs on a *pack*: the tokens of many sequences, possibly of different lengths
(DINO's global and local crops), stored back to back as (total_tokens, D) with `cu_seqlens`.
Layer norms and MLPs are per token; attention stays within each sequence (protloc.kernels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from protloc import kernels
from protloc.channels import VOCABULARY
from protloc.errors import ProtlocError

ARCHS = {  # name -> (embedding dim, heads); depth 12 and MLP ratio 4 for all, as in DINO
    "vit_tiny": (192, 3),
    "vit_small": (384, 6),
    "vit_base": (768, 12),
}
LAYOUTS = ("fused", "channel")
PATCHES = (8, 16)  # patch sizes in pixels, those of DINO's ViTs


@dataclass
class ViTConfig:
    arch: str = "vit_small"
    patch: int = 16
    layout: str = "fused"
    channels: list[str] = field(default_factory=lambda: ["nucleus", "protein"])  # fused: input channels in order
    vocab: list[str] = field(default_factory=lambda: list(VOCABULARY))  # channel layout: names with an embedding
    # how embed, finetune and predict view images for this model unless told otherwise (the
    # pretraining recipe's, or a MODEL's views): normalization (protloc.data.NORMALIZATIONS), the
    # data set's statistics for "dataset" (protloc.dataset_stats), view size (None: native), pooling
    normalize: str = "image"
    dataset_stats: dict | None = None
    view_size: int | None = None
    pool: str = "cls"
    img_size: int = 224  # the positional grid is stored at img_size // patch and interpolated to any other
    depth: int = 12
    drop_path: float = 0.0
    mask_token: bool = False  # a learned `mask_token` for masked patches (iBOT's loss; DINOv2's name)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ProtlocError(f"unknown architecture {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.patch not in PATCHES:
            raise ProtlocError(f"patch size {self.patch} not supported; use {' or '.join(map(str, PATCHES))}")
        if self.layout not in LAYOUTS:
            raise ProtlocError(f"unknown token layout {self.layout!r}; choose from {', '.join(LAYOUTS)}")

    @property
    def dim(self) -> int:
        return ARCHS[self.arch][0]

    @property
    def heads(self) -> int:
        return ARCHS[self.arch][1]

    @property
    def in_chans(self) -> int:
        return len(self.channels) if self.layout == "fused" else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class PatchEmbed(nn.Module):
    """Holds the projection (`patch_embed.proj`, a conv's weights); protloc.kernels applies it."""

    def __init__(self, in_chans, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens, max_seqlen):
        total, dim = x.shape
        qkv = self.qkv(x).view(total, 3, self.heads, dim // self.heads)  # (total, 3, H, Dh)
        q, k, v = qkv.unbind(1)
        out = kernels.attention(q, k, v, cu_seqlens, max_seqlen)  # (total, H, Dh)
        return self.proj(out.reshape(total, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def add_residual(x, branch, cu_seqlens, max_seqlen, p, training):
    """x + branch (total, D), the branch under stochastic depth per sequence of the pack (a sequence
    is one sample): dropped with probability p, else scaled by 1 / (1 - p). One pass: the scaled
    branch is added in place of being made first; a pack of equal-length sequences (one crop size)
    scales (n_seq, L, D) views instead of repeating each sequence's factor per token."""
    if p == 0.0 or not training:
        return x + branch
    n_seq = cu_seqlens.numel() - 1
    keep = (torch.rand(n_seq, device=x.device) >= p).to(x.dtype) / (1 - p)  # (n_seq,)
    if n_seq * max_seqlen == x.shape[0]:
        return torch.addcmul(x.view(n_seq, max_seqlen, -1), branch.view(n_seq, max_seqlen, -1),
                             keep[:, None, None]).view(x.shape)
    per_token = keep.repeat_interleave(cu_seqlens.diff(), output_size=x.shape[0])  # (total,)
    return torch.addcmul(x, branch, per_token[:, None])


class Block(nn.Module):
    def __init__(self, dim, heads, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x, cu_seqlens, max_seqlen):
        p = self.drop_path_rate
        x = add_residual(x, self.attn(self.norm1(x), cu_seqlens, max_seqlen), cu_seqlens, max_seqlen, p, self.training)
        return add_residual(x, self.mlp(self.norm2(x)), cu_seqlens, max_seqlen, p, self.training)


def no_scaling(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale 1 and shift 0, each (B, C), for pixels (B, C, H, W) that arrive normalized (crops)."""
    ones = torch.ones(pixels.shape[:2], device=pixels.device)
    return ones, torch.zeros_like(ones)


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        dim, grid = config.dim, config.img_size // config.patch
        self.patch_embed = PatchEmbed(config.in_chans, dim, config.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        if config.layout == "channel":
            self.channel_embed = nn.Parameter(torch.zeros(len(config.vocab), dim))
        if config.mask_token:  # zeros, as DINOv2 initializes it
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()  # deeper blocks drop more, as in DINO
        self.blocks = nn.ModuleList(Block(dim, config.heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.config.layout == "channel":
            nn.init.trunc_normal_(self.channel_embed, std=0.02)

    @property
    def dim(self) -> int:
        return self.config.dim

    def channel_ids(self, names) -> list[int]:
        """Rows of `channel_embed` for these channel names (channel layout)."""
        unknown = [n for n in names if n not in self.config.vocab]
        if unknown:
            raise ProtlocError(f"channel(s) {', '.join(unknown)} unknown to this model "
                               f"(it knows {', '.join(self.config.vocab)}); name them with --channels")
        return [self.config.vocab.index(n) for n in names]

    def pos_embed_at(self, grid_h, grid_w):
        """The positional embedding (1 + grid_h * grid_w, D), bicubically interpolated from the stored grid."""
        pos = self.pos_embed[0]
        n = pos.shape[0] - 1
        side = math.isqrt(n)
        if (grid_h, grid_w) == (side, side):
            return pos
        patch_pos = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)  # (N, D)
        return torch.cat([pos[:1], patch_pos])

    def tokens(self, pixels, scale, shift, channel_names=None, mask=None):
        """Pixels (B, C, H, W) with per-(image, channel) scale/shift -> tokens (B, 1 + T, D).

        mask: (B, N) bool over the patch grid (N = (H // p) * (W // p)), or None. A masked patch's
        embedding is replaced by the learned mask token before the positional (and channel)
        embeddings are added, as DINOv2's `prepare_tokens_with_masks`; in the channel layout every
        channel's token at that position is masked."""
        p = self.config.patch
        B, C, H, W = pixels.shape
        if H < p or W < p:
            raise ProtlocError(f"images of {H}x{W} pixels are smaller than one {p}x{p} patch")
        channel_embed = None
        if self.config.layout == "channel":
            ids = torch.tensor(self.channel_ids(channel_names), device=pixels.device)
            channel_embed = self.channel_embed[ids]  # (C, D)
        elif C != self.config.in_chans:
            raise ProtlocError(f"images have {C} channel(s), the model takes {self.config.in_chans} "
                               f"({', '.join(self.config.channels)})")
        pos = self.pos_embed_at(H // p, W // p)
        proj = self.patch_embed.proj
        x = kernels.patch_embed(pixels, scale, shift, proj.weight, proj.bias, pos, self.cls_token[0, 0], channel_embed)
        if mask is None:
            return x
        if not self.config.mask_token:
            raise ValueError("this model has no mask token (ViTConfig.mask_token)")
        if mask.shape != (B, pos.shape[0] - 1):
            raise ValueError(f"mask of shape {tuple(mask.shape)} for {B} images of {pos.shape[0] - 1} patches")
        fill = self.mask_token + pos[1:]  # (N, D)
        if channel_embed is not None:
            fill = (channel_embed[:, None] + fill).flatten(0, 1)  # (C * N, D), channel-major as the tokens
        patches = torch.where(self.token_mask(mask, C)[..., None], fill.to(x.dtype), x[:, 1:])  # (B, T, D)
        return torch.cat([x[:, :1], patches], dim=1)

    def token_mask(self, mask, n_channels):
        """Masked patches (B, N) -> masked patch tokens (B, T): the same in the fused layout; every
        channel's token at a masked patch in the channel layout (T = n_channels * N, channel-major)."""
        return mask.repeat(1, n_channels) if self.config.layout == "channel" else mask

    def forward_pack(self, token_sets):
        """Run the transformer once over several token sets [(B_i, L_i, D)] packed together.

        Returns the normalized tokens, one (B_i, L_i, D) tensor per input set."""
        lengths = [L for x in token_sets for L in [x.shape[1]] * x.shape[0]]
        device = token_sets[0].device
        cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)  # (n_seq + 1,)
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in token_sets])  # (total, D)
        for block in self.blocks:
            x = block(x, cu_seqlens, max(lengths))
        x = self.norm(x)
        sizes = [t.shape[0] * t.shape[1] for t in token_sets]
        return [part.view(t.shape) for part, t in zip(x.split(sizes), token_sets)]

    def forward(self, pixels, scale, shift, channel_names=None):
        """Pixels (B, C, H, W) -> normalized output tokens (B, 1 + T, D)."""
        return self.forward_pack([self.tokens(pixels, scale, shift, channel_names)])[0]

    def embed(self, pixels, scale, shift, channel_names=None, pool="cls"):
        """Pixels -> one vector per image (B, D): the CLS token, or the mean of the patch tokens."""
        x = self(pixels, scale, shift, channel_names)
        if pool == "cls":
            return x[:, 0]
        if pool == "mean":
            return x[:, 1:].mean(dim=1)
        raise ValueError(f"unknown pooling {pool!r}")
