"""k-NN evaluation: against an independent brute-force weighted vote, by hand, and CV splits."""

import json
import logging

import numpy as np
import pytest
from sklearn.metrics import f1_score

from protloc.errors import ProtlocError
from protloc.folds import predict, scored_classes, splits
from protloc.knn import KnnResult, cross_validate, format_table, knn_scores, results_to_json
from protloc.labels import Matched

T = 0.07


def clustered(n=60, dim=16, n_clusters=3, spread=1.5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    cluster = np.arange(n) % n_clusters
    return centers[cluster] + spread * rng.normal(size=(n, dim)), cluster


def one_hot(labels, n_classes):
    return np.eye(n_classes, dtype=np.uint8)[labels]


def brute_force(x, y, groups, k, temperature, multilabel):
    """Leave-one-out predictions with the full n x n similarity: the spec, written plainly."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    preds = np.zeros_like(y)
    for i in range(len(x)):
        allowed = [j for j in range(len(x)) if j != i and (groups is None or groups[j] != groups[i])]
        nearest = sorted(allowed, key=lambda j: -sim[i, j])[:k]
        votes = np.zeros(y.shape[1])
        total = 0.0
        for j in nearest:
            w = np.exp(sim[i, j] / temperature)
            votes += w * y[j]
            total += w
        if multilabel:
            chosen = np.flatnonzero(votes / total >= 0.5)
            preds[i, chosen if len(chosen) else [np.argmax(votes)]] = 1
        else:
            preds[i, np.argmax(votes)] = 1
    return preds


def labelled(y, groups=None, rows=None, unlabeled=0):
    """Matched rows 0..n-1 (or `rows`) with ids r0, r1, ... and classes a, b, c."""
    rows = np.arange(len(y)) if rows is None else rows
    return Matched(rows, [f"r{i}" for i in rows], y, groups, ["a", "b", "c"], y.sum(1).max() > 1, unlabeled,
                   "labels.csv")


def loo_mask(groups, n):
    own = np.arange(n) if groups is None else np.unique(groups, return_inverse=True)[1]
    return own[:, None] == own[None, :]


def dataset(multilabel, seed=0):
    x, cluster = clustered(seed=seed)
    rng = np.random.default_rng(seed + 1)
    if not multilabel:
        labels = np.where(rng.random(len(x)) < 0.2, rng.integers(0, 3, len(x)), cluster)  # some noise
        return x, one_hot(labels, 3)
    # class 0 <- clusters 0 and 2, class 1 <- clusters 1 and 2, class 2 random: overlapping labels
    y = np.stack([np.isin(cluster, [0, 2]), np.isin(cluster, [1, 2]), rng.random(len(x)) < 0.3], 1)
    flip = rng.random(y.shape) < 0.1
    y = (y ^ flip).astype(np.uint8)
    y[y.sum(1) == 0, 0] = 1
    return x, y


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_loo_matches_brute_force(multilabel, grouped):
    x, y = dataset(multilabel)
    groups = np.asarray([f"g{i}" for i in np.random.default_rng(5).integers(0, 12, len(x))]) if grouped else None
    matched = labelled(y, groups)
    ks = [1, 3, 5, 10, 20]
    results = {r.k: r for r in cross_validate(x, matched, ks=ks, loo=True, temperature=T)}
    scores = knn_scores(x, y, x, ks, T, exclude=loo_mask(groups, len(x)))
    assert sorted(results) == ks
    for k in ks:
        expected = brute_force(x, y, groups, k, T, multilabel)
        np.testing.assert_array_equal(predict(scores[k], multilabel), expected)
        if multilabel:
            present = np.flatnonzero(y.any(0) | expected.any(0))
            f1 = f1_score(y, expected, labels=present, average="macro", zero_division=0)
            acc = np.mean(np.all(y == expected, axis=1))
        else:
            f1 = f1_score(y.argmax(1), expected.argmax(1), average="macro", zero_division=0)
            acc = np.mean(y.argmax(1) == expected.argmax(1))
        assert results[k].f1_macro_mean == pytest.approx(f1, abs=1e-12)
        assert results[k].accuracy_mean == pytest.approx(acc, abs=1e-12)
        assert results[k].f1_macro_std == 0.0 and results[k].f1_per_fold == [results[k].f1_macro_mean]
    # the data is not trivial: the comparison exercised wrong predictions too
    assert 0.3 < results[5].f1_macro_mean < 1.0


def test_hand_computed():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cosine similarity to the query: 1, 0, 1/sqrt(2)
    labels = np.array([0, 1, 1])
    query = np.array([[2.0, 0.0]])
    s = np.sqrt(0.5)
    # T = 1: weights e^1 (class 0), e^0.707 and e^0 (class 1): class 1 wins at k = 3, class 0 at k = 1, 2
    scores = knn_scores(train, labels, query, ks=[1, 2, 3], temperature=1.0)
    np.testing.assert_allclose(scores[1], [[1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(scores[2], [[np.e / (np.e + np.exp(s)), np.exp(s) / (np.e + np.exp(s))]], rtol=1e-5)
    total = np.e + np.exp(s) + 1
    np.testing.assert_allclose(scores[3], [[np.e / total, (np.exp(s) + 1) / total]], rtol=1e-5)
    assert predict(scores[3], False).tolist() == [[0, 1]]
    # a sharp temperature lets the nearest neighbour dominate again
    assert predict(knn_scores(train, labels, query, ks=[3], temperature=0.07)[3], False).tolist() == [[1, 0]]
    # excluding the nearest item: the vote at k = 1 goes to the next one
    excl = np.array([[True, False, False]])
    np.testing.assert_allclose(knn_scores(train, labels, query, [1], 1.0, exclude=excl)[1], [[0.0, 1.0]])


def test_multilabel_predict_rule():
    scores = np.array([[0.6, 0.55, 0.1], [0.4, 0.3, 0.3], [0.5, 0.2, 0.5]])
    assert predict(scores, True).tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 1]]
    assert predict(scores, False).tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]


def test_chunked_equals_unchunked():
    x, y = dataset(False)
    groups = np.arange(len(x)) // 4
    mask = loo_mask(groups, len(x))
    full = knn_scores(x, y, x, [1, 7, 30], T, exclude=mask)
    by_array = knn_scores(x, y, x, [1, 7, 30], T, exclude=mask, q_block=3, t_block=7)
    calls = []

    def by_block(queries, train):
        calls.append((queries.start, queries.stop, train.start, train.stop))
        return mask[queries, train]

    by_callable = knn_scores(x, y, x, [1, 7, 30], T, exclude=by_block, q_block=3, t_block=7)
    assert calls[0] == (0, 3, 0, 7) and calls[-1] == (57, 60, 56, 60) and len(calls) == 20 * 9
    for k in full:
        np.testing.assert_allclose(by_array[k], full[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(by_callable[k], full[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("multilabel", [False, True])
def test_grouped_splits_disjoint(multilabel):
    x, y = dataset(multilabel)
    groups = np.asarray([f"g{i}" for i in np.random.default_rng(3).integers(0, 15, len(x))])
    tested = np.zeros(len(x), dtype=int)
    n_folds = 0
    for train, test in splits(y, groups, folds=5, seed=0, multilabel=multilabel):
        assert not set(groups[train]) & set(groups[test])
        assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(x)
        tested[test] += 1
        n_folds += 1
    assert n_folds == 5 and (tested == 1).all()


def test_ungrouped_splits_cover_every_row_once():
    x, y = dataset(False)
    tested = np.zeros(len(x), dtype=int)
    for _, test in splits(y, None, folds=4, seed=1):
        tested[test] += 1
    assert (tested == 1).all()


def test_too_many_folds():
    x, y = dataset(False)
    groups = np.asarray(["a", "b", "c"] * 20)
    with pytest.raises(ProtlocError, match="5 folds need at least 5 groups"):
        cross_validate(x, labelled(y, groups), folds=5)
    small = labelled(one_hot(np.array([0, 0, 1, 1]), 3))
    with pytest.raises(ProtlocError, match="at least 5 labelled rows"):
        cross_validate(x, small, folds=5)


def test_separated_clusters_score_perfectly():
    x, cluster = clustered(n=90, spread=0.05)
    for r in cross_validate(x, labelled(one_hot(cluster, 3)), ks=(1, 5, 10), folds=5):
        assert r.f1_macro_mean == 1.0 and r.accuracy_mean == 1.0 and len(r.f1_per_fold) == 5


def test_random_labels_score_about_chance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16))
    for r in cross_validate(x, labelled(one_hot(rng.integers(0, 3, len(x)), 3)), ks=(10, 20), folds=5):
        assert 0.22 < r.f1_macro_mean < 0.45


def test_rows_select_embeddings_and_k_is_clipped(caplog):
    x, cluster = clustered(n=12, spread=0.05)
    x = np.concatenate([np.full((3, x.shape[1]), 99.0), x])  # 3 unlabelled rows first
    matched = labelled(one_hot(cluster, 3), rows=np.arange(3, 15), unlabeled=3)
    with caplog.at_level(logging.WARNING, logger="protloc.knn"):
        results = cross_validate(x, matched, ks=(1, 50), loo=True)
    assert [r.k for r in results] == [1, 11]
    assert sum("larger than the 11 training rows" in m for m in caplog.messages) == 1
    assert results[0].f1_macro_mean == 1.0


def test_table_and_json():
    results = [KnnResult(1, 0.8234, 0.84, 0.8123, 0.0213, 0.83, 0.018, [0.8, 0.82]),
               KnnResult(20, 0.95, 0.96, 0.9, 0.0, 0.91, 0.0, [0.9, 0.9])]
    lines = format_table([("e.npz", results)]).splitlines()
    assert lines[0].split() == ["k", "macro", "F1", "pooled", "macro", "F1", "per", "fold", "accuracy", "per", "fold"]
    assert lines[1] == "1    0.823              0.812 ± 0.021      0.830 ± 0.018"
    assert lines[0].index("macro F1 per fold") == lines[1].index("0.812")
    assert lines[0].index("accuracy") == lines[1].index("0.830")
    side_by_side = format_table([("random.npz", results), ("dino.npz", results[::-1])]).splitlines()
    assert side_by_side[0].split() == ["random.npz", "dino.npz"] and len(side_by_side) == 4
    assert side_by_side[2].split() == ["1", "0.823", "0.812", "±", "0.021", "0.830", "±", "0.018",
                                       "0.950", "0.900", "±", "0.000", "0.910", "±", "0.000"]
    assert side_by_side[0].index("dino.npz") == side_by_side[2].index("0.950")
    loo = format_table([("e.npz", results)], loo=True).splitlines()
    assert (loo[0].split() == ["k", "macro", "F1", "pooled", "accuracy", "pooled"]
            and loo[1].split() == ["1", "0.823", "0.840"])
    record = json.loads(json.dumps(results_to_json(results, {"folds": 2})))
    assert record["meta"] == {"folds": 2} and record["results"][1]["k"] == 20


def test_a_class_with_fewer_rows_than_folds_is_a_clear_warning(caplog):
    import warnings

    y = np.array([0] * 10 + [1] * 10 + [2] * 3)  # class "rare" has three rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's own UserWarning must not leak out
        folds = list(splits(y, folds=5))
    assert len(folds) == 5 and sorted(np.concatenate([t for _, t in folds])) == list(range(23))
    assert scored_classes(one_hot(y, 3), None, ["a", "b", "rare"], "labels.csv", folds=5).all()
    assert "rare (3 rows) have fewer rows than the 5 folds" in caplog.text
