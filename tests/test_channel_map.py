"""Channel strategies: which image channel fills which model slot, and what the model then sees."""

import numpy as np
import pytest

from protloc.channel_map import apply_plan, parse_fill, plan_channels
from protloc.errors import ProtlocError

RGB = ("microtubules", "protein", "nucleus")  # an ImageNet model read as red, green, blue
HPA = ("microtubules", "protein", "nucleus", "er")  # DINO4Cells
OPENCELL = ("nucleus", "protein")


def normalized(pixels, scale, shift):
    return pixels.astype(np.float64) * scale[:, None, None] + shift[:, None, None]


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4000, (2, 5, 6)).astype(np.uint16)
    return pixels, np.array([1 / 4000, 1 / 2000], np.float32), np.array([-0.5, 0.25], np.float32)


def test_natural_mapping_by_name_with_fills(image):
    plan = plan_channels("natural", OPENCELL, HPA)
    assert plan.slots == ("zero", 1, 0, "zero")
    assert plan.describe() == "microtubules<-zero, protein<-protein, nucleus<-nucleus, er<-zero"
    pixels, scale, shift = apply_plan(plan, *image)
    got = normalized(pixels, scale, shift)
    want = normalized(*image)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    np.testing.assert_allclose(got[2], want[0], rtol=1e-6)
    assert not got[0].any() and not got[3].any()
    assert pixels.dtype == np.uint16  # raw pixels travel on; the model normalizes them


def test_mean_and_copy_fills(image):
    pixels, scale, shift = apply_plan(plan_channels("natural", OPENCELL, RGB, fill="mean"), *image)
    got, want = normalized(pixels, scale, shift), normalized(*image)
    np.testing.assert_allclose(got[0], want.mean(axis=0), rtol=1e-5, atol=1e-6)
    plan = plan_channels("natural", OPENCELL, RGB, fill=parse_fill("copy:DAPI"))  # aliases resolve: dapi = nucleus
    assert plan.slots == (0, 1, 0)
    with pytest.raises(ProtlocError, match="has no channel er"):
        plan_channels("natural", OPENCELL, RGB, fill="copy:er")
    with pytest.raises(ProtlocError, match="expected zero, mean or copy:NAME"):
        parse_fill("copy:")


def test_replicate_cycles_and_grayscale_goes_to_every_slot():
    assert plan_channels("replicate", OPENCELL, HPA).slots == (0, 1, 0, 1)
    assert plan_channels("replicate", ("protein",), RGB).slots == (0, 0, 0)


def test_random_is_seeded_distinct_and_recorded():
    plans = {plan_channels("random", OPENCELL, HPA, seed=s).slots for s in range(20)}
    assert len(plans) > 3  # different seeds, different placements
    for slots in plans:
        assert sorted(s for s in slots if isinstance(s, int)) == [0, 1] and slots.count("zero") == 2
    assert plan_channels("random", OPENCELL, HPA, seed=7) == plan_channels("random", OPENCELL, HPA, seed=7)
    with pytest.raises(ProtlocError, match="do not fit"):
        plan_channels("random", HPA, OPENCELL)


def test_natural_without_any_shared_name_says_what_to_do():
    with pytest.raises(ProtlocError, match="--channel-strategy replicate"):
        plan_channels("natural", ("c0", "c1"), RGB, source="a.tif")


def test_identity_plan_changes_nothing(image):
    plan = plan_channels("natural", OPENCELL, OPENCELL)
    out = apply_plan(plan, *image)
    assert all(a is b for a, b in zip(out, image))
    assert plan_channels("per-channel", OPENCELL, RGB).model_channels == OPENCELL  # embed splits the channels
