"""Labels and groups from an embeddings file's own per-row columns: `--labels obs:COLUMN`,
`--groups obs:COLUMN` in knn, finetune and plot, as from a labels CSV."""

import json

import anndata
import numpy as np
import pytest
from click.testing import CliRunner

from protloc.cli import main
from protloc.embeddings import RowWriter, read_embeddings, write_embeddings
from protloc.errors import ProtlocError
from protloc.labels import labels_of_rows, match_rows
from protloc.synth import write_dataset

RANDOM = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]
CV = ["--folds", "2", "-q"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """12 fields embedded as .npz; a labels CSV (classes a, b, each in three groups); the same
    embeddings as .h5ad with the CSV's label and group as obs columns, added as a scanpy user would."""
    out = tmp_path_factory.mktemp("obs")
    write_dataset(out / "cells", n=12, size=40, seed=1, fields_per_protein=2)
    images = sorted((out / "cells").glob("*.tif"))
    rows = [(p, "ab"[i % 2], f"g{i // 4}") for i, p in enumerate(images)]
    (out / "labels.csv").write_text("path,label,group\n" + "".join(f"{p},{lab},{g}\n" for p, lab, g in rows))
    assert run(["embed", *images, *RANDOM, "-o", out / "e.npz"]).exit_code == 0
    assert run(["embed", *images, *RANDOM, "-o", out / "e.h5ad"]).exit_code == 0
    adata = anndata.read_h5ad(out / "e.h5ad")
    adata.obs["label"] = [lab for _, lab, _ in rows]
    adata.obs["gene"] = [g for _, _, g in rows]
    adata.write_h5ad(out / "lab.h5ad")
    return out


def knn_results(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    result = run(["knn", *args, "-k", "1,3", *CV, "--json", out])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())["runs"][0]
    for key in ("embeddings", "labels", "groups"):  # where they came from; the rest is the same
        record["meta"].pop(key)
    return record


def test_knn_obs_labels_and_groups_give_the_csvs_results(labelled, tmp_path):
    csv = knn_results([labelled / "e.npz", "--labels", labelled / "labels.csv"], tmp_path, "csv")
    assert csv["meta"]["grouped"] and csv["meta"]["rows"] == 12
    obs = knn_results([labelled / "lab.h5ad", "--labels", "obs:label", "--groups", "obs:gene"], tmp_path, "obs")
    mixed = knn_results([labelled / "lab.h5ad", "--labels", labelled / "labels.csv", "--groups", "obs:gene"],
                        tmp_path, "mixed")  # the CSV's labels, the file's groups
    assert obs == csv and mixed == csv
    ungrouped = knn_results([labelled / "lab.h5ad", "--labels", "obs:label"], tmp_path, "ungrouped")
    assert not ungrouped["meta"]["grouped"]  # no --groups: split by image, as a CSV without a group column


def test_finetune_and_plot_take_obs_labels(labelled, tmp_path):
    scores = []
    for args in ([labelled / "e.npz", "--labels", labelled / "labels.csv"],
                 [labelled / "lab.h5ad", "--labels", "obs:label", "--groups", "obs:gene"]):
        out = tmp_path / f"cv{len(scores)}.json"
        result = run(["finetune", *args, *CV, "--json", out])
        assert result.exit_code == 0, result.output
        scores.append(json.loads(out.read_text())["macro_f1_pooled"])
    assert scores[0] == scores[1]
    result = run(["plot", "embedding", labelled / "lab.h5ad", "--labels", "obs:label", "-o", tmp_path / "map.png"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "map.png").stat().st_size > 0


def test_obs_values_empty_multi_label_and_case(tmp_path, caplog):
    """An empty value leaves its row unlabelled; a;b is multi-label; spellings differing in case are one class."""
    ids = [f"img{i}.tif" for i in range(6)]
    writer = RowWriter(2)
    writer.append(np.random.default_rng(0).standard_normal((6, 2)).astype(np.float32))
    obs = {"where": ["Nucleus", "nucleus", "", "er;nucleus", "er", " "], "gene": ["x", "x", "", "y", "y", "z"]}
    write_embeddings(str(tmp_path / "e.npz"), writer, ids, {}, obs)
    emb = read_embeddings(str(tmp_path / "e.npz"))
    labels = labels_of_rows(emb, "obs:where", "obs:gene")
    assert labels.keys == ["img0.tif", "img1.tif", "img3.tif", "img4.tif"] and labels.multilabel
    assert labels.labels == [("nucleus",), ("nucleus",), ("er", "nucleus"), ("er",)] and labels.groups == list("xxyy")
    assert "differ only in case" in caplog.text
    matched = match_rows(emb.ids, labels)
    assert matched.unlabeled == 2 and list(matched.rows) == [0, 1, 3, 4]


def test_obs_label_errors_are_one_line(labelled, tmp_path):
    lab = labelled / "lab.h5ad"
    np.save(tmp_path / "e.npy", read_embeddings(str(labelled / "e.npz")).x)
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in read_embeddings(str(labelled / "e.npz")).ids))
    adata = anndata.read_h5ad(lab)
    adata.obs["gene"] = ["g1"] * 11 + [""]
    adata.write_h5ad(tmp_path / "holes.h5ad")
    cases = [
        ([lab, "--labels", "obs:nope"], f"{lab}: no obs column 'nope'; columns are: image, path, view, label, gene"),
        ([tmp_path / "e.npy", "--ids", tmp_path / "ids.txt", "--labels", "obs:label"], "no per-row columns"),
        ([lab, "--labels", "obs:label", "--groups", "gene"], "gene: groups come from a column of the embeddings"),
        ([tmp_path / "holes.h5ad", "--labels", "obs:label", "--groups", "obs:gene"],
         f"row {sorted(labelled.glob('cells/*.tif'))[-1]} has a label but an empty obs:gene"),
        ([lab, "--labels", "obs:view"], None),  # every row labelled "image": one class, nothing to score
    ]
    for args, message in cases:
        result = run(["knn", *args, *CV])
        assert result.exit_code == 1, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("protloc: error: "), lines
        assert message is None or message in lines[0], lines
    assert run(["knn", lab, "--labels", "obs:label", "--groups", "obs:gene", "--no-groups"]).exit_code == 2
    images = sorted((labelled / "cells").glob("*.tif"))
    result = run(["finetune", *images, *RANDOM, "--labels", "obs:label", "--freeze", *CV])
    assert result.exit_code == 2 and "images take a labels CSV" in result.stderr
    empty = read_embeddings(str(lab))
    empty.obs["label"] = [""] * 12
    with pytest.raises(ProtlocError, match="labels no row of"):
        labels_of_rows(empty, "obs:label")


