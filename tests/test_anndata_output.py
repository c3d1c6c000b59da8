"""AnnData output (.h5ad, AnnData-zarr) from embed and predict, read back by anndata as scanpy
users do, the per-row columns, and every embeddings format read as one."""

import json
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
from click.testing import CliRunner

from protloc import emb_anndata
from protloc.cli import main
from protloc.embeddings import RowWriter, read_embeddings, write_embeddings
from protloc.errors import ProtlocError
from protloc.output import atomic_dir
from protloc.row_meta import check_source_meta, row_columns
from protloc.sources import Source
from protloc.synth import write_dataset

RANDOM = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    out = tmp_path_factory.mktemp("fields")
    write_dataset(out, n=8, size=48, seed=3, fields_per_protein=2, masks=True)
    return out


@pytest.fixture(scope="module")
def images(fields):
    return sorted(fields.glob("*.tif"))  # not the masks beside them


@pytest.fixture(scope="module")
def same_run(images, tmp_path_factory):
    """One embedding run written as .npz, .h5ad and AnnData-zarr (dataset normalization: meta with
    None values, nested dicts and lists)."""
    out = tmp_path_factory.mktemp("emb")
    paths = {ext: out / f"e.{ext}" for ext in ("npz", "h5ad", "zarr")}
    for path in paths.values():
        result = run(["embed", *images, *RANDOM, "--normalize", "dataset", "-o", path])
        assert result.exit_code == 0, result.output
    return paths


def test_h5ad_is_anndata_as_scanpy_reads_it(same_run):
    with np.load(same_run["npz"], allow_pickle=False) as z:
        x, ids, meta = z["embeddings"], list(z["ids"]), json.loads(str(z["meta"]))
    for reader, path in ((anndata.read_h5ad, same_run["h5ad"]), (anndata.read_zarr, same_run["zarr"])):
        adata = reader(path)
        assert adata.X.dtype == np.float32 and adata.X.shape == x.shape == (8, 192)
        np.testing.assert_array_equal(adata.X, x)
        assert list(adata.obs_names) == ids
        assert list(adata.obs["view"]) == ["image"] * 8 and list(adata.obs["image"]) == ids
        assert list(adata.obs["path"]) == ids  # one file per image: the path is the id
        uns = emb_anndata.plain(adata.uns["protloc"])
        assert json.loads(json.dumps(uns)) == meta  # JSON types again, equal to the .npz meta
        assert uns["dataset_stats"]["channels"] == ["nucleus", "protein"] and uns["tile"] is None


def test_every_format_reads_as_the_same_embeddings(same_run):
    npz, h5ad, zarr = (read_embeddings(str(same_run[k])) for k in ("npz", "h5ad", "zarr"))
    for other in (h5ad, zarr):
        np.testing.assert_array_equal(other.x, npz.x)
        assert (other.ids, other.meta, other.obs) == (npz.ids, npz.meta, npz.obs)


def test_knn_of_npz_and_h5ad_of_one_run_agree(same_run, fields, tmp_path):
    results = []
    for key in ("npz", "h5ad", "zarr"):
        out = tmp_path / f"{key}.json"
        result = run(["knn", same_run[key], "--labels", fields / "labels.csv", "--no-groups", "-k", "1,3",
                      "--folds", "2", "--json", out])
        assert result.exit_code == 0, result.output
        results.append(json.loads(out.read_text())["runs"][0])
    for r in results:
        r["meta"].pop("embeddings")  # the file's name; everything else is the same
    assert results[1] == results[0] and results[2] == results[0]


