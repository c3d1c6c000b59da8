"""The embeddings file format: write/read round trips and the checks on reading."""

import io
import json

import numpy as np
import pytest

from protloc.embeddings import RowWriter, read_embeddings, write_embeddings, write_ids
from protloc.errors import ProtlocError


def filled_writer(rows):
    writer = RowWriter(rows.shape[1])
    for chunk in np.array_split(rows, 3):
        writer.append(chunk)
    return writer


@pytest.fixture
def rows():
    return np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)


def test_npy_to_a_stream_and_to_a_file(tmp_path, rows):
    stream = io.BytesIO()
    write_embeddings("-", filled_writer(rows), [], {}, stdout=stream)
    np.testing.assert_array_equal(np.load(io.BytesIO(stream.getvalue())), rows)
    write_embeddings(str(tmp_path / "e.npy"), filled_writer(rows), [], {})
    write_ids(tmp_path / "ids.tsv", [f"img{i}.tif" for i in range(10)])
    emb = read_embeddings(str(tmp_path / "e.npy"), str(tmp_path / "ids.tsv"))
    np.testing.assert_array_equal(emb.x, rows)
    assert emb.ids[3] == "img3.tif"


def test_npz_holds_ids_and_meta_without_pickle(tmp_path, rows):
    ids = [f"dir/img{i}.tif" for i in range(10)]
    write_embeddings(str(tmp_path / "e.npz"), filled_writer(rows), ids, {"pool": "cls", "cwd": "/data"})
    with np.load(tmp_path / "e.npz", allow_pickle=False) as z:
        assert json.loads(str(z["meta"]))["pool"] == "cls"
    emb = read_embeddings(str(tmp_path / "e.npz"))
    assert emb.ids == ids and emb.meta["cwd"] == "/data"
    np.testing.assert_array_equal(emb.x, rows)


def test_reading_from_stdin(rows):
    buf = io.BytesIO()
    np.save(buf, rows)
    emb = read_embeddings("-", stdin=io.BytesIO(buf.getvalue()))
    assert emb.source == "<stdin>" and emb.x.shape == (10, 6)


def test_bad_embedding_files(tmp_path, rows):
    bad = rows.copy()
    bad[4, 2] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    with pytest.raises(ProtlocError, match="1 row"):
        read_embeddings(str(tmp_path / "inf.npy"))
    np.save(tmp_path / "ok.npy", rows)
    (tmp_path / "ids.txt").write_text("a\nb\n")
    with pytest.raises(ProtlocError, match="2 ids for 10"):
        read_embeddings(str(tmp_path / "ok.npy"), str(tmp_path / "ids.txt"))
    np.save(tmp_path / "3d.npy", rows[None])
    with pytest.raises(ProtlocError, match="2-D"):
        read_embeddings(str(tmp_path / "3d.npy"))
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(ProtlocError, match="text.npy"):
        read_embeddings(str(tmp_path / "text.npy"))
    with pytest.raises(ProtlocError, match="no such file"):
        read_embeddings(str(tmp_path / "missing.npy"))
