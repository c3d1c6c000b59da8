"""Row ids and stems (protloc/ids.py), and the decision rule and scores (moved to protloc/folds.py)."""

import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score

from protloc.cells import find_mask
from protloc.cli import main
from protloc.errors import ProtlocError
from protloc.folds import metrics, per_class_f1, predict
from protloc.ids import (cell_id, check_image_id, file_stem, group_stem, image_of, parse, split_fragment, stem,
                         tile_id)
from protloc.labels import match_rows, read_labels
from protloc.sources import discover
from protloc.tiles import mean_per_image

RANDOM = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


# image ids as users name files: any characters, '#' and '=' included
names = st.text(st.sampled_from("ab#=_./0123456789tilecT"), min_size=1, max_size=20)


@given(image=names, k=st.integers(0, 10**6))
@settings(max_examples=300, deadline=None)
def test_row_ids_round_trip(image, k):
    for make, kind in ((tile_id, "tile"), (cell_id, "cell")):
        row = make(image, k)
        assert parse(row) == (image, kind, k)  # the image's own fragment, if any, stays in its name
        assert split_fragment(row) == (image, f"#{kind}={k}") and image_of(row) == image
    try:
        check_image_id(image)
    except ProtlocError:  # an image named like a view: refused, as its own row would be misread
        assert parse(image)[1] is not None
    else:
        assert parse(image) == (image, None, None) and image_of(image) == image


def test_a_hash_in_a_file_name_is_part_of_the_name():
    assert parse("d/a#1.tif") == ("d/a#1.tif", None, None)
    assert parse("d/a#tile=2.tif#cell=7") == ("d/a#tile=2.tif", "cell", 7)
    assert parse("d/x#tile=3#tile=0") == ("d/x#tile=3", "tile", 0)  # tile 0 of the image x#tile=3
    assert parse("d/a.tif#tile=") == ("d/a.tif#tile=", None, None) and parse("d/a.tif#tiles=1")[1] is None


def test_stems_and_extensions():
    assert stem("d/X_gfp.OME.TIF") == "d/X_gfp" and stem("d/a.ome.tiff") == "d/a" and stem("d/a.png") == "d/a.png"
    assert stem("d/a.b.Tiff") == "d/a.b" and file_stem("d/a#1.ome.tif") == "a#1" and file_stem("d/X") == "X"
    assert group_stem("d/X_GFP.tif", ["rfp", "gfp"]) == ("d/X", 1)
    assert group_stem("d/a_b_rfp.ome.tif", ["rfp", "b_rfp"]) == ("d/a", 1)  # the longest suffix wins
    assert group_stem("d/a_rfp.png", ["rfp"]) == ("d/a", 0)  # a file named outside TIFF loses its own extension
    assert group_stem("d/_gfp.tif", ["gfp"]) is None and group_stem("d/X_dapi.tif", ["gfp"]) is None


def test_image_named_like_a_view_is_refused(tmp_path):
    pixels = np.zeros((2, 16, 16), np.uint16)
    tifffile.imwrite(tmp_path / "x#tile=3", pixels)
    with pytest.raises(ProtlocError, match=r"x#tile=3: an image name ending in #tile=K"):
        discover([str(tmp_path / "x#tile=3")])
    group = tmp_path / "group"
    group.mkdir()
    for s in ("gfp", "rfp"):
        tifffile.imwrite(group / f"X#cell=2_{s}.tif", pixels[0])
    result = run(["embed", group, "--channel-suffixes", "gfp,rfp", *RANDOM, "-o", tmp_path / "e.npy"])
    assert result.exit_code == 1 and not (tmp_path / "e.npy").exists()
    assert result.stderr.strip().splitlines() == [
        f"protloc: error: {group / 'X#cell=2'}: an image name ending in #tile=K or #cell=K would read as a tile or "
        "cell of another image; rename the file"]


