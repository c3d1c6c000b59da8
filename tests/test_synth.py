"""Synthetic cells: determinism, files and labels, channel handling, and that the classes look like
where they claim the protein is (nuclear vs cytoplasmic) without being readable from brightness."""

import csv
import os
from collections import Counter

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from protloc import synth
from protloc.errors import ProtlocError


def _field(label, i=0, size=128, channels=("nucleus", "protein"), seed=0):
    return synth.synth_field(np.random.default_rng([seed, i]), label, size, list(channels))


def test_api_constants():
    assert synth.CLASSES[:10] == ("nucleoplasm", "nucleolus", "nuclear_membrane", "cytoplasm", "mitochondria",
                                  "er", "golgi", "vesicles", "plasma_membrane", "centrosome")
    assert synth.CHANNELS == ("nucleus", "protein", "microtubules", "er")


@pytest.mark.parametrize("channels", [["nucleus", "protein"], ["protein", "nucleus"],
                                      ["nucleus", "protein", "microtubules", "er"],
                                      ["er", "microtubules", "protein", "nucleus"], ["protein"]])
def test_field_shape_dtype(channels):
    img = _field("golgi", size=96, channels=channels)
    assert img.dtype == np.uint16 and img.shape == (len(channels), 96, 96)


def test_channel_content_does_not_depend_on_selection():
    both = _field("er", channels=["nucleus", "protein", "microtubules", "er"])
    swapped = _field("er", channels=["protein", "nucleus"])
    assert np.array_equal(both[0], swapped[1]) and np.array_equal(both[1], swapped[0])


@pytest.mark.parametrize("label", synth.CLASSES)
def test_every_class_draws_and_is_noisy(label):
    for size in (32, 64, 256):
        img = _field(label, size=size, channels=synth.CHANNELS)
        for ch in img.astype(np.float64):
            assert np.isfinite(ch).all()
            assert ch.std() > 0 and len(np.unique(ch)) > 20  # noise, not flat
            assert 50 < np.median(ch) < 1000  # the camera offset (~100) plus background


def test_field_deterministic():
    a, b = _field("mitochondria", i=3), _field("mitochondria", i=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _field("mitochondria", i=3, seed=1))


def test_bad_arguments(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ProtlocError, match="actin"):
        synth.synth_field(rng, "er", 64, ["nucleus", "actin"])
    with pytest.raises(ProtlocError):
        synth.synth_field(rng, "er", 64, [])
    with pytest.raises(ProtlocError, match="size"):
        synth.synth_field(rng, "er", 31, ["protein"])
    with pytest.raises(ProtlocError, match="class"):
        synth.synth_field(rng, "cilia", 64, ["protein"])
    with pytest.raises(ProtlocError, match="bogus"):
        synth.write_dataset(tmp_path / "a", 2, size=64, channels=["protein", "bogus"])
    with pytest.raises(ProtlocError, match="size"):
        synth.write_dataset(tmp_path / "b", 2, size=16)
    with pytest.raises(ProtlocError, match="n must"):
        synth.write_dataset(tmp_path / "c", 0, size=64)


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_write_dataset(tmp_path):
    out = tmp_path / "new" / "set"  # created
    calls = []
    rows = synth.write_dataset(out, 40, size=64, seed=3, progress=calls.append)
    assert calls == [1] * 40
    header, csv_rows = _read_csv(out / "labels.csv")
    assert header == ["path", "label", "group"]
    assert csv_rows == rows
    assert [r["path"] for r in rows] == [f"field_{i:05d}.tif" for i in range(40)]
    assert sorted(os.listdir(out)) == sorted([r["path"] for r in rows] + ["labels.csv"])  # no temp files left
    # 10 proteins x 4 fields: every class once, balanced; a group never mixes classes.
    assert Counter(r["label"] for r in rows) == {c: 4 for c in synth.CLASSES}
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["label"])
    assert len(by_group) == 10 and all(len(v) == 1 for v in by_group.values())
    assert rows[0]["group"] == "prot_0000" and rows[39]["group"] == "prot_0009"
    # Another seed shuffles classes over proteins differently.
    other = synth.write_dataset(tmp_path / "other", 40, size=64, seed=4)
    assert [r["label"] for r in other] != [r["label"] for r in rows]


