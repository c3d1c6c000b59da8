"""The image pipeline that pretraining and full fine-tuning share: how training reads an image
(augment.crop_view), decodes batches of indices (data.index_batches), brings pixels to the device
normalized (data.on_device), spares the protein channel (augment.protein_channel), embeds crops
that arrive normalized (model.no_scaling) and the precision it runs at (device.autocast)."""

import contextlib
import dataclasses

import numpy as np
import pytest
import tifffile
import torch

from protloc.augment import crop_view, protein_channel
from protloc.data import ViewOptions, index_batches, load_item, model_view, on_device
from protloc.device import autocast
from protloc.model import ViTConfig, VisionTransformer, no_scaling
from protloc.sources import discover


@pytest.fixture
def sources(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(5):
        tifffile.imwrite(tmp_path / f"i{k}.tif", rng.integers(0, 4000, (2, 20, 24 + k), dtype=np.uint16))
    return discover([str(tmp_path)])


@pytest.mark.parametrize("normalize, loader", [("image", "percentile"), ("percentile", "percentile"),
                                               ("dataset", "dataset")])
def test_crop_view_reads_whole_native_images_as_the_model_requires(normalize, loader):
    fused = ViTConfig(arch="vit_tiny", patch=8, depth=1, channels=["nucleus", "protein"])
    view = crop_view(ViewOptions(size=32, normalize=normalize), fused, ["nucleus", "protein"])
    assert view == dataclasses.replace(model_view(ViewOptions(normalize=loader), fused), size=None)
    assert view.model_channels == ("nucleus", "protein") and view.same_channels is None and view.patch == 8
    channel = dataclasses.replace(fused, layout="channel")
    view = crop_view(ViewOptions(normalize=normalize), channel, ["protein", "er"])
    assert view.same_channels == ("protein", "er") and view.model_channels is None
    assert view.known_channels == tuple(channel.vocab)


def test_index_batches_decode_each_list_of_indices_in_order(sources):
    lists = [[3, 0], [4], [1, 2, 3]]
    for workers in (0, 1):
        got = [[item.index for item in items] for items in index_batches(sources, ViewOptions(), lists, workers)]
        assert got == lists


def test_on_device_applies_each_images_normalization(sources):
    opts = ViewOptions(normalize="percentile", channels=("nucleus", "protein"))
    items = [load_item(i, sources[i], opts) for i in (0, 2)]
    images, names = on_device(items, torch.device("cpu"))
    assert names == ["nucleus", "protein"] and on_device([], torch.device("cpu")) == ([], [])
    for item, image in zip(items, images):
        want = item.pixels.astype(np.float32) * item.scale[:, None, None] + item.shift[:, None, None]
        assert image.dtype == torch.float32 and image.shape == item.pixels.shape
        np.testing.assert_allclose(image.numpy(), want, rtol=1e-6)


def test_protein_channel_is_found_by_name():
    assert protein_channel(("nucleus", "protein")) == 1 and protein_channel(["protein"]) == 0
    assert protein_channel(("nucleus", "er")) is None and protein_channel(()) is None


def test_crops_that_arrive_normalized_embed_as_given_with_unit_scale():
    model = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=1, channels=["a", "b"])).eval()
    crops = torch.randn(3, 2, 16, 16)
    scale, shift = no_scaling(crops)
    assert torch.equal(scale, torch.ones(3, 2)) and torch.equal(shift, torch.zeros(3, 2))
    with torch.no_grad():
        torch.testing.assert_close(model.embed(crops, scale, shift), model.embed(crops * 2 - 1, scale * 0.5,
                                                                                 scale * 0.5))


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the context is built, not entered
def test_autocast_is_bf16_on_a_gpu_and_nothing_on_the_cpu():
    assert isinstance(autocast(torch.device("cpu")), contextlib.nullcontext)
    context = autocast(torch.device("cuda"))
    assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
