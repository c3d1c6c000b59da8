"""What the model needs of each image is checked per image, before batching: an image (or its
whole-image view) smaller than one patch is an error naming it, and --on-error skip leaves out
that image only, in embed, predict, finetune (frozen and full), pretrain and attention maps.
View sizes fixed by a flag (--size, --tile, --cell-size) are checked once, naming the flag."""

import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from protloc.attention_maps import attention_maps
from protloc.checkpoint import load_checkpoint
from protloc.cli import main
from protloc.data import ViewOptions, model_view
from protloc.errors import ProtlocError
from protloc.model import ViTConfig, VisionTransformer
from protloc.sources import discover

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--arch", "vit_tiny", "--patch", "8", "--depth", "1"]
SMALL = "5x5 pixels is smaller than one 8x8 patch of the model"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write(path, size, channels=2, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    kwargs.setdefault("metadata", {"axes": "CYX"})  # as the field case: a 2 x 5 x 5 shape alone does not decide
    tifffile.imwrite(path, rng.integers(0, 4000, (channels, size, size), dtype=np.uint16), **kwargs)


@pytest.fixture
def tiny_case(tmp_path):
    """The field case img14_tiny: two 16 x 16 images and one 5 x 5 image between them, labelled."""
    folder = tmp_path / "img14_tiny"
    folder.mkdir()
    for k, (name, size) in enumerate([("a_ok", 16), ("b_small", 5), ("c_ok", 16), ("d_ok", 16), ("e_ok", 16)]):
        write(folder / f"{name}.tif", size, seed=k)
    (tmp_path / "labels.csv").write_text("path,label\nimg14_tiny/a_ok.tif,x\nimg14_tiny/b_small.tif,x\n"
                                         "img14_tiny/c_ok.tif,y\nimg14_tiny/d_ok.tif,x\nimg14_tiny/e_ok.tif,y\n")
    return folder


def test_embed_names_the_small_image_and_skip_keeps_the_others(tiny_case, tmp_path):
    files = [tiny_case / f"{n}.tif" for n in ("a_ok", "b_small", "c_ok")]  # the field case's three images
    failed = run("embed", *files, "--weights", "random", *TINY, "--workers", "0", "-o", tmp_path / "e.npy")
    assert failed.exit_code == 1
    assert failed.stderr == f"protloc: error: {files[1]}: image of {SMALL}\n"
    assert not (tmp_path / "e.npy").exists()
    # with loader workers too: the check runs where the image is decoded
    skipped = run("embed", *files, "--weights", "random", *TINY, "--workers", "2", "--on-error", "skip",
                  "-o", tmp_path / "e.npy", "--ids", tmp_path / "ids.txt")
    assert skipped.exit_code == 0, skipped.output
    assert f"protloc: warning: skipped {files[1]}: image of {SMALL}" in skipped.stderr.splitlines()
    assert np.load(tmp_path / "e.npy").shape == (2, 192)
    assert (tmp_path / "ids.txt").read_text().split() == [str(files[0]), str(files[2])]


def test_a_resized_view_is_checked_after_resizing(tiny_case, tmp_path):
    """--size makes every whole-image view SIZE x SIZE: the small image is then a valid input."""
    result = run("embed", tiny_case, "--weights", "random", *TINY, "--size", "16", "--workers", "0",
                 "-o", tmp_path / "e.npy")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "e.npy").shape == (5, 192)


@pytest.mark.parametrize("flags, message", [
    (["--size", "8"], "--size 8 is smaller than one 16x16 patch of the model"),
    (["--tile", "12"], "--tile 12 is smaller than one 16x16 patch of the model"),
])
def test_a_flag_size_smaller_than_a_patch_is_one_error(tiny_case, tmp_path, flags, message):
    result = run("embed", tiny_case, "--weights", "random", "--arch", "vit_tiny", "--patch", "16", "--depth", "1",
                 *flags, "--workers", "0", "--on-error", "skip", "-o", tmp_path / "e.npy")
    assert result.exit_code == 1 and result.stderr == f"protloc: error: {message}\n"


def test_view_options_check_fixed_sizes_against_the_patch():
    config = ViTConfig(arch="vit_tiny", patch=16, channels=["a", "b"])
    with pytest.raises(ProtlocError, match="--cell-size 12 is smaller than one 16x16 patch"):
        model_view(ViewOptions(cells="masks", cell_size=12), config)
    assert model_view(ViewOptions(cells="masks", cell_size=12, size=16), config).patch == 16  # crops resized
    assert model_view(ViewOptions(tile=8, size=32), config).patch == 16  # tiles resized
    assert model_view(ViewOptions(), config).model_channels == ("a", "b")


