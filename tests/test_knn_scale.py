"""k-NN at scale: the blocked exact search against the unblocked one it replaced, its tie rule,
and the faiss index against exact (recall, macro F1), through the library and `protloc knn`."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from protloc.cli import main
from protloc.errors import ProtlocError
from protloc.folds import predict
from protloc.knn import cross_validate, knn_scores
from protloc.labels import Matched
from protloc.neighbours import Search, nearest, nlist

T = 0.07
BLOCKS = [(1, 1), (3, 7), (5, 64), (1024, 8192)]  # (q_block, t_block): one row each ... everything in one block


def unblocked_scores(train_x, train_y, query_x, ks, temperature, exclude=None):
    """protloc.knn.knn_scores as it was before the blocked search (commit 870001c), for one chunk
    of all queries: the full (queries, train) similarity, torch.topk over it, the same vote."""
    ks = sorted(set(ks))
    train = F.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    query = F.normalize(torch.as_tensor(np.asarray(query_x), dtype=torch.float32), dim=1)
    y = np.asarray(train_y)
    y = torch.as_tensor(np.eye(int(y.max()) + 1)[y] if y.ndim == 1 else y, dtype=torch.float32)
    kmax = min(ks[-1], len(train))
    sim = query @ train.T
    if exclude is not None:
        sim.masked_fill_(torch.from_numpy(exclude), float("-inf"))
    top_sim, top_idx = sim.topk(kmax, dim=1)
    weight = ((top_sim - top_sim[:, :1].clamp_min(-1.0)) / temperature).exp()
    votes = (y[top_idx] * weight[..., None]).cumsum(1)
    total = weight.cumsum(1)
    return {k: (votes[:, min(k, kmax) - 1] / total[:, min(k, kmax) - 1, None].clamp_min(1e-38)).numpy() for k in ks}


def lexicographic_nearest(train, query, k, exclude=None):
    """The spec of the exact search, in float64: usable rows by (similarity descending, row ascending)."""
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = qn @ tn.T
    if exclude is not None:
        sim[exclude] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(train)), sim.shape), -sim), axis=1)[:, :k]
    return np.take_along_axis(sim, order, 1), order


def random_case(multilabel, seed=0, n_train=90, n_query=40, dim=12, classes=4):
    rng = np.random.default_rng(seed)
    train, query = rng.normal(size=(n_train, dim)), rng.normal(size=(n_query, dim))
    if multilabel:
        y = (rng.random((n_train, classes)) < 0.4).astype(np.uint8)
        y[y.sum(1) == 0, 0] = 1
    else:
        y = rng.integers(0, classes, n_train)
    return train, query, y


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("q_block,t_block", BLOCKS)
def test_blocked_equals_unblocked(multilabel, q_block, t_block):
    train, query, y = random_case(multilabel)
    groups_train = np.arange(len(train)) % 9                # a query may not use rows of its group
    groups_query = np.arange(len(query)) % 9
    exclude = groups_query[:, None] == groups_train[None, :]
    exclude[0] = True                                       # a query with no usable row at all
    exclude[1, 3:] = True                                   # one with 3 rows (minus its group's) < k
    ks = [1, 5, 20, 200]                                    # 200 > the 90 training rows: clipped
    for mask in (None, exclude):
        old = unblocked_scores(train, y, query, ks, T, mask)
        new = knn_scores(train, y, query, ks, T, exclude=mask, q_block=q_block, t_block=t_block)
        for k in ks:
            np.testing.assert_allclose(new[k], old[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(predict(new[k], multilabel), predict(old[k], multilabel))
        # and the neighbours themselves are the spec's (no ties in continuous random data)
        sim, row = nearest(train, query, 20, mask, q_block=q_block, t_block=t_block)
        want_sim, want_row = lexicographic_nearest(train, query, 20, mask)
        usable = np.isfinite(want_sim)
        np.testing.assert_array_equal(row.numpy()[usable], want_row[usable])
        np.testing.assert_allclose(sim.numpy()[usable], want_sim[usable], atol=1e-6)
        assert np.all(sim.numpy()[~usable] == -np.inf)


@pytest.mark.parametrize("q_block,t_block", BLOCKS)
def test_ties_go_to_the_lower_row_whatever_the_blocks(q_block, t_block):
    rng = np.random.default_rng(3)
    # 0/1 rows: cosines are exact, many equal; 6 distinct vectors repeated, each copy its own class
    base = (rng.random((6, 5)) < 0.5).astype(np.float32)
    base[base.sum(1) == 0, 0] = 1
    train = base[rng.integers(0, 6, 300)]                  # (300, 5), every vector ~50 times
    query = base[rng.integers(0, 6, 25)]
    for k in (1, 4, 60):                                    # 60 > the copies of one vector: ties span values
        sim, row = nearest(train, query, k, q_block=q_block, t_block=t_block)
        want_sim, want_row = lexicographic_nearest(train, query, k)
        np.testing.assert_array_equal(row.numpy(), want_row)
        np.testing.assert_allclose(sim.numpy(), want_sim, atol=1e-6)
    # copies of one vector carry one label: which tied copy is kept cannot change the vote, so it is the old one
    base = rng.normal(size=(6, 5))
    pick = rng.integers(0, 6, 300)
    train, query, labels = base[pick], base[rng.integers(0, 6, 25)] + 0.1 * rng.normal(size=(25, 5)), pick % 3
    old = unblocked_scores(train, labels, query, [1, 7, 75], T)
    new = knn_scores(train, labels, query, [1, 7, 75], T, q_block=q_block, t_block=t_block)
    for k in old:
        np.testing.assert_allclose(new[k], old[k], rtol=1e-5, atol=1e-6)


def test_a_tie_across_labels_is_decided_by_row_order():
    train = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])   # rows 0 and 1 tie for the query
    query = np.array([[3.0, 0.0]])
    assert predict(knn_scores(train, np.array([0, 1, 1]), query, [1], T)[1], False).tolist() == [[1, 0]]
    assert predict(knn_scores(train, np.array([1, 0, 1]), query, [1], T)[1], False).tolist() == [[0, 1]]


def clustered(n=2000, dim=32, clusters=40, classes=5, seed=0):
    """Embeddings of `clusters` tight clusters, each of one class, plus label noise: k-NN has
    something to find, and an approximate index something to miss."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    cluster = rng.integers(0, clusters, n)
    x = (centers[cluster] + 0.8 * rng.normal(size=(n, dim))).astype(np.float32)
    label = np.where(rng.random(n) < 0.15, rng.integers(0, classes, n), cluster % classes)
    return x, label


