"""The ViT: shapes and token counts per layout, DINO names, interpolation, packing."""

import pytest
import torch

from protloc.errors import ProtlocError
from protloc.model import ViTConfig, VisionTransformer


def tiny(layout="fused", channels=("nucleus", "protein"), patch=8, depth=2, **kw):
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(arch="vit_tiny", patch=patch, layout=layout, channels=list(channels),
                                       depth=depth, img_size=32, **kw)).eval()


def inputs(B, C, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=g), torch.ones(B, C), torch.zeros(B, C)


@pytest.mark.parametrize("arch,dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_arch_dims_and_dino_parameter_names(arch, dim):
    model = VisionTransformer(ViTConfig(arch=arch, patch=16, depth=1))
    names = set(model.state_dict())
    for name in ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                 "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                 "blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"]:
        assert name in names
    assert model.pos_embed.shape == (1, 1 + 14 * 14, dim)
    assert model.patch_embed.proj.weight.shape == (dim, 2, 16, 16)


@pytest.mark.parametrize("layout,C,H,W,patch,tokens", [
    ("fused", 2, 32, 32, 8, 1 + 16),
    ("fused", 2, 40, 24, 8, 1 + 5 * 3),
    ("channel", 2, 32, 32, 8, 1 + 2 * 16),
    ("channel", 3, 48, 32, 16, 1 + 3 * 6),
])
def test_token_counts(layout, C, H, W, patch, tokens):
    names = ["nucleus", "protein", "microtubules"][:C]
    model = tiny(layout, names, patch=patch)
    out = model(*inputs(2, C, H, W), channel_names=names)
    assert out.shape == (2, tokens, 192)
    assert model.embed(*inputs(2, C, H, W), channel_names=names, pool="mean").shape == (2, 192)


def test_pos_embed_interpolation():
    model = tiny()
    stored = model.pos_embed[0]
    assert torch.equal(model.pos_embed_at(4, 4), stored)  # the stored grid needs no interpolation
    assert model.pos_embed_at(7, 3).shape == (1 + 21, 192)
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.5  # bicubic interpolation keeps a constant field constant
    torch.testing.assert_close(model.pos_embed_at(9, 5)[1:], torch.full((45, 192), 0.5))
    torch.testing.assert_close(model.pos_embed_at(9, 5)[0], stored[0])


def test_packed_forward_equals_separate_forwards():
    model = tiny(depth=3)
    big, small = inputs(2, 2, 32, 32, seed=1), inputs(3, 2, 16, 16, seed=2)
    tb, ts = model.tokens(*big), model.tokens(*small)
    packed = model.forward_pack([tb, ts])
    torch.testing.assert_close(packed[0], model.forward_pack([tb])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1], model.forward_pack([ts])[0], atol=1e-5, rtol=1e-5)


def test_channel_layout_is_order_free_by_name():
    model = tiny("channel")
    pixels, scale, shift = inputs(2, 2, 32, 32)
    a = model.embed(pixels, scale, shift, ["nucleus", "protein"])
    b = model.embed(pixels.flip(1), scale, shift, ["protein", "nucleus"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    one = model.embed(pixels[:, 1:], scale[:, 1:], shift[:, 1:], ["protein"])  # any subset works
    assert one.shape == (2, 192)
    with pytest.raises(ProtlocError, match="unknown to this model"):
        model.embed(pixels, scale, shift, ["protein", "golgi_marker"])


def test_fused_layout_rejects_wrong_channel_count():
    with pytest.raises(ProtlocError, match="3 channel.*takes 2"):
        tiny()(*inputs(1, 3, 32, 32))


def test_scale_and_shift_normalize_inside_the_embedding():
    model = tiny()
    pixels = torch.rand(1, 2, 32, 32)
    raw = (pixels * 1000 + 50).to(torch.uint16)
    scale, shift = torch.full((1, 2), 1 / 1000), torch.full((1, 2), -0.05)
    torch.testing.assert_close(model.embed(raw, scale, shift),
                               model.embed(raw.float() / 1000 - 0.05, *inputs(1, 2, 1, 1)[1:]), atol=1e-5, rtol=1e-5)


def test_drop_path_acts_per_sequence_in_training_only():
    model = tiny(drop_path=0.5)
    x = inputs(4, 2, 32, 32)
    torch.testing.assert_close(model(*x), model(*x))  # eval: deterministic
    model.train()
    torch.manual_seed(1)
    a = model(*x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(*x))


@pytest.mark.parametrize("bad", [dict(arch="vit_huge"), dict(patch=12), dict(layout="early")])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ProtlocError):
        ViTConfig(**bad)