def test_input_metadata_travels_to_obs_and_labels_knn(labelled, tmp_path, monkeypatch):
    """What the input says about each image (Source.meta: a manifest row's other columns) becomes
    obs columns of the embed output, and knn takes its labels and groups from them."""
    import protloc.cli.embed as embed_cli
    from protloc.sources import Source

    images = sorted((labelled / "cells").glob("*.tif"))
    meta = [{"label": "ab"[i % 2], "gene": f"g{i // 4}", **({"note": "bright"} if i == 0 else {})}
            for i in range(len(images))]
    sources = [Source(str(p), (str(p),), None, m) for p, m in zip(images, meta)]
    monkeypatch.setattr(embed_cli, "discover", lambda *a, **k: sources)
    out = tmp_path / "m.h5ad"
    assert run(["embed", "manifest.csv", *RANDOM, "-o", out]).exit_code == 0
    obs = anndata.read_h5ad(out).obs
    assert list(obs["label"]) == [m["label"] for m in meta] and list(obs["note"]) == ["bright"] + [""] * 11
    csv = knn_results([labelled / "e.npz", "--labels", labelled / "labels.csv"], tmp_path, "csv")
    assert knn_results([out, "--labels", "obs:label", "--groups", "obs:gene"], tmp_path, "meta") == csv

    monkeypatch.setattr(embed_cli, "discover", lambda *a, **k: [Source("a.tif", ("a.tif",), None, {"path": "x"})])
    result = run(["embed", "manifest.csv", *RANDOM, "-o", tmp_path / "bad.h5ad"])
    assert result.exit_code == 1 and not (tmp_path / "bad.h5ad").exists()
    assert result.stderr.startswith("protloc: error: a.tif: its metadata has 'path', a column name protloc's output")
    assert len(result.stderr.strip().splitlines()) == 1