def test_predict_names_the_small_image_and_skip_keeps_the_others(tiny_case, tmp_path):
    model = tmp_path / "model.pt"
    made = run("finetune", tiny_case, "--labels", tmp_path / "labels.csv", "--freeze", "--weights", "random", *TINY,
               "--folds", "0", "--epochs", "2", "--workers", "0", "--on-error", "skip", "-o", model, "--quiet")
    assert made.exit_code == 0, made.output
    failed = run("predict", tiny_case, "--weights", model, "--workers", "0")
    assert failed.exit_code == 1 and failed.stderr == f"protloc: error: {tiny_case / 'b_small.tif'}: image of {SMALL}\n"
    assert failed.stdout == ""
    skipped = run("predict", tiny_case, "--weights", model, "--workers", "0", "--on-error", "skip")
    assert skipped.exit_code == 0, skipped.output
    rows = skipped.stdout.splitlines()[1:]
    assert [row.split("\t")[0] for row in rows] == [str(tiny_case / f"{n}_ok.tif") for n in "acde"]


@pytest.mark.parametrize("mode", [["--freeze"],
                                  ["--size", "16", "--epochs", "1", "--min-steps", "0", "--batch-size", "2"]],
                         ids=["freeze", "full"])
def test_finetune_names_the_small_image_and_skip_keeps_the_others(tiny_case, tmp_path, mode):
    """Full fine-tuning cuts its crops from the image at native size: a 5 x 5 image is refused
    there even with --size (its evaluation view would be resized)."""
    args = ["finetune", tiny_case, "--labels", tmp_path / "labels.csv", "--weights", "random", *TINY, *mode,
            "--folds", "0", "--workers", "0", "-o", tmp_path / "m.pt"]
    failed = run(*args)
    assert failed.exit_code == 1
    assert failed.stderr.splitlines()[-1] == f"protloc: error: {tiny_case / 'b_small.tif'}: image of {SMALL}"
    assert not (tmp_path / "m.pt").exists()
    skipped = run(*args, "--on-error", "skip", "--json", tmp_path / "m.json")
    assert skipped.exit_code == 0, skipped.output
    assert json.loads((tmp_path / "m.json").read_text())["meta"]["rows"] == 4


PRETRAIN = ["--recipe", "dino", *TINY, "--out-dim", "16", "--global-size", "16", "--local-size", "16",
            "--local-crops", "1", "--batch-size", "1", "--workers", "0", "--device", "cpu", "--warmup-epochs", "0"]


def test_pretrain_names_the_small_image_and_skip_reports_it_once(tiny_case, tmp_path):
    images = [tiny_case / f"{n}.tif" for n in ("a_ok", "b_small", "c_ok")]
    failed = run("pretrain", *images, "-o", tmp_path / "p.pt", "--steps", "6", *PRETRAIN)
    assert failed.exit_code == 1
    assert failed.stderr.splitlines()[-1] == f"protloc: error: {images[1]}: image of {SMALL}"
    # 2 epochs of 3 one-image steps: the small image's steps make no update, and it is named once
    skipped = run("pretrain", *images, "-o", tmp_path / "q.pt", "--steps", "6", *PRETRAIN, "--on-error", "skip",
                  "--log", tmp_path / "log.jsonl")
    assert skipped.exit_code == 0, skipped.output
    assert skipped.stderr.count(f"skipped {images[1]}") == 1
    assert skipped.stderr.count("every image of its batch was skipped; no update") == 2
    logged = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 4 and load_checkpoint(tmp_path / "q.pt")["step"] == 6


def test_pretraining_a_channel_layout_needs_the_same_channels_in_every_image(tmp_path):
    write(tmp_path / "a.ome.tif", 16, metadata={"axes": "CYX", "Channel": {"Name": ["nucleus", "protein"]}})
    write(tmp_path / "b.ome.tif", 16, metadata={"axes": "CYX", "Channel": {"Name": ["nucleus", "er"]}})
    result = run("pretrain", tmp_path, "-o", tmp_path / "p.pt", "--steps", "2", *PRETRAIN, "--layout", "channel",
                 "--batch-size", "2")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"protloc: error: {tmp_path / 'b.ome.tif'}: channels nucleus, er differ from the run's (nucleus, protein): "
        "training a channel-layout model takes images with the same channels; select them with --channels")


def test_attention_maps_name_the_small_image(tiny_case):
    model = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=1, channels=["ch0", "ch1"]))
    sources = discover([str(tiny_case / "a_ok.tif"), str(tiny_case / "b_small.tif")])
    with pytest.raises(ProtlocError, match=f"b_small.tif: image of {SMALL}"):
        attention_maps(model, sources, ViewOptions())
    assert len(attention_maps(model, sources, ViewOptions(size=16))) == 2


def test_a_random_backbone_takes_its_channels_from_the_first_usable_image(tiny_case, tmp_path):
    bad = tiny_case / "_broken.tif"  # sorted first
    bad.write_bytes(b"II*\x00 not a tiff at all")
    failed = run("embed", tiny_case, "--weights", "random", *TINY, "--workers", "0", "-o", tmp_path / "e.npy")
    assert failed.exit_code == 1 and failed.stderr.startswith(f"protloc: error: {bad}: ")
    skipped = run("embed", tiny_case, "--weights", "random", *TINY, "--workers", "0", "--on-error", "skip",
                  "-o", tmp_path / "e.npy")
    assert skipped.exit_code == 0, skipped.output
    assert np.load(tmp_path / "e.npy").shape == (4, 192)
