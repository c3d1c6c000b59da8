"""CSV manifests (protloc/source_manifest.py): one image per row, paths or channel columns, metadata carried."""

import csv
import json

import numpy as np
import pytest
import tifffile

from protloc.embeddings import read_embeddings
from protloc.errors import ProtlocError
from protloc.sources import discover, read_source
from test_cli import RANDOM, one_error_line, run

RNG = np.random.default_rng(0)


def write_tif(path, shape=(2, 16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 4000, shape, dtype=np.uint16)
    tifffile.imwrite(path, pixels)
    return pixels


def write_manifest(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_path_rows_relative_to_the_manifest_comments_skipped_metadata_verbatim(tmp_path):
    for name in ("img/a.tif", "img/b.tif", "c.tif"):
        write_tif(tmp_path / name)
    manifest = write_manifest(tmp_path / "lists" / "m.csv",
                              "# acquired 2026-05-01\n"
                              "path, Gene Name ,label,protein\n"
                              "../img/b.tif,ATL2,er,ATL2-mNG\n"
                              "# a row left out\n"
                              "\n"
                              f"{tmp_path / 'c.tif'}, TOMM20 ,mitochondria,\n"
                              "../img/a.tif,LMNB1,nuclear membrane,LMNB1-mNG\n")
    sources = discover([manifest])
    assert [s.id for s in sources] == [str(tmp_path / n) for n in ("img/b.tif", "c.tif", "img/a.tif")]
    assert [s.files for s in sources] == [(s.id,) for s in sources] and sources[0].channel_names is None
    # every other column, by its header name, value stripped; `protein` naming the gene is metadata here
    assert sources[1].meta == {"Gene Name": "TOMM20", "label": "mitochondria", "protein": ""}
    assert sources[0].meta["protein"] == "ATL2-mNG"


def test_ids_from_the_id_column_and_a_tsv(tmp_path):
    write_tif(tmp_path / "a.tif")
    write_tif(tmp_path / "b.tif")
    manifest = write_manifest(tmp_path / "m.tsv", "id\tpath\twell\nfield-1\ta.tif\tB3\n\tb.tif\tB4\n")
    sources = discover([manifest])
    assert [s.id for s in sources] == ["field-1", str(tmp_path / "b.tif")]  # an empty id: the path
    assert [s.meta for s in sources] == [{"well": "B3"}, {"well": "B4"}]


def test_channel_columns_name_the_channels_subcell_columns_too(tmp_path):
    planes = {c: write_tif(tmp_path / "f" / f"x_{c}.tif", (16, 16)) for c in "rygb"}
    manifest = write_manifest(tmp_path / "m.csv", "DAPI,gfp,label\nf/x_b.tif,f/x_g.tif,cytosol\n")
    [source] = discover([manifest])
    assert source.id == str(tmp_path / "f" / "x_b")  # the first channel's path without its extension
    assert source.channel_names == ("nucleus", "protein") and source.meta == {"label": "cytosol"}
    image = read_source(source)
    np.testing.assert_array_equal(image.pixels, np.stack([planes["b"], planes["g"]]))
    assert image.channel_names == ["nucleus", "protein"]
    subcell = write_manifest(tmp_path / "subcell.csv", "r_image,y_image,b_image,g_image\n"
                                                      "f/x_r.tif,f/x_y.tif,f/x_b.tif,f/x_g.tif\n")
    [source] = discover([subcell])
    assert source.channel_names == ("microtubules", "er", "nucleus", "protein")
    np.testing.assert_array_equal(read_source(source).pixels, np.stack([planes[c] for c in "rybg"]))


def test_a_row_may_name_an_ome_zarr_field(tmp_path):
    pytest.importorskip("zarr")
    from test_ome_zarr import FormatV04, write_plate

    written = write_plate(tmp_path / "plate.zarr", FormatV04())
    manifest = write_manifest(tmp_path / "m.csv", "path,treatment\nplate.zarr/B/3/1,DMSO\n")
    [source] = discover([manifest])
    assert source.id == str(tmp_path / "plate.zarr/B/3/1") and source.meta == {"treatment": "DMSO"}
    np.testing.assert_array_equal(read_source(source).pixels, written[str(tmp_path / "plate.zarr/B/3/1")])
    write_manifest(tmp_path / "m.csv", "path\nplate.zarr\n")
    with pytest.raises(ProtlocError, match=r"m.csv: line 2: .*plate.zarr: a plate of 4 images; a manifest row names "
                                           r"one image \(a field: .*plate.zarr/A/1/0\)"):
        discover([str(tmp_path / "m.csv")])


@pytest.mark.parametrize("text, message", [
    ("path,label\na.tif,x\nmissing.tif,y\n",
     r"m.csv: line 3: .*missing.tif: no such file or directory \(column 'path'\)"),
    ("nucleus,mito_marker\na.tif,b.tif\n", r"m.csv: column 'mito_marker' lists image files, but is no channel name"),
    ("file,label\na.tif,x\n", r"m.csv: no 'path' column and no channel columns .*its columns are file, label"),
    ("path,protein\na.tif,b.tif\n", r"m.csv: has both a 'path' column and channel columns listing files \(protein\)"),
    ("dapi,nucleus\na.tif,b.tif\n", r"m.csv: columns dapi, nucleus name the same channel twice"),
    ("path,label\na.tif,x,extra\n", r"m.csv: line 2: 3 fields, but the header has 2 columns"),
    ("path,,label\na.tif,,x\n", r"m.csv: line 1: column 2 of the header has no name"),
    ("path,Label,label\na.tif,x,x\n", r"m.csv: line 1: column 'Label' repeats"),
    ("# only a comment\n", r"m.csv: an empty manifest \(no header line\)"),
    ("path,label\n", r"m.csv: no rows \(a header and no images\)"),
    ("path,label\n,x\n", r"m.csv: line 2: no file in column 'path'"),
    ("id,path\nx,a.tif\nx,b.tif\n", r"m.csv: line 3: id x repeats line 2"),
    ("path\nsub\n", r"m.csv: line 2: .*sub: a folder; a manifest row names one image file"),
    ('path,label\n"a.tif,x\n', r"m.csv: not a valid CSV manifest"),
])
def test_bad_manifests_are_one_line_naming_the_line(tmp_path, text, message):
    write_tif(tmp_path / "a.tif")
    write_tif(tmp_path / "b.tif")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ProtlocError, match=message):
        discover([write_manifest(tmp_path / "m.csv", text)])


def test_embed_a_manifest_then_knn_with_the_manifest_as_labels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [("path", "label", "group", "plate")]
    for k in range(8):
        write_tif(tmp_path / "images" / f"{k}.tif")
        rows.append((f"images/{k}.tif", "a" if k % 2 else "b", f"g{k % 4}", "p1"))
    with open("manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = run(["embed", "manifest.csv", *RANDOM, "--depth", "1", "-o", "emb.npz"])
    assert result.exit_code == 0, result.output
    emb = read_embeddings("emb.npz")
    assert emb.ids == [f"images/{k}.tif" for k in range(8)]
    result = run(["knn", "emb.npz", "--labels", "manifest.csv", "-k", "1", "--folds", "2", "--json", "knn.json"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "knn.json").read_text())["runs"]
    # a bad row: one line, naming the manifest and the line, and nothing written
    with open("manifest.csv", "a") as f:
        f.write("images/gone.tif,a,g0,p1\n")
    one_error_line(run(["embed", "manifest.csv", *RANDOM, "-o", "bad.npz"]), "manifest.csv: line 10:", "gone.tif")
    assert not (tmp_path / "bad.npz").exists()


def test_yeast_crops_as_a_manifest_of_channel_files(shared_data, tmp_path):
    folder = shared_data / "yeast_crops"
    with open(folder / "labels.csv", newline="") as f:
        table = list(csv.DictReader(f))[:6]
    manifest = tmp_path / "yeast.csv"
    with open(manifest, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["gfp", "rfp", "gene", "localization"])
        for row in table:
            out.writerow([folder / row["protein_file"], folder / row["reference_file"], row["gene"],
                          row["control_localization"]])
    sources = discover([str(manifest)])
    assert len(sources) == 6 and all(s.channel_names == ("protein", "cytosol") for s in sources)
    assert sources[0].meta == {"gene": table[0]["gene"], "localization": table[0]["control_localization"]}
    image = read_source(sources[0])
    assert image.pixels.shape == (2, 64, 64) and image.pixels.dtype == np.float32
