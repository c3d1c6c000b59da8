"""From sources to batches: normalization, resizing, order, grouping, errors."""

import numpy as np
import pytest
import tifffile
import torch

from protloc.data import ViewOptions, batches, load_item, loader, normalization, resize
from protloc.errors import ProtlocError
from protloc.sources import discover


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return np.stack([rng.gamma(2.0, 300.0, (40, 50)), rng.normal(1000, 50, (40, 50))]).astype(np.uint16)


def apply(pixels, method):
    scale, shift = normalization(pixels, method)
    return pixels.astype(np.float64) * scale[:, None, None] + shift[:, None, None]


def test_image_normalization_standardizes_each_channel(image):
    x = apply(image, "image")
    np.testing.assert_allclose(x.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(1, 2)), 1, atol=1e-4)


def test_percentile_normalization_maps_the_contrast_range_to_unit(image):
    x = apply(image, "percentile")
    for c in range(2):
        lo, hi = np.percentile(x[c], [1.0, 99.8])
        assert lo == pytest.approx(0, abs=1e-4) and hi == pytest.approx(1, abs=1e-4)


def test_imagenet_normalization_uses_rgb_statistics_for_three_channels():
    pixels = np.random.default_rng(1).integers(0, 255, (3, 20, 20)).astype(np.uint8)
    x01 = apply(pixels, "percentile")
    x = apply(pixels, "imagenet")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x, (x01 - mean[:, None, None]) / std[:, None, None], atol=1e-4)


def test_none_keeps_raw_values_and_constant_channels_do_not_blow_up(image):
    np.testing.assert_array_equal(apply(image, "none"), image)
    flat = np.full((1, 8, 8), 700, np.uint16)
    assert np.isfinite(apply(flat, "image")).all() and np.isfinite(apply(flat, "percentile")).all()


def test_resize():
    x = np.random.default_rng(0).random((2, 30, 50)).astype(np.float32)
    y = resize(x, 16)
    assert y.shape == (2, 16, 16) and y.dtype == np.float32
    assert resize(np.ones((1, 64, 64), np.uint16), 32).max() == pytest.approx(1.0)
    assert resize(x[:, :16, :16], 16) is not None


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(32, 32), (32, 32), (24, 40), (32, 32), (32, 32), (32, 32)]
    for i, shape in enumerate(shapes):
        tifffile.imwrite(tmp_path / f"im{i}.tif", rng.integers(0, 4000, (2, *shape)).astype(np.uint16))
    (tmp_path / "im3.tif").write_bytes(b"not a tiff")  # the broken one
    return tmp_path


def test_batches_keep_input_order_and_group_by_shape(folder):
    sources = discover([str(folder)])
    skipped = []
    out = list(batches(loader(sources, ViewOptions(), workers=0), batch_size=2, on_error="skip", skipped=skipped))
    assert [b.ids for b in out] == [[s.id for s in sources[0:2]], [sources[2].id], [s.id for s in sources[4:6]]]
    assert out[0].pixels.dtype == torch.uint16 and out[0].pixels.shape == (2, 2, 32, 32)
    assert out[1].pixels.shape == (1, 2, 24, 40)
    assert [i for i, _ in skipped] == [sources[3].id] and "im3.tif" in skipped[0][1]


def test_fail_mode_raises_on_the_bad_image(folder):
    sources = discover([str(folder)])
    with pytest.raises(ProtlocError, match="im3.tif"):
        list(batches(loader(sources, ViewOptions(size=32), workers=0), batch_size=8, on_error="fail"))


def test_worker_processes_give_the_same_items_in_order(folder):
    sources = discover([str(folder)])
    opts = ViewOptions(size=16)
    serial = list(loader(sources, opts, workers=0))
    parallel = list(loader(sources, opts, workers=2))
    assert [it.id for it in parallel] == [it.id for it in serial]
    for a, b in zip(serial, parallel):
        assert (a.error is None) == (b.error is None)
        if a.error is None:
            np.testing.assert_array_equal(a.pixels, b.pixels)
            np.testing.assert_array_equal(a.scale, b.scale)


def test_channel_selection_by_name(tmp_path):
    pixels = np.stack([np.full((16, 16), v, np.uint16) for v in (10, 20, 30)])
    path = tmp_path / "named.ome.tif"
    tifffile.imwrite(path, pixels, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP", "tubulin"]}})
    src = discover([str(path)])[0]
    item = load_item(0, src, ViewOptions(channels=("protein", "nucleus"), normalize="none"))
    assert item.channel_names == ("protein", "nucleus")
    assert item.pixels[:, 0, 0].tolist() == [20, 10]
    bad = load_item(0, src, ViewOptions(channels=("protein", "er"), normalize="none"))
    assert "3 channel" in bad.error and "named.ome.tif" in bad.error


def test_nan_pixels_are_an_error(tmp_path):
    pixels = np.ones((1, 16, 16), np.float32)
    pixels[0, 3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", pixels)
    item = load_item(0, discover([str(tmp_path / "nan.tif")])[0], ViewOptions())
    assert "NaN" in item.error


def test_channels_are_checked_against_the_model_per_image(tmp_path):
    tifffile.imwrite(tmp_path / "a.ome.tif", np.zeros((2, 16, 16), np.uint16), ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["Hoechst", "mystery"]}})
    src = discover([str(tmp_path / "a.ome.tif")])[0]
    fused = load_item(0, src, ViewOptions(model_channels=("nucleus", "protein", "er")))  # natural: by name
    assert fused.error is None and fused.pixels.shape[0] == 3 and fused.channel_names == ("nucleus", "protein", "er")
    assert fused.channel_map == "nucleus<-nucleus, protein<-zero, er<-zero"
    assert not fused.scale[1:].any() and not fused.shift[1:].any()  # empty slots read as 0 after normalization
    cycled = load_item(0, src, ViewOptions(model_channels=("nucleus", "protein", "er"), channel_strategy="replicate"))
    assert cycled.channel_map == "nucleus<-nucleus, protein<-mystery, er<-nucleus"
    foreign = load_item(0, src, ViewOptions(model_channels=("actin", "membrane")))
    assert "a.ome.tif: no channel of the image (nucleus, mystery) is one of the model's" in foreign.error
    channelwise = load_item(0, src, ViewOptions(known_channels=("nucleus", "protein")))
    assert "mystery unknown to the model" in channelwise.error
    renamed = load_item(0, src, ViewOptions(channels=("nucleus", "protein"), known_channels=("nucleus", "protein")))
    assert renamed.error is None and renamed.channel_names == ("nucleus", "protein")