def test_faiss_agrees_with_exact():
    x, label = clustered()
    train, query = x[400:], x[:400]
    search = Search("faiss", nprobe=4)
    assert nlist(len(train)) == 25                          # min(4 sqrt(1600) = 160, 1600 / 64): 4 of 25 probed
    _, exact_rows = nearest(train, query, 10)

    def recall(rows):
        return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(rows.numpy(), exact_rows.numpy())])

    approx_sim, approx_rows = nearest(train, query, 10, search=search)
    assert 0.95 <= recall(approx_rows) < 1.0                 # approximate: some neighbours are missed
    assert recall(nearest(train, query, 10, search=Search("faiss", nprobe=1))[1]) < recall(approx_rows)
    assert recall(nearest(train, query, 10, search=Search("faiss", nprobe=25))[1]) == 1.0  # every list
    assert np.all(np.diff(approx_sim.numpy(), axis=1) <= 0)  # most similar first, as exact
    # the same again: the index is seeded
    assert torch.equal(nearest(train, query, 10, search=search)[1], approx_rows)
    # through cross-validation: the macro F1 of both within 0.01 (the same vote on both)
    n = len(x)
    y1 = np.eye(5, dtype=np.uint8)[label]
    matched = Matched(np.arange(n), [f"r{i}" for i in range(n)], y1, None, list("abcde"), False, 0, "labels.csv")
    exact = cross_validate(x, matched, ks=[10, 20])
    approx = cross_validate(x, matched, ks=[10, 20], search=search)
    for e, a in zip(exact, approx):
        assert 0.5 < e.f1_macro_pooled < 0.99
        assert abs(e.f1_macro_pooled - a.f1_macro_pooled) <= 0.01


def test_faiss_refuses_to_exclude_and_both_refuse_a_k_beyond_the_rows():
    x, _ = clustered(n=200)
    with pytest.raises(ProtlocError, match="exact index"):
        nearest(x, x, 5, np.eye(200, dtype=bool), search=Search("faiss"))
    for search in (Search(), Search("faiss")):
        with pytest.raises(ProtlocError, match="201 neighbours asked of 200 training rows"):
            nearest(x, x, 201, search=search)
        sim, row = nearest(x, x[:0], 3, search=search)
        assert sim.shape == row.shape == (0, 3)


def write_case(tmp_path, n=600):
    x, label = clustered(n=n)
    ids = np.array([f"cell{i}" for i in range(n)])
    np.savez(tmp_path / "emb.npz", embeddings=x, ids=ids)
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"cell{i},c{c}\n" for i, c in enumerate(label)))
    return tmp_path / "emb.npz", tmp_path / "labels.csv"


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_index_flag_through_the_cli(tmp_path):
    emb, labels = write_case(tmp_path)
    records = {}
    for index, nprobe in (("exact", 4), ("faiss", 4), ("faiss", 1000)):
        out = tmp_path / f"{index}{nprobe}.json"
        r = run(["knn", emb, "--labels", labels, "-k", "5,10", "--index", index, "--nprobe", nprobe, "--json", out])
        assert r.exit_code == 0, r.output
        records[index, nprobe] = json.loads(out.read_text())["runs"][0]
    assert records["exact", 4]["meta"]["index"] == "exact" and "nprobe" not in records["exact", 4]["meta"]
    meta = records["faiss", 4]["meta"]
    assert meta["index"].startswith("faiss IndexIVFFlat") and meta["nprobe"] == 4 and meta["seed"] == 0
    assert "sqrt" in meta["nlist"] and meta["faiss"]
    # all lists probed: the inverted file is searched whole, so it finds exact's neighbours
    exhaustive = records["faiss", 1000]["results"]
    for e, a in zip(records["exact", 4]["results"], exhaustive):
        assert a["f1_macro_pooled"] == pytest.approx(e["f1_macro_pooled"], abs=1e-9)
    r = run(["knn", emb, "--labels", labels, "--loo", "--index", "faiss", "--quiet"])
    assert r.exit_code == 1
    assert r.stderr == ("protloc: error: the faiss index cannot leave a query's own rows out "
                                "(leave-one-out): use the exact index\n")
    assert run(["knn", emb, "--labels", labels, "--index", "annoy"]).exit_code == 2


def test_missing_faiss_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    emb, labels = write_case(tmp_path, n=100)
    monkeypatch.setitem(sys.modules, "faiss", None)   # `import faiss` raises ImportError
    with pytest.raises(ProtlocError, match=r"protloc\[faiss\]"):
        Search("faiss")
    out = tmp_path / "r.json"
    r = run(["knn", emb, "--labels", labels, "--index", "faiss", "--json", out])
    assert r.exit_code == 1 and not out.exists()
    assert r.stderr == "protloc: error: --index faiss needs faiss: pip install 'protloc[faiss]' (or faiss-cpu)\n"
