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
        plan_channels("natural", ("dna", "tubb"), RGB, source="a.tif")


def test_unnamed_channels_go_in_order_when_the_count_fits():
    plan = plan_channels("natural", ("ch0", "ch1"), OPENCELL)
    assert plan.slots == (0, 1) and plan.describe() == "nucleus<-ch0, protein<-ch1"
    with pytest.raises(ProtlocError, match=r"a.tif: has 2 channel\(s\) without names"):
        plan_channels("natural", ("ch0", "ch1"), RGB, source="a.tif")


def test_identity_plan_changes_nothing(image):
    plan = plan_channels("natural", OPENCELL, OPENCELL)
    out = apply_plan(plan, *image)
    assert all(a is b for a, b in zip(out, image))
    assert plan_channels("per-channel", OPENCELL, RGB).model_channels == OPENCELL  # embed splits the channels


def test_embed_cli_with_a_foreign_rgb_backbone_under_every_strategy(tmp_path):
    """An ImageNet-style 3-channel DINO backbone on 2-channel cells: each strategy runs, prints
    its mapping on stderr and records it in the npz meta; per-channel gives D x C columns."""
    import json

    import torch
    from click.testing import CliRunner

    from protloc.cli import main
    from protloc.model import ViTConfig, VisionTransformer
    from protloc.synth import write_dataset

    write_dataset(tmp_path / "cells", n=3, size=32, seed=0)
    torch.manual_seed(0)
    rgb = VisionTransformer(ViTConfig(arch="vit_tiny", patch=16, depth=1, channels=["a", "b", "c"]))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in rgb.state_dict().items()}}, tmp_path / "dino.pth")
    expected = {
        "natural": "microtubules<-zero, protein<-protein, nucleus<-nucleus",
        "replicate": "microtubules<-nucleus, protein<-protein, nucleus<-nucleus",
        "per-channel": "per-channel: nucleus, protein, each into all 3 slots",
    }
    for strategy in ["natural", "replicate", "random", "per-channel"]:
        out = tmp_path / f"{strategy}.npz"
        result = CliRunner().invoke(main, ["embed", str(tmp_path / "cells"), "--weights", str(tmp_path / "dino.pth"),
                                           "--channel-strategy", strategy, "--workers", "0", "-o", str(out)])
        assert result.exit_code == 0, result.output
        data = np.load(out)
        meta = json.loads(str(data["meta"]))
        plans = meta["channel_strategy"]["plans"]
        assert len(plans) == 1 and f"channels ({strategy}): {plans[0]}" in result.stderr
        if strategy in expected:
            assert plans[0] == expected[strategy]
        assert meta["foreign"].startswith("DINO training checkpoint")
        assert data["embeddings"].shape == (3, 192 * (2 if strategy == "per-channel" else 1))


def test_finetune_records_the_strategy_and_predict_inherits_it(tmp_path):
    """A frozen head on a foreign backbone with --channel-strategy replicate: MODEL keeps the
    strategy, and predict views the images the same way (the probabilities match a re-embed)."""
    import torch
    from click.testing import CliRunner

    from protloc.cli import main
    from protloc.model import ViTConfig, VisionTransformer
    from protloc.synth import write_dataset

    write_dataset(tmp_path / "cells", n=8, size=32, seed=0, fields_per_protein=1)
    torch.manual_seed(0)
    rgb = VisionTransformer(ViTConfig(arch="vit_tiny", patch=16, depth=1, channels=["a", "b", "c"]))
    torch.save(rgb.state_dict(), tmp_path / "vit.pth")
    run = lambda *args: CliRunner().invoke(main, [str(a) for a in args])  # noqa: E731
    trained = run("finetune", tmp_path / "cells", "--labels", tmp_path / "cells" / "labels.csv", "--freeze",
                  "--weights", tmp_path / "vit.pth", "--channel-strategy", "replicate", "--folds", "0",
                  "--epochs", "3", "--workers", "0", "-o", tmp_path / "head.pt")
    assert trained.exit_code == 0, trained.output
    predicted = run("predict", tmp_path / "cells", "--weights", tmp_path / "head.pt", "--workers", "0")
    assert predicted.exit_code == 0, predicted.output
    embedded = run("embed", tmp_path / "cells", "--weights", tmp_path / "vit.pth", "--channel-strategy", "replicate",
                   "--workers", "0", "-o", tmp_path / "rep.npz")
    assert embedded.exit_code == 0, embedded.output
    from_embeddings = run("predict", tmp_path / "rep.npz", "--weights", tmp_path / "head.pt")
    assert from_embeddings.exit_code == 0, from_embeddings.output
    assert predicted.stdout == from_embeddings.stdout and len(predicted.stdout.splitlines()) == 9
    natural = run("predict", tmp_path / "cells", "--weights", tmp_path / "head.pt", "--workers", "0",
                  "--channel-strategy", "natural")
    assert natural.exit_code == 0 and natural.stdout != predicted.stdout  # the flag overrides the MODEL's
