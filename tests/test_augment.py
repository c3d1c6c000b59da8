"""DINO multi-crop: shapes, order, determinism, boxes, each augmentation's effect."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from protloc.augment import MultiCropConfig, channel_dropout, gaussian_blur, multi_crop, sample_box

SMALL = MultiCropConfig(global_size=32, local_size=16, local_crops=3)
PLAIN = dataclasses.replace(SMALL, flips=False, brightness=0.0, contrast=0.0, gamma=0.0, blur=(0.0, 0.0, 0.0),
                            noise=0.0, normalize="percentile")  # geometry only


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_images(sizes, C, seed=0):
    glob = gen(seed)
    return [torch.rand(C, h, w, generator=glob) for h, w in sizes]


@pytest.mark.parametrize("C", [1, 2, 3, 4])
@pytest.mark.parametrize("sizes", [[(40, 50)], [(40, 50), (64, 64), (33, 90)]])
def test_shapes_dtype_device(C, sizes):
    glob, loc = multi_crop(rand_images(sizes, C), SMALL, gen())
    B = len(sizes)
    assert glob.shape == (2, B, C, 32, 32) and loc.shape == (3, B, C, 16, 16)
    for t in (glob, loc):
        assert t.dtype == torch.float32 and t.device.type == "cpu" and torch.isfinite(t).all()


def test_no_local_crops():
    glob, loc = multi_crop(rand_images([(40, 40)] * 2, 2), dataclasses.replace(SMALL, local_crops=0), gen())
    assert glob.shape == (2, 2, 2, 32, 32) and loc is None


def test_same_seed_same_crops_other_seed_other_crops():
    images = rand_images([(40, 50), (60, 60)], 2)
    cfg = dataclasses.replace(SMALL, channel_dropout=0.3)
    a, b, c = (multi_crop(images, cfg, gen(s)) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
@pytest.mark.parametrize("hw", [(256, 256), (64, 64), (100, 300)])
def test_boxes_inside_image_with_area_in_range(scale, hw):
    H, W = hw
    generator = gen()
    for _ in range(300):
        top, left, h, w = sample_box(H, W, scale, generator=generator)
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W and h > 0 and w > 0
        slack = 0.5 * (h + w) + 0.25  # both sides are rounded to whole pixels
        fallback = (top, left) == ((H - h) // 2, (W - w) // 2) and (h == H or w == W)
        assert fallback or scale[0] * H * W - slack <= h * w <= scale[1] * H * W + slack


def test_box_fallback_is_centred_and_clipped_to_ratio():
    # no 3/4..4/3 box of 90-100 % of a 10 x 1000 image exists: centre crop of full height, ratio 4/3
    assert sample_box(10, 1000, (0.9, 1.0), generator=gen()) == (0, (1000 - 13) // 2, 10, 13)


DIHEDRAL = [lambda x, t=t, h=h, v=v: (x.transpose(-2, -1) if t else x).flip([d for d, f in ((-1, h), (-2, v)) if f])
            for t in (0, 1) for h in (0, 1) for v in (0, 1)]


def test_full_scale_global_crop_is_the_resized_image_up_to_dihedral():
    image = torch.rand(2, 32, 32, generator=gen(1))  # 32 px: every 3/4..4/3 box of the whole area rounds to 32 x 32
    cfg = dataclasses.replace(PLAIN, global_scale=(1.0, 1.0), global_size=48, flips=True)
    resized = F.interpolate(image[None], size=(48, 48), mode="bilinear", antialias=True, align_corners=False)[0]
    seen = set()
    for seed in range(40):
        glob, _ = multi_crop([image], cfg, gen(seed))
        for crop in glob[:, 0]:
            match = [i for i, f in enumerate(DIHEDRAL) if torch.allclose(crop, f(resized), atol=1e-6)]
            assert match
            seen.add(match[0])
    assert len(seen) == 8  # all flips/rotations occur


def test_without_intensity_jitter_the_value_range_is_kept():
    images = rand_images([(50, 60), (64, 64)], 3)
    cfg = dataclasses.replace(PLAIN, flips=True, blur=(1.0, 0.5, 0.5))  # resize and blur weights are >= 0
    glob, loc = multi_crop(images, cfg, gen())
    lo, hi = min(im.min() for im in images), max(im.max() for im in images)
    assert glob.min() >= lo - 1e-6 and loc.min() >= lo - 1e-6 and glob.max() <= hi + 1e-6 and loc.max() <= hi + 1e-6


def test_image_normalization_uses_each_crops_whole_image_statistics():
    images = rand_images([(50, 60), (70, 40)], 3)
    plain = dataclasses.replace(PLAIN, normalize="percentile", global_scale=(1.0, 1.0), flips=False)
    normed = dataclasses.replace(plain, normalize="image")
    raw, _ = multi_crop(images, plain, gen())
    out, _ = multi_crop(images, normed, gen())
    for b, im in enumerate(images):
        std, mean = torch.std_mean(im, dim=(-2, -1), correction=0)  # (C,): the whole image's
        torch.testing.assert_close(out[:, b], (raw[:, b] - mean[:, None, None]) / std[:, None, None])
    # crops of different content keep different means (per-crop statistics would erase that)
    bright = [torch.cat([torch.zeros(1, 40, 20), torch.ones(1, 40, 20)], dim=2)]
    halves = dataclasses.replace(normed, global_scale=(0.2, 0.3), local_crops=0)
    crops, _ = multi_crop(bright * 8, halves, gen())
    assert crops.mean(dim=(-2, -1)).std() > 0.3


@pytest.mark.parametrize("C", [1, 2, 4])
def test_channel_dropout_spares_the_protein_channel_and_one_channel(C):
    images = rand_images([(40, 40)] * 4, C)
    cfg = dataclasses.replace(SMALL, channel_dropout=1.0)
    glob, _ = multi_crop(images, cfg, gen(), protein_channel=C - 1)
    kept = glob.flatten(-2).std(-1) > 0  # (2, B, C)
    assert kept[..., C - 1].all() and kept.sum(-1).eq(1).all()  # p = 1: everything else is dropped, exactly 0
    glob, loc = multi_crop(images, cfg, gen(), protein_channel=None)
    for t in (glob, loc):
        assert (t.flatten(-2).std(-1) > 0).sum(-1).eq(1).all()
        assert t.flatten(-2).abs().amax(-1).gt(0).sum(-1).eq(1).all()


def test_channel_dropout_without_protein_keeps_different_channels():
    x = torch.ones(200, 3, 4, 4)
    kept = channel_dropout(x, 1.0, None, gen()).flatten(-2).amax(-1) > 0  # (200, 3)
    assert kept.sum(1).eq(1).all() and kept.any(0).all()


def high_frequency_energy(x):
    return (x.diff(dim=-1) ** 2).mean() + (x.diff(dim=-2) ** 2).mean()


def test_blur_reduces_high_frequency_energy():
    images = rand_images([(64, 64)] * 2, 2)
    # sigmas are in pixels of a 224-px crop: (7, 14) is 1-2 px on the 32-px global crops
    sharp = multi_crop(images, PLAIN, gen())
    blurred = multi_crop(images, dataclasses.replace(PLAIN, blur=(1.0, 1.0, 1.0), blur_sigma=(7.0, 14.0)), gen())
    for s, b in zip(sharp, blurred):
        assert high_frequency_energy(b) < 0.5 * high_frequency_energy(s)


def test_gaussian_blur_keeps_constants_and_mean():
    x = torch.rand(3, 2, 20, 20, generator=gen())
    x[0] = 0.7
    y = gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0]), radius=6)
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y.mean(), x.mean(), atol=0.02, rtol=0)


def test_small_image_upsamples_to_global_size():
    image = torch.rand(2, 64, 64, generator=gen())
    glob, loc = multi_crop([image], dataclasses.replace(PLAIN, global_size=224, local_size=96), gen())
    assert glob.shape == (2, 1, 2, 224, 224) and loc.shape == (3, 1, 2, 96, 96)
    assert glob.min() >= 0 and glob.max() <= 1 and glob.flatten(-2).std(-1).gt(0.05).all()
    glob, _ = multi_crop([image], MultiCropConfig(local_crops=0), gen())  # the full default pipeline
    assert glob.shape == (2, 1, 2, 224, 224) and torch.isfinite(glob).all()


def test_crops_are_crop_major():
    values = [0.1, 0.5, 0.9]
    images = [torch.full((2, h, w), v) for v, (h, w) in zip(values, [(40, 50), (64, 64), (30, 80)])]
    cfg = dataclasses.replace(PLAIN, flips=True, blur=(1.0, 0.5, 0.5))
    glob, loc = multi_crop(images, cfg, gen())
    want = torch.tensor(values)[:, None]  # (B, 1): crop k of image b is [k, b]
    for t in (glob, loc):
        torch.testing.assert_close(t.mean((-2, -1)), want.expand(t.shape[0], 3, 2), atol=1e-5, rtol=0)


def test_noise_is_scaled_by_the_crop_channel_std():
    images = [torch.cat([torch.rand(1, 40, 40, generator=gen(b)), torch.full((1, 40, 40), 0.3)]) for b in range(4)]
    clean, _ = multi_crop(images, PLAIN, gen())
    noisy, _ = multi_crop(images, dataclasses.replace(PLAIN, noise=0.5), gen())  # noise is drawn last: same crops
    added = (noisy - clean).flatten(-2).std(-1)  # (2, B, C)
    torch.testing.assert_close(noisy[:, :, 1], clean[:, :, 1], atol=1e-6, rtol=0)  # a flat channel stays flat
    ratio = added[..., 0] / clean.flatten(-2).std(-1)[..., 0]
    assert ratio.max() <= 0.55 and (ratio > 0).sum() >= 2 and (ratio == 0).sum() >= 1  # U(0, 0.5) * std, p = 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_crops():
    images = rand_images([(256, 256), (64, 64), (100, 300)], 2)
    cfg = dataclasses.replace(MultiCropConfig(), noise=0.0, channel_dropout=0.3)  # noise pixels differ by device
    cpu = multi_crop(images, cfg, gen())
    cuda = multi_crop([im.cuda() for im in images], cfg, gen())
    for a, b in zip(cpu, cuda):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=1e-3)