def test_tile_and_cell_rows_carry_their_view(fields, images, tmp_path):
    result = run(["embed", *images, *RANDOM, "--tile", "24", "-o", tmp_path / "t.zarr"])
    assert result.exit_code == 0, result.output
    obs = anndata.read_zarr(tmp_path / "t.zarr").obs
    assert set(obs["view"]) == {"tile"} and list(obs["view_index"][:4]) == [0, 1, 2, 3]
    assert list(zip(obs["origin_y"][:4], obs["origin_x"][:4])) == [(0, 0), (0, 24), (24, 0), (24, 24)]
    assert all(i == f"{im}#tile={k}" for i, im, k in zip(obs.index, obs["image"], obs["view_index"]))

    result = run(["embed", *images, *RANDOM, "--cells", fields / "masks", "--cell-size", "16", "--border", "pad",
                  "-o", tmp_path / "c.h5ad"])
    assert result.exit_code == 0, result.output
    obs = anndata.read_h5ad(tmp_path / "c.h5ad").obs
    assert set(obs["view"]) == {"cell"}
    for _, row in obs.iterrows():  # the centroid lies in the bounding box, the box in the 48 x 48 field
        assert 0 <= row.bbox_y0 <= row.centroid_y < row.bbox_y1 <= 48
        assert 0 <= row.bbox_x0 <= row.centroid_x < row.bbox_x1 <= 48


def test_source_meta_becomes_string_columns(tmp_path):
    sources = [Source("a.tif", ("a.tif",), None, {"well": "B3", "treatment": "dmso"}),
               Source("b", ("b_gfp.tif", "b_dapi.tif"), ("protein", "nucleus"), {"well": "B4", "batch": "2"})]
    ids = ["a.tif#cell=1", "a.tif#cell=4", "b#cell=2"]
    views = [{"centroid": [1.5, 2.0], "bbox": [0, 1, 3, 4]}, {"centroid": [9.0, 9.5], "bbox": [8, 8, 11, 12]},
             {"centroid": [4.0, 4.0], "bbox": [2, 2, 7, 7]}]
    columns = row_columns(ids, sources, views)
    assert columns["path"] == ["a.tif", "a.tif", "b_gfp.tif;b_dapi.tif"]
    assert columns["view_index"] == [1, 4, 2] and columns["bbox_x1"] == [4, 12, 7]
    assert (columns["well"], columns["treatment"], columns["batch"]) == (["B3", "B3", "B4"], ["dmso", "dmso", ""],
                                                                       ["", "", "2"])
    writer = RowWriter(3)
    writer.append(np.eye(3, dtype=np.float32))
    write_embeddings(str(tmp_path / "m.h5ad"), writer, ids, {"pool": "cls"}, columns)
    obs = anndata.read_h5ad(tmp_path / "m.h5ad").obs
    assert list(obs["treatment"].astype(str)) == ["dmso", "dmso", ""] and obs["centroid_y"].dtype.kind == "f"
    check_source_meta(sources)
    for key, why in (("view", "protloc's output uses itself"), ("dose/uM", "AnnData cannot store"),
                     ("_index", "AnnData cannot store"), (" ", "an unnamed column")):
        with pytest.raises(ProtlocError, match=f"a.tif: its metadata has .*{why}"):
            check_source_meta([sources[0], Source("a.tif", ("a.tif",), None, {key: "x"})])


def test_predict_to_anndata_holds_what_the_tsv_holds(same_run, images, fields, tmp_path):
    head = tmp_path / "head.pt"
    assert run(["finetune", same_run["npz"], "--labels", fields / "labels.csv", "--folds", "0", "-o", head,
                "-q"]).exit_code == 0
    tsv = run(["predict", same_run["h5ad"], "--weights", head, "-q"])
    assert tsv.exit_code == 0, tsv.output
    lines = [line.split("\t") for line in tsv.stdout.splitlines()]
    for source, out in ((same_run["h5ad"], tmp_path / "p.h5ad"), (images, tmp_path / "images.zarr")):
        args = ["--normalize", "dataset"] if source is images else []
        result = run(["predict", *(images if source is images else [source]), "--weights", head, "-o", out,
                      "--workers", "0", *args])
        assert result.exit_code == 0, result.output
        adata = anndata.read_zarr(out) if out.suffix == ".zarr" else anndata.read_h5ad(out)
        prediction = emb_anndata.plain(adata.uns["protloc"]["prediction"])
        assert prediction["classes"] == lines[0][2:] and prediction["model"] == str(head)
        assert list(adata.obs_names) == [r[0] for r in lines[1:]]
        assert list(adata.obs["predicted"]) == [r[1] for r in lines[1:]]
        probs = adata.obsm["probabilities"]
        assert probs.shape == (8, len(prediction["classes"])) and np.allclose(probs.sum(1), 1, atol=1e-5)
        np.testing.assert_allclose(probs, [[float(v) for v in r[2:]] for r in lines[1:]], atol=1e-5)
        np.testing.assert_allclose(adata.X, read_embeddings(str(same_run["npz"])).x, atol=1e-5)


