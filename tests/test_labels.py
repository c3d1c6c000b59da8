"""Labels CSV reading and matching embedding ids to labels."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from protloc.errors import ProtlocError
from protloc.labels import match_rows, read_labels

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_csv_folder(tmp_path):
    csv = write(tmp_path / "sub" / "labels.csv", "path,label\nimgs/a.tif,nucleus\nimgs/b.tif,er\n")
    labels = read_labels(csv)
    assert labels.keys == [str(tmp_path / "sub" / "imgs" / "a.tif"), str(tmp_path / "sub" / "imgs" / "b.tif")]
    assert labels.classes == ["er", "nucleus"] and not labels.multilabel and labels.groups is None
    # ids as `protloc embed` run in tmp_path wrote them; plus one unlabelled image
    m = match_rows(["sub/imgs/b.tif", "sub/imgs/c.tif", "sub/./imgs/a.tif"], labels, base_dir=str(tmp_path))
    assert m.rows.tolist() == [0, 2] and m.unlabeled == 1
    assert m.y.tolist() == [[1, 0], [0, 1]] and m.classes == ["er", "nucleus"] and m.groups is None


def test_default_base_dir_is_cwd(tmp_path, monkeypatch):
    csv = write(tmp_path / "labels.csv", "path,label\nimgs/a.tif,nucleus\n")
    monkeypatch.chdir(tmp_path / "")
    assert match_rows(["imgs/a.tif"], read_labels(csv)).rows.tolist() == [0]


def test_absolute_paths(tmp_path):
    target = tmp_path / "elsewhere" / "x.tiff"
    csv = write(tmp_path / "csvdir" / "labels.csv", f"path,label\n{target},golgi\n")
    labels = read_labels(csv)
    assert labels.keys == [str(target)]
    assert match_rows([str(target)], labels, base_dir="/nonexistent").rows.tolist() == [0]


def test_id_column_exact_match(tmp_path):
    csv = write(tmp_path / "l.csv", "id,label\nwell1/a.tif,er\nP123,nucleus\n")
    labels = read_labels(csv)
    assert labels.keys == ["well1/a.tif", "P123"] and not labels.by_path
    m = match_rows(["P123", "p123", "well1/a.tif#cell=2", "x/well1/a.tif"], labels)
    assert m.rows.tolist() == [0, 2] and m.unlabeled == 2


def test_multilabel_and_groups(tmp_path):
    csv = write(tmp_path / "l.csv", "path,label,group\na.tif,er;nucleus,G1\nb.tif, nucleus ,G1\nc.tif,golgi;er;er,G2\n")
    labels = read_labels(csv)
    assert labels.multilabel and labels.labels == [("er", "nucleus"), ("nucleus",), ("er", "golgi")]
    assert labels.classes == ["er", "golgi", "nucleus"] and labels.groups == ["G1", "G1", "G2"]
    m = match_rows(["c.tif", "a.tif", "b.tif"], labels, base_dir=str(tmp_path))
    assert m.multilabel and m.y.tolist() == [[1, 1, 0], [1, 0, 1], [0, 0, 1]]
    assert m.groups.tolist() == ["G2", "G1", "G1"]


def test_fragments_match_their_image(tmp_path):
    csv = write(tmp_path / "l.csv", "path,label\na.tif,er\nb.ome.tif,nucleus\n")
    ids = ["a.tif#tile=0", "a.tif#tile=3", "b.ome.tif#cell=1", "c.tif#tile=3"]
    m = match_rows(ids, read_labels(csv), base_dir=str(tmp_path))
    assert m.rows.tolist() == [0, 1, 2] and m.unlabeled == 1 and m.y.argmax(1).tolist() == [0, 0, 1]


def test_extensionless_and_channel_suffix_matching(tmp_path):
    csv = write(tmp_path / "l.csv", "path,label\nx.TIF,er\ncells/c_green.tif,nucleus\nd_gfp.ome.tiff,golgi\n")
    labels = read_labels(csv)
    ids = [str(tmp_path / "x"), str(tmp_path / "cells" / "c"), str(tmp_path / "d") + "#tile=1"]
    m = match_rows(ids, labels)  # default suffixes know HPA colours and gfp
    assert m.rows.tolist() == [0, 1, 2] and m.y.argmax(1).tolist() == [0, 2, 1]
    with pytest.raises(ProtlocError, match="2 labelled images have no embedding row"):
        match_rows(ids, labels, channel_suffixes=["rfp"])  # only x matches without suffixes


def test_channel_files_with_conflicting_labels(tmp_path):
    csv = write(tmp_path / "l.csv", "path,label\nX_gfp.tif,er\nX_rfp.tif,nucleus\n")
    with pytest.raises(ProtlocError, match="both match embedding id"):
        match_rows([str(tmp_path / "X")], read_labels(csv), channel_suffixes=["gfp", "rfp"])


def test_unmatched_labels_name_the_first_five(tmp_path):
    rows = "".join(f"img{i}.tif,er\n" for i in range(8))
    csv = write(tmp_path / "labels.csv", "path,label\n" + rows)
    with pytest.raises(ProtlocError) as err:
        match_rows(["img0.tif"], read_labels(csv), base_dir=str(tmp_path))
    msg = str(err.value)
    assert msg.startswith(f"{csv}: 7 labelled images have no embedding row, e.g. img1.tif, img2.tif")
    assert "img5.tif" in msg and "img6.tif" not in msg and "\n" not in msg


def test_missing_columns_list_available(tmp_path):
    csv = write(tmp_path / "l.csv", "file,label\na.tif,er\n")
    with pytest.raises(ProtlocError, match="needs a 'path' or 'id' column.*columns are: file, label"):
        read_labels(csv)
    with pytest.raises(ProtlocError, match="no column 'class'; columns are: file, label"):
        read_labels(csv, id_column="file", label_column="class")
    with pytest.raises(ProtlocError, match="no column 'gene'"):
        read_labels(csv, id_column="file", group_column="gene")
    assert read_labels(csv, id_column="file").groups is None  # the default 'group' is optional


def test_duplicates(tmp_path, caplog):
    same = write(tmp_path / "same.csv", "path,label\na.tif,er\nb.tif,er\n./a.tif,er\n")
    with caplog.at_level(logging.WARNING, logger="protloc.labels"):
        labels = read_labels(same)
    assert len(labels.keys) == 2 and any("1 repeated rows" in m for m in caplog.messages)
    conflict = write(tmp_path / "conflict.csv", "path,label\na.tif,er\nb.tif,er\na.tif,nucleus\n")
    with pytest.raises(ProtlocError, match=r"line 4: a.tif is listed again with a different label"):
        read_labels(conflict)


def test_bad_files(tmp_path):
    with pytest.raises(ProtlocError, match="no such labels file"):
        read_labels(tmp_path / "missing.csv")
    with pytest.raises(ProtlocError, match="no rows"):
        read_labels(write(tmp_path / "empty.csv", "path,label\n"))
    with pytest.raises(ProtlocError, match="line 3: empty 'label' for b.tif"):
        read_labels(write(tmp_path / "blank.csv", "path,label\na.tif,er\nb.tif, ; \n"))


@pytest.mark.skipif(not (DATA / "yeast_crops" / "labels.csv").exists(), reason="../shared/data missing")
def test_yeast_table_with_custom_columns():
    root = DATA / "yeast_crops"
    labels = read_labels(root / "labels.csv", id_column="protein_file", label_column="control_localization",
                         group_column="gene")
    assert labels.classes == ["cytosol", "mitochondria"] and not labels.multilabel
    # ids of one-file-per-channel images are their stems, e.g. <dir>/AAC1/AAC1_1_rfp_10
    stems = sorted({os.path.join(root, p.parent.name, p.name[: -len("_gfp.tif")])
                    for p in root.glob("*/*_gfp.tif")})
    assert os.path.join(root, "AAC1", "AAC1_1_rfp_10") in stems
    m = match_rows(stems, labels, channel_suffixes=["gfp", "rfp"])
    assert len(m.rows) == len(labels.keys) == len(stems) and m.unlabeled == 0
    assert m.y.sum(1).tolist() == [1] * len(m.rows) and len(np.unique(m.groups)) >= 3
    counts = dict(zip(m.classes, m.y.sum(0).tolist()))
    assert counts == {"cytosol": 349, "mitochondria": 782}
