"""Single cells from masks: crops centred and ordered by label, the border, pixels outside the cell,
the meta, which mask goes with an image, synth --masks, per-cell labels, and the commands."""

import json
import logging

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import ndimage

from protloc import synth
from protloc.cells import cut_cells, find_mask, image_sources, measure, read_mask
from protloc.checkpoint import load_checkpoint
from protloc.cli import main
from protloc.data import ViewOptions, load_item, loader
from protloc.errors import ProtlocError
from protloc.labels import match_rows, read_labels
from protloc.sources import discover

RANDOM = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def positions(height=40, width=50):
    """A 2-channel image whose pixel (y, x) holds 100 y + x (+ 5000 in channel 1): a crop shows where it lies."""
    yy, xx = np.mgrid[:height, :width]
    base = (yy * 100 + xx).astype(np.uint16)
    return np.stack([base, base + 5000])


def three_cells():
    mask = np.zeros((40, 50), np.int64)
    mask[20:27, 30:35] = 9  # centroid (23, 32)
    mask[10:14, 10:16] = 3  # centroid (11.5, 12.5): the crop centres on (12, 13)
    mask[28:33, 12:19] = 5  # centroid (30, 15)
    return mask


@pytest.mark.parametrize("size", [7, 8])
def test_cells_are_centred_and_ordered_by_mask_label_with_their_meta(size):
    pixels, mask = positions(), three_cells()
    cells = cut_cells(pixels, mask, size)
    assert [c.label for c in cells] == [3, 5, 9]
    for cell in cells:
        ys, xs = np.nonzero(mask == cell.label)
        cy, cx = ys.mean(), xs.mean()
        assert cell.meta["label"] == cell.label and cell.meta["centroid"] == pytest.approx([cy, cx])
        assert cell.meta["bbox"] == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
        y, x = int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))
        assert cell.pixels.shape == (2, size, size) and cell.pixels.dtype == np.uint16
        assert cell.pixels[:, size // 2, size // 2].tolist() == [100 * y + x, 100 * y + x + 5000]  # the centroid
        assert cell.meta["origin"] == [y - size // 2, x - size // 2]
        np.testing.assert_array_equal(cell.pixels, pixels[:, y - size // 2:y - size // 2 + size,
                                                          x - size // 2:x - size // 2 + size])
    labels, centroids, bboxes = measure(mask)
    assert labels.tolist() == [3, 5, 9] and bboxes.tolist() == [c.meta["bbox"] for c in cells]


def border_cells():
    mask = np.zeros((40, 50), np.int64)
    mask[0:4, 20:26] = 1  # touches the top border
    mask[6:9, 45:48] = 2  # inside, but a 12-px crop around (7, 46) reaches past the right border
    mask[18:24, 20:26] = 4  # inside, with neighbour 6 touching it
    mask[18:24, 26:28] = 6
    return mask


def test_border_skip_or_pad():
    pixels, mask = positions(), border_cells()
    assert [c.label for c in cut_cells(pixels, mask, 12)] == [4, 6]  # skip is the default
    one, two, four, _ = cut_cells(pixels, mask, 12, border="pad")
    assert one.meta["origin"] == [-4, 17]  # centroid (1.5, 22.5) -> (2, 23)
    assert (one.pixels[:, :4] == 0).all()
    np.testing.assert_array_equal(one.pixels[:, 4:], pixels[:, 0:8, 17:29])
    assert two.meta["origin"] == [1, 40] and (two.pixels[:, :, 10:] == 0).all()
    np.testing.assert_array_equal(two.pixels[:, :, :10], pixels[:, 1:13, 40:50])
    np.testing.assert_array_equal(four.pixels, cut_cells(pixels, mask, 12)[0].pixels)  # inside: no padding


def test_mask_outside_zeroes_background_and_neighbours():
    pixels, mask = positions(), border_cells()
    four, six = cut_cells(pixels, mask, 12, mask_outside=True)
    assert four.meta["origin"] == [15, 17]  # centroid (20.5, 22.5) -> (21, 23)
    inside = mask[15:27, 17:29] == 4
    window = pixels[:, 15:27, 17:29]
    assert (four.pixels[:, ~inside] == 0).all() and (window[:, ~inside] > 0).all()
    np.testing.assert_array_equal(four.pixels[:, inside], window[:, inside])
    assert (mask[15:27, 17:29] == 6).any()  # the neighbour was in the crop, and is gone
    padded = cut_cells(pixels, mask, 12, mask_outside=True, border="pad")[0]
    assert padded.meta["origin"] == [-4, 17] and (padded.pixels[:, :4] == 0).all()  # padding stays 0
    assert padded.pixels[0][padded.pixels[0] > 0].size == (mask == 1).sum()  # only cell 1's pixels remain


def write_image(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, pixels)
    return path


def test_loader_cuts_cells_with_the_whole_images_statistics(tmp_path):
    pixels = np.random.default_rng(0).integers(1, 4000, (2, 40, 50)).astype(np.uint16)
    write_image(tmp_path / "a.tif", pixels)
    write_image(tmp_path / "masks" / "a_cp_masks.tif", border_cells().astype(np.uint16))
    sources = image_sources(discover([str(tmp_path)]), str(tmp_path / "masks"))
    assert [s.id for s in sources] == [str(tmp_path / "a.tif")]  # the mask among DATA is not an image
    whole = load_item(0, sources[0], ViewOptions())
    views = list(loader(sources, ViewOptions(cells=str(tmp_path / "masks"), cell_size=12, size=16), workers=0))
    assert [v.id for v in views] == [f"{whole.id}#cell={k}" for k in (4, 6)]
    assert all(v.pixels.shape == (2, 16, 16) for v in views)  # --size resizes each crop
    np.testing.assert_array_equal(views[1].scale, whole.scale)
    np.testing.assert_array_equal(views[1].shift, whole.shift)
    assert [v.meta for v in views] == [c.meta for c in cut_cells(pixels, border_cells(), 12)]
    unresized = list(loader(sources, ViewOptions(cells=str(tmp_path / "masks"), cell_size=12), workers=0))
    np.testing.assert_array_equal(unresized[0].pixels, pixels[:, 15:27, 17:29])


def test_which_mask_goes_with_an_image(tmp_path):
    masks = tmp_path / "masks"
    for name in ("a.tif", "b_mask.tiff", "x_cp_masks.tif"):
        write_image(masks / name, np.zeros((4, 4), np.uint16))
    assert find_mask(str(tmp_path / "a.tif"), str(masks)) == str(masks / "a.tif")
    assert find_mask(str(tmp_path / "deep" / "b.ome.tif"), str(masks)) == str(masks / "b_mask.tiff")
    assert find_mask(str(tmp_path / "x"), str(masks)) == str(masks / "x_cp_masks.tif")  # a channel group's stem
    with pytest.raises(ProtlocError, match=r"c.tif: no mask .*masks/c\{\.tif,\.tiff,_mask\.tif"):
        find_mask(str(tmp_path / "c.tif"), str(masks))
    write_image(masks / "a_labels.tif", np.zeros((4, 4), np.uint16))
    with pytest.raises(ProtlocError, match="several masks"):
        find_mask(str(tmp_path / "a.tif"), str(masks))
    # a pattern: {dir} is the image's folder, {stem} its name; glob characters allowed
    seg = write_image(tmp_path / "sub" / "c_seg1.tif", np.zeros((4, 4), np.uint16))
    assert find_mask(str(tmp_path / "sub" / "c.tif"), "{dir}/{stem}_seg1.tif") == str(seg)
    assert find_mask(str(tmp_path / "sub" / "c.tif"), "{dir}/{stem}_seg*.tif") == str(seg)
    with pytest.raises(ProtlocError, match="no mask"):
        find_mask(str(tmp_path / "sub" / "d.tif"), "{dir}/{stem}_seg*.tif")


def test_masks_are_not_images_and_stems_must_be_unique(tmp_path):
    for name in ("a.tif", "sub/b.tif", "sub/b_seg.tif"):
        write_image(tmp_path / name, np.zeros((2, 8, 8), np.uint16))
    sources = discover([str(tmp_path)])
    assert [s.id for s in image_sources(sources, "{dir}/{stem}_seg.tif")] == \
        [str(tmp_path / "a.tif"), str(tmp_path / "sub" / "b.tif")]
    with pytest.raises(ProtlocError, match="none of them"):
        image_sources(sources, str(tmp_path / "nowhere"))
    # Cellpose's layout: X_cp_masks.tif beside X.tif, MASKS the images' own folder
    write_image(tmp_path / "sub" / "b_cp_masks.tif", np.zeros((8, 8), np.uint16))
    assert [s.id for s in image_sources(discover([str(tmp_path / "sub")]), str(tmp_path / "sub"))] == \
        [str(tmp_path / "sub" / "b.tif"), str(tmp_path / "sub" / "b_seg.tif")]  # b_seg has no mask: fails when read
    write_image(tmp_path / "other" / "a.tif", np.zeros((2, 8, 8), np.uint16))
    write_image(tmp_path / "masks" / "a.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(ProtlocError, match="other/a.tif: takes the mask .*masks/a.tif of .*/a.tif"):
        image_sources(discover([str(tmp_path)]), str(tmp_path / "masks"))


def test_bad_masks_name_the_file(tmp_path):
    path = write_image(tmp_path / "m.tif", np.zeros((10, 12), np.uint16))
    with pytest.raises(ProtlocError, match=r"m.tif: mask is 10x12 pixels but image a.tif is 10x10"):
        read_mask(str(path), (10, 10), "a.tif", 10**9)
    write_image(path, np.full((10, 10), 1.5, np.float32))
    with pytest.raises(ProtlocError, match="m.tif: .*fractional"):
        read_mask(str(path), (10, 10), "a.tif", 10**9)
    write_image(path, np.zeros((3, 10, 10), np.uint16))
    with pytest.raises(ProtlocError, match="m.tif: .*2-D"):
        read_mask(str(path), (10, 10), "a.tif", 10**9)
    path.write_bytes(b"not a tiff")
    with pytest.raises(ProtlocError, match="m.tif: not a readable TIFF mask"):
        read_mask(str(path), (10, 10), "a.tif", 10**9)
    write_image(path, np.full((10, 10), 2.0, np.float32))
    assert read_mask(str(path), (10, 10), "a.tif", 10**9).dtype == np.int64  # integral floats are labels


def test_synth_masks_round_trip(tmp_path):
    """Every synthetic cell has one label, at its place: its centre carries it, its nucleus lies in it."""
    result = run(["synth", tmp_path / "s", "--n", "6", "--size", "96", "--seed", "2", "--masks"])
    assert result.exit_code == 0, result.output
    for i in range(6):
        name = f"field_{i:05d}.tif"
        mask = tifffile.imread(tmp_path / "s" / "masks" / name)
        assert mask.dtype == np.uint16 and mask.shape == (96, 96)
        cells = synth._cells(np.random.default_rng(np.random.SeedSequence([2, i])), 96)  # the field's first draw
        assert np.unique(mask).tolist() == list(range(len(cells) + 1))  # 0 = background, one label per cell
        nucleus = ndimage.gaussian_filter(tifffile.imread(tmp_path / "s" / name)[0].astype(float), 1.5)
        background = np.median(nucleus)
        bright = nucleus > background + 0.5 * (np.percentile(nucleus, 99.5) - background)
        assert (mask[bright] > 0).all()  # no nucleus outside a labelled cell
        for k, cell in enumerate(cells, start=1):
            assert mask[round(cell["cy"]), round(cell["cx"])] == k
            assert (bright & (mask == k)).any()  # every labelled cell holds a nucleus
    # the masks change nothing else: the fields are byte for byte those written without them
    synth.write_dataset(tmp_path / "plain", 6, size=96, seed=2)
    assert (tmp_path / "plain" / "field_00003.tif").read_bytes() == (tmp_path / "s" / "field_00003.tif").read_bytes()
    assert sorted(p.name for p in (tmp_path / "s" / "masks").iterdir()) == [f"field_{i:05d}.tif" for i in range(6)]


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    out = tmp_path_factory.mktemp("fields")
    synth.write_dataset(out, n=12, size=64, seed=5, fields_per_protein=2, masks=True)
    return out


def test_embed_cells_of_synth_masks_rows_and_meta(fields, tmp_path):
    out = tmp_path / "cells.npz"
    result = run(["embed", fields, *RANDOM, "--cells", fields / "masks", "--border", "pad", "--cell-size", "24",
                  "-o", out, "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    images = sorted(str(p) for p in fields.glob("*.tif"))
    masks = [tifffile.imread(fields / "masks" / p.split("/")[-1]) for p in images]
    expected = [(im, k) for im, m in zip(images, masks) for k in np.unique(m)[1:]]
    assert f"embedded 12 image(s) as {len(expected)} cell(s)" in result.stderr
    with np.load(out) as z:
        ids, meta, x = list(z["ids"]), json.loads(str(z["meta"])), z["embeddings"]
        obs = json.loads(str(z["obs"]))
    assert ids == [f"{im}#cell={k}" for im, k in expected] and x.shape == (len(expected), 192)
    measured = [measure(m.astype(np.int64)) for m in masks]
    np.testing.assert_allclose(np.stack([obs["centroid_y"], obs["centroid_x"]], 1),
                               np.concatenate([cs for _, cs, _ in measured]))
    assert [list(b) for b in zip(*(obs[f"bbox_{c}"] for c in ("y0", "x0", "y1", "x1")))] == \
        [b.tolist() for _, _, bs in measured for b in bs]
    assert obs["view_index"] == [int(k) for _, k in expected] and set(obs["view"]) == {"cell"}
    assert (meta["cells"], meta["cell_size"], meta["border"], meta["mask_outside"]) == \
        (str(fields / "masks"), 24, "pad", False)

    mean = tmp_path / "mean.npz"
    assert run(["embed", fields, *RANDOM, "--cells", fields / "masks", "--border", "pad", "--cell-size", "24",
                "--aggregate", "mean", "-o", mean]).exit_code == 0
    with np.load(mean) as z:
        assert list(z["ids"]) == images
        first = sum(1 for im, _ in expected if im == images[0])
        np.testing.assert_allclose(z["embeddings"][0], x[:first].mean(0), atol=1e-5)


def test_view_flag_errors(fields, tmp_path):
    out = tmp_path / "e.npy"
    assert run(["embed", fields, *RANDOM, "--cell-size", "24", "-o", out]).exit_code == 2  # needs --cells
    assert run(["embed", fields, *RANDOM, "--cells", fields / "masks", "--tile", "32", "-o", out]).exit_code == 2
    result = run(["embed", fields, *RANDOM, "--cells", fields / "masks", "--cell-size", "60", "-o", out])
    assert result.exit_code == 1 and "field_00000.tif: no cell of" in result.stderr and "--border skip" in result.stderr
    result = run(["embed", fields, *RANDOM, "--cells", tmp_path / "nowhere", "-o", out])
    assert result.exit_code == 1 and "none of them" in result.stderr and not out.exists()


def test_cell_labels_take_precedence_over_their_images(tmp_path, caplog):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na.tif,er\na.tif#cell=2,golgi\nb.tif#cell=1,nucleus\nb.tif#cell=9,nucleus\n")
    labels = read_labels(csv)
    ids = ["a.tif#cell=1", "a.tif#cell=2", "b.tif#cell=1", "b.tif#cell=3", "a.tif"]
    with caplog.at_level(logging.WARNING, logger="protloc"):
        m = match_rows(ids, labels, base_dir=str(tmp_path))
    assert m.rows.tolist() == [0, 1, 2, 4] and m.unlabeled == 1
    assert [m.classes[j] for j in m.y.argmax(1)] == ["er", "golgi", "nucleus", "er"]
    assert "1 labelled tile(s) or cell(s) have no embedding row" in caplog.text and "b.tif#cell=9" in caplog.text
    ids_csv = tmp_path / "ids.csv"
    ids_csv.write_text("id,label\nP1#cell=2,er\nP1,golgi\n")
    m = match_rows(["P1#cell=1", "P1#cell=2"], read_labels(ids_csv))
    assert [m.classes[j] for j in m.y.argmax(1)] == ["golgi", "er"]


def test_finetune_frozen_on_cells_then_predict_cells(fields, tmp_path):
    model, report = tmp_path / "cells.pt", tmp_path / "cv.json"
    args = ["--cells", fields / "masks", "--border", "pad", "--cell-size", "24"]
    # one protein per class: grouped folds could score no class, so the ungrouped protocol (cells of an image together)
    result = run(["finetune", fields, "--labels", fields / "labels.csv", *RANDOM, "--freeze", *args, "--folds", "2",
                  "--no-groups", "--epochs", "5", "-o", model, "--json", report])
    assert result.exit_code == 0, result.output
    n_cells = sum(len(np.unique(tifffile.imread(p))) - 1 for p in (fields / "masks").glob("*.tif"))
    assert f"{n_cells} labelled row(s)" in result.stderr and "grouped" in result.stderr
    cv = json.loads(report.read_text())
    assert cv["meta"]["val_fraction"] == 0 and all(r["n_val"] == 0 for r in cv["runs"])  # frozen: no early stopping
    views = load_checkpoint(model)["classifier"]["views"]
    assert (views["cells"], views["cell_size"], views["border"]) == (str(fields / "masks"), 24, "pad")

    predicted = run(["predict", fields, "--weights", model, "--cells", fields / "masks", "--workers", "0"])
    assert predicted.exit_code == 0, predicted.output
    rows = [line.split("\t") for line in predicted.stdout.strip().splitlines()[1:]]
    assert len(rows) == n_cells and rows[0][0] == f"{sorted(fields.glob('*.tif'))[0]}#cell=1"  # 24 px, pad: inherited
    whole = run(["predict", *sorted(fields.glob("*.tif")), "--weights", model, "--workers", "0"])  # no masks inherited
    assert (whole.exit_code == 0 and len(whole.stdout.strip().splitlines()) == 13
            and "trained on single cells" in whole.stderr)

    # one cell labelled on its own: its row takes that label, the image's other cells keep the image's
    lines = (fields / "labels.csv").read_text().splitlines()
    first = lines[1].split(",")
    other = next(line.split(",")[1] for line in lines[1:] if line.split(",")[1] != first[1])
    relabelled = tmp_path / "relabelled.csv"
    relabelled.write_text("\n".join([lines[0], *(f"{fields / line}" for line in lines[1:])])
                          + f"\n{fields / first[0]}#cell=1,{other},{first[2]}\n")
    result = run(["finetune", fields, "--labels", relabelled, *RANDOM, "--freeze", *args, "--folds", "2",
                  "--no-groups", "--epochs", "2", "--json", tmp_path / "cv2.json"])
    assert result.exit_code == 0, result.output
    # not fine-tuning
    assert run(["finetune", fields, "--labels", fields / "labels.csv", *RANDOM, *args]).exit_code == 2