def test_write_dataset_ome_channels(tmp_path):
    for channels in (["nucleus", "protein"], ["er", "protein", "nucleus", "microtubules"]):
        out = tmp_path / "-".join(channels)
        synth.write_dataset(out, 1, size=48, channels=channels)
        with tifffile.TiffFile(out / "field_00000.tif") as tif:
            assert tif.is_ome
            ome = tif.ome_metadata
            positions = [ome.index(f'Name="{c}"') for c in channels]
            assert positions == sorted(positions)  # named, in the order asked for
            img = tif.asarray()
        assert img.dtype == np.uint16 and img.shape == (len(channels), 48, 48)


def test_write_dataset_deterministic_and_independent_of_n(tmp_path):
    a = synth.write_dataset(tmp_path / "a", 6, size=64, seed=7, fields_per_protein=2)
    b = synth.write_dataset(tmp_path / "b", 3, size=64, seed=7, fields_per_protein=2)
    synth.write_dataset(tmp_path / "c", 3, size=64, seed=8, fields_per_protein=2)
    assert a[:3] == b
    for i in range(3):
        name = f"field_{i:05d}.tif"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_classes_balanced_per_block_of_proteins():
    # Every run of len(CLASSES) proteins takes each class once, whatever the seed.
    for seed in (0, 5):
        labels = [synth._protein_class(seed, k) for k in range(30)]
        for block in range(3):
            assert sorted(labels[10 * block:10 * block + 10]) == sorted(synth.CLASSES)


def _nuclear_fraction(img):
    """Share of the background-subtracted protein signal inside nuclei (nucleus channel thresholded)."""
    nuc, prot = img.astype(np.float64) - synth.OFFSET
    smooth = ndimage.gaussian_filter(nuc, 1.5)
    bg = np.median(smooth)
    mask = smooth > bg + 0.3 * (np.percentile(smooth, 99.5) - bg)
    signal = prot - np.median(prot)
    return signal[mask].sum() / np.abs(signal).sum()


def test_nuclear_classes_are_nuclear():
    fractions = {label: np.median([_nuclear_fraction(_field(label, i)) for i in range(8)])
                 for label in ("nucleoplasm", "nucleolus", "cytoplasm", "mitochondria", "vesicles",
                               "plasma_membrane", "er")}
    assert fractions["nucleoplasm"] > 0.5 and fractions["nucleolus"] > 0.5, fractions
    for label in ("cytoplasm", "mitochondria", "vesicles", "plasma_membrane", "er"):
        assert fractions[label] < 0.25, fractions


def test_class_not_readable_from_mean_intensity():
    # Per-class averages of log field brightness differ far less than fields of one class do.
    logs = {c: [np.log(max(_field(c, i, size=64)[1].mean() - synth.OFFSET, 1e-3)) for i in range(12)]
            for c in synth.CLASSES}
    within = np.mean([np.std(v) for v in logs.values()])
    between = np.std([np.mean(v) for v in logs.values()])
    assert within > 0.7  # brightness varies over more than a decade
    assert between < 0.5 * within, (between, within)


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"II*\x00")  # a truncated TIFF
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(KeyboardInterrupt):
        synth.write_dataset(tmp_path, 3, size=32)
    assert os.listdir(tmp_path) == []


def test_channel_aliases(tmp_path):
    synth.write_dataset(tmp_path, 1, size=32, channels=["DAPI", "GFP"])
    with tifffile.TiffFile(tmp_path / "field_00000.tif") as tif:
        assert 'Name="nucleus"' in tif.ome_metadata and 'Name="protein"' in tif.ome_metadata