def test_outputs_are_written_whole_or_not_at_all(images, tmp_path):
    out = tmp_path / "e.zarr"
    (tmp_path / "notzarr.zarr").mkdir()
    (tmp_path / "notzarr.zarr" / "keep.txt").write_text("mine")
    result = run(["embed", *images, *RANDOM, "-o", tmp_path / "notzarr.zarr", "--force"])
    assert result.exit_code == 1 and "exists and is not a zarr store" in result.stderr
    assert (tmp_path / "notzarr.zarr" / "keep.txt").read_text() == "mine"

    assert run(["embed", *images, *RANDOM, "-o", out]).exit_code == 0
    first = read_embeddings(str(out)).x
    assert run(["embed", *images, *RANDOM, "-o", out]).exit_code == 1  # no --force
    assert run(["embed", *images, *RANDOM, "--seed", "1", "-o", out, "--force"]).exit_code == 0
    assert not np.array_equal(read_embeddings(str(out)).x, first)  # replaced
    for dest in (out, tmp_path / "new.zarr"):
        with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
            (Path(tmp) / "half.json").write_text("{")
            raise RuntimeError("a failure half way")
    assert read_embeddings(str(out)).x.shape == first.shape  # the old store stands
    assert not (tmp_path / "new.zarr").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left beside


def test_bad_anndata_is_one_line(tmp_path, same_run):
    import pandas as pd

    def write(name, **kw):
        path = tmp_path / name
        anndata.AnnData(**kw).write_h5ad(path)
        return path

    frame = pd.DataFrame(index=["a", "b"])
    cases = {
        tmp_path / "missing.h5ad": "no such file",
        write("nox.h5ad", obs=frame): "AnnData without X",
        write("empty.h5ad", X=np.zeros((0, 4), np.float32)): "no embedding rows",
        write("nan.h5ad", X=np.array([[0, 1], [np.nan, 2]], np.float32), obs=frame): "1 row",
        write("bools.h5ad", X=np.ones((2, 3), bool), obs=frame): "numeric",
        write("huge.h5ad", X=np.array([[0, 1], [1e300, 2]]), obs=frame): "beyond float32's range",
    }
    (tmp_path / "text.h5ad").write_text("not hdf5")
    cases[tmp_path / "text.h5ad"] = "not an AnnData .h5ad file"
    with pytest.warns(UserWarning):  # anndata warns, and writes it
        cases[write("dup.h5ad", X=np.ones((2, 3), np.float32), obs=pd.DataFrame(index=["a", "a"]))] = "repeated"
    for path, what in cases.items():
        result = run(["knn", path, "--labels", "obs:label"])
        assert result.exit_code == 1, (path, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"protloc: error: {path}") and what in lines[0], lines


def test_npz_per_row_columns_are_checked(tmp_path):
    x = np.ones((2, 3), np.float32)
    for obs, what in (({"a": ["1"]}, "'a' has 1 values for 2 rows"), ({"a": 5}, "'a' has a int for 2 rows"),
                      (["a"], "must be a mapping")):
        np.savez(tmp_path / "e.npz", embeddings=x, ids=np.array(["p", "q"]), meta=np.array("{}"),
                 obs=np.array(json.dumps(obs)))
        with pytest.raises(ProtlocError, match=what):
            read_embeddings(str(tmp_path / "e.npz"))


def test_missing_extra_is_one_line_before_any_work(images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "anndata", None)  # import anndata fails
    result = run(["embed", *images, *RANDOM, "-o", tmp_path / "e.h5ad"])
    assert result.exit_code == 1 and not (tmp_path / "e.h5ad").exists()
    assert result.stderr.strip() == "protloc: error: writing .h5ad needs anndata: pip install 'protloc[anndata]'"
    with pytest.raises(ProtlocError, match=r"reading \.zarr needs anndata: pip install 'protloc\[anndata\]'"):
        read_embeddings(str(tmp_path / "e.zarr"))