def test_hash_file_names_through_embed_labels_and_masks(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a#1.tif", "b#tile.tif"):
        tifffile.imwrite(data / name, rng.integers(0, 4000, (2, 32, 32)).astype(np.uint16))
    out = tmp_path / "tiles.npz"
    result = run(["embed", data, *RANDOM, "--tile", "16", "-o", out])
    assert result.exit_code == 0, result.output
    with np.load(out) as z:
        ids, x = [str(i) for i in z["ids"]], z["embeddings"]
        assert json.loads(str(z["meta"]))["tile"] == 16
    a, b = str(data / "a#1.tif"), str(data / "b#tile.tif")
    assert ids == [tile_id(a, k) for k in range(4)] + [tile_id(b, k) for k in range(4)]
    assert [i for batch, _ in mean_per_image(iter([(ids, x)])) for i in batch] == [a, b]

    (tmp_path / "labels.csv").write_text("path,label\ndata/a#1.tif,nucleus\ndata/b#tile.tif#tile=1,er\n")
    matched = match_rows(ids, read_labels(tmp_path / "labels.csv"))
    assert matched.ids == ids[:4] + [ids[5]]  # the image label covers its tiles; the tile label only its tile
    assert [matched.classes[j] for j in matched.y.argmax(1)] == ["nucleus"] * 4 + ["er"]

    masks = tmp_path / "masks"
    masks.mkdir()
    tifffile.imwrite(masks / "a#1_cp_masks.tif", np.zeros((32, 32), np.uint16))
    assert find_mask(a, str(masks)) == str(masks / "a#1_cp_masks.tif")
    assert find_mask(a, str(masks / "{stem}_cp_masks.tif")) == str(masks / "a#1_cp_masks.tif")


def test_decision_rule():
    scores = np.array([[0.2, 0.5, 0.3], [0.4, 0.3, 0.3], [0.6, 0.7, 0.1]])
    np.testing.assert_array_equal(predict(scores, multilabel=False), [[0, 1, 0], [1, 0, 0], [0, 1, 0]])
    # multi-label: every class at 0.5 or more; a row none reaches gets its top class
    np.testing.assert_array_equal(predict(scores, multilabel=True), [[0, 1, 0], [1, 0, 0], [1, 1, 0]])
    assert predict(scores, multilabel=True).dtype == np.uint8


@given(seed=st.integers(0, 10**6), multilabel=st.booleans())
@settings(max_examples=60, deadline=None)
def test_scores_agree_with_scikit_learn(seed, multilabel):
    """With every class scored, macro F1 is scikit-learn's over the classes in the truth, and
    accuracy its (subset) accuracy; an unscored class leaves its rows out."""
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(2, 30)), int(rng.integers(2, 5))
    if multilabel:
        t, p = rng.integers(0, 2, (n, c)), rng.integers(0, 2, (n, c))
    else:
        t, p = np.eye(c, dtype=int)[rng.integers(0, c, n)], np.eye(c, dtype=int)[rng.integers(0, c, n)]
    got = metrics(t, p)
    if not t.any():
        assert got is None
        return
    kept = t.any(1)
    present = np.flatnonzero(t[kept].any(0))
    want_f1 = f1_score(t[kept], p[kept], labels=present, average="macro", zero_division=0)
    assert got == pytest.approx((want_f1, accuracy_score(t[kept], p[kept])))
    np.testing.assert_allclose(per_class_f1(t, p)[present], f1_score(t[kept], p[kept], labels=present,
                                                                     average=None, zero_division=0))
    scored = np.ones(c, bool)
    scored[0] = False
    rows = t[:, 1:].any(1)
    got = metrics(t, p, scored)
    if not rows.any():
        assert got is None
        return
    assert np.isnan(per_class_f1(t, p, scored)[0])
    present = 1 + np.flatnonzero(t[rows][:, 1:].any(0))
    assert got[0] == pytest.approx(f1_score(t[rows], p[rows], labels=present, average="macro", zero_division=0))
