"""Evaluations that cannot measure say so, and labels and ids that do not line up are named.

- classes whose rows lie in one group are never trained on while tested: refused when no class
  can be measured, left out of scoring with a warning when some cannot (knn folds and --loo,
  finetune); --no-groups chooses the ungrouped protocol (images stay whole);
- a fold's macro F1 averages the classes its test truth holds; the pooled out-of-fold macro F1 is
  reported beside the per-fold mean, and is the mean of finetune's per-class table;
- class names differing only in case are one class; ids files are stripped; repeated ids are errors;
  a single class is no classifier.

Expected numbers are computed here independently: brute-force k-NN in float64 and scikit-learn's
metrics on the same folds.
"""

import json
import math
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GroupKFold, KFold

from protloc.cli import main
from protloc.crossval import cross_validate, plan, summarize
from protloc.errors import ProtlocError
from protloc.finetune import FinetuneConfig, FrozenTask, LabelledRows
from protloc.folds import check_folds, metrics, scored_classes, splits
from protloc.labels import read_labels

TINY = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def one_error_line(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("protloc: error: ") and not any("Traceback" in line for line in lines), result.stderr
    for needle in needles:
        assert str(needle) in lines[-1], lines[-1]
    return lines[-1]


def warning_lines(result, needle):
    return [line for line in result.stderr.splitlines() if line.startswith("protloc: warning: ") and needle in line]


def write_set(folder, x, ids, labels, groups=None, name="e"):
    """An .npz of rows x with ids, and labels.csv (id,label[,group])."""
    folder.mkdir(exist_ok=True)
    np.savez(folder / f"{name}.npz", embeddings=np.asarray(x, np.float32), ids=np.array(ids), meta=np.array("{}"))
    header = "id,label" + (",group" if groups is not None else "")
    rows = [f"{i},{lab}" + (f",{g}" if groups is not None else "") for i, lab, g in
            zip(ids, labels, groups if groups is not None else [None] * len(ids))]
    (folder / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return folder / f"{name}.npz", folder / "labels.csv"


def knn_predict(x, y, train, test, k, temperature=0.07):
    """DINO's weighted vote in float64, written plainly: the top class of each test row."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    pred = np.zeros((len(test), y.shape[1]), dtype=np.uint8)
    for row, i in enumerate(test):
        sim = xn[train] @ xn[i]
        nearest = np.argsort(-sim, kind="stable")[:k]
        votes = (np.exp(sim[nearest] / temperature)[:, None] * y[train][nearest]).sum(0)
        pred[row, votes.argmax()] = 1
    return pred


def sk_scores(y, pred, classes):
    """scikit-learn's macro F1 over `classes` (indices) and accuracy, on the rows whose true class is one of them."""
    t, p = y.argmax(1), pred.argmax(1)
    keep = np.isin(t, classes)
    return (f1_score(t[keep], p[keep], labels=classes, average="macro", zero_division=0),
            accuracy_score(t[keep], p[keep]))


# --- classes that cannot be measured ---------------------------------------------------------------


def test_one_protein_per_class_is_refused_until_the_ungrouped_protocol_is_chosen(tmp_path):
    """`protloc synth --masks` with one protein (group) per class: every knn / finetune --freeze on its
    cells printed macro F1 0.000 for every class; now a one-line error before any fitting."""
    f = tmp_path / "f"
    assert run(["synth", f, "--n", "8", "--size", "64", "--fields-per-protein", "2", "--masks", "-q"]).exit_code == 0
    cells = tmp_path / "cells.npz"
    images = sorted(str(p) for p in f.glob("*.tif"))
    assert run(["embed", *images, "--cells", f / "masks", "--border", "pad", "--size", "16", *TINY,
                "-o", cells]).exit_code == 0
    labels = f / "labels.csv"
    classes = sorted({line.split(",")[1] for line in labels.read_text().splitlines()[1:]})
    assert len(classes) == 4
    for args in (["knn", cells], ["knn", cells, "--loo"], ["finetune", cells, "--folds", "2"],
                 ["finetune", *images, "--freeze", "--cells", f / "masks", "--border", "pad", "--size", "16", *TINY,
                  "--folds", "2", "-o", tmp_path / "m.pt"]):
        line = one_error_line(run([*args, "--labels", labels]), labels, "no class can be measured", "--no-groups",
                              *classes[:3])
        assert "(1 group)" in line
    assert not (tmp_path / "m.pt").exists()

    # --no-groups: each image is a group (its cells stay together), 2 images per class
    with np.load(cells) as z:
        x, ids = z["embeddings"], [str(i) for i in z["ids"]]
    label_of = {f"{f / line.split(',')[0]}": line.split(",")[1] for line in labels.read_text().splitlines()[1:]}
    image = np.array([i.split("#")[0] for i in ids])
    y = np.eye(4, dtype=np.uint8)[[classes.index(label_of[i]) for i in image]]
    result = run(["knn", cells, "--labels", labels, "--loo", "--no-groups", "-k", "3", "--json", tmp_path / "loo.json"])
    assert result.exit_code == 0, result.output
    pred = np.concatenate([knn_predict(x, y, np.flatnonzero(image != image[i]), [i], 3) for i in range(len(x))])
    got = json.loads((tmp_path / "loo.json").read_text())["runs"][0]["results"][0]
    assert got["f1_macro_pooled"] == pytest.approx(sk_scores(y, pred, [0, 1, 2, 3])[0], abs=1e-9)
    assert json.loads((tmp_path / "loo.json").read_text())["runs"][0]["meta"]["no_groups"]
    finetuned = run(["finetune", cells, "--labels", labels, "--folds", "2", "--no-groups", "--epochs", "5"])
    assert finetuned.exit_code == 0 and "macro F1" in finetuned.stdout


def some_unmeasurable(seed=0):
    """Classes a and b in 6 groups each; class c only in group g0 (with a few a rows)."""
    rng = np.random.default_rng(seed)
    cls = np.array([0, 1] * 24 + [2] * 6)
    groups = np.array([f"g{i % 6}" for i in range(48)] + ["g0"] * 6)
    x = np.eye(3)[cls] * 1.2 + rng.normal(size=(len(cls), 3)) * 0.7
    x = np.concatenate([x, rng.normal(size=(len(cls), 5))], 1)
    return x, cls, groups


def test_unmeasurable_classes_are_named_and_left_out_of_scoring(tmp_path):
    x, cls, groups = some_unmeasurable()
    names = np.array(["a", "b", "c"])
    ids = [f"r{i}" for i in range(len(x))]
    emb, labels = write_set(tmp_path, x, ids, names[cls], groups)
    y = np.eye(3, dtype=np.uint8)[cls]

    loo = run(["knn", emb, "--labels", labels, "--loo", "-k", "5", "--json", tmp_path / "loo.json"])
    assert loo.exit_code == 0, loo.output
    assert len(warning_lines(loo, "c (1 group) cannot be measured")) == 1
    pred = np.concatenate([knn_predict(x, y, np.flatnonzero(groups != groups[i]), [i], 5) for i in range(len(x))])
    assert pred[:, 2].any()  # some a / b rows are voted c: misses, though c itself is not scored
    f1, acc = sk_scores(y, pred, [0, 1])
    got = json.loads((tmp_path / "loo.json").read_text())["runs"][0]["results"][0]
    assert (got["f1_macro_pooled"], got["accuracy_pooled"]) == (pytest.approx(f1, abs=1e-9),
                                                                pytest.approx(acc, abs=1e-9))
    assert loo.stdout.splitlines()[1].split() == ["5", f"{f1:.3f}", f"{acc:.3f}"]

    folds = run(["knn", emb, "--labels", labels, "--folds", "3", "-k", "5", "--json", tmp_path / "folds.json"])
    assert folds.exit_code == 0 and len(warning_lines(folds, "c (1 group) cannot be measured")) == 1
    pooled = np.zeros_like(y)
    per_fold = []
    for train, test in splits(y, groups, 3, 0):
        pooled[test] = knn_predict(x, y, train, test, 5)
        per_fold.append(sk_scores(y[test], pooled[test], [c for c in (0, 1) if c in cls[test]])[0])
    got = json.loads((tmp_path / "folds.json").read_text())["runs"][0]["results"][0]
    assert got["f1_macro_pooled"] == pytest.approx(sk_scores(y, pooled, [0, 1])[0], abs=1e-9)
    assert got["f1_per_fold"] == pytest.approx(per_fold, abs=1e-9)

    report = tmp_path / "cv.json"
    tuned = run(["finetune", emb, "--labels", labels, "--folds", "3", "--epochs", "20", "--json", report])
    assert tuned.exit_code == 0, tuned.output
    assert len(warning_lines(tuned, "c (1 group) cannot be measured")) == 1
    cv = json.loads(report.read_text())
    assert cv["scored_classes"] == ["a", "b"] and cv["per_class_f1"]["c"] is None
    assert cv["macro_f1_pooled"]["mean"] == pytest.approx((cv["per_class_f1"]["a"] + cv["per_class_f1"]["b"]) / 2)
    assert [line.split()[:2] for line in tuned.stdout.splitlines()[1:4]][2] == ["c", "n/a"]


def uneven_wells(seed=0, per=4, wells=8):
    """3 classes; well w holds 2 of them (pairs 01, 12, 02 in turn), `per` rows of each."""
    pairs = [(0, 1), (1, 2), (0, 2)]
    rows = [(w, c) for w in range(wells) for c in pairs[w % 3] for _ in range(per)]
    rng = np.random.default_rng(seed)
    cls = np.array([c for _, c in rows])
    x = rng.normal(size=(3, 12))[cls] * 0.9 + rng.normal(size=(len(rows), 12))
    return x.astype(np.float32), cls, np.array([f"well{w}" for w, _ in rows])


def test_a_folds_macro_f1_averages_only_the_classes_it_tests(tmp_path):
    """finetune --folds 4 on wells holding 2 of 3 classes printed per-class F1 0.785 / 0.569 / 0.901
    and "macro F1 0.445": folds were averaged over classes they never showed. Now each fold averages
    the classes of its test truth, and the pooled figure is the mean of the per-class table."""
    x, cls, groups = uneven_wells()
    y = np.eye(3, dtype=np.uint8)[cls]
    fold_list = list(splits(y, groups, 4, 0))
    assert any(len(set(cls[test])) < 3 for _, test in fold_list)  # the case at hand: a fold without a class
    names = np.array(["cytosol", "er", "nucleoplasm"])
    ids = [f"cell{i}" for i in range(len(x))]
    emb, labels = write_set(tmp_path, x, ids, names[cls], groups)

    knn = run(["knn", emb, "--labels", labels, "--folds", "4", "-k", "5", "--json", tmp_path / "knn.json"])
    assert knn.exit_code == 0, knn.output
    pooled, per_fold, accs = np.zeros_like(y), [], []
    for train, test in fold_list:
        pooled[test] = knn_predict(x, y, train, test, 5)
        f1, acc = sk_scores(y[test], pooled[test], sorted(set(cls[test])))
        per_fold.append(f1)
        accs.append(acc)
    got = json.loads((tmp_path / "knn.json").read_text())["runs"][0]["results"][0]
    assert got["f1_per_fold"] == pytest.approx(per_fold, abs=1e-9)
    assert got["f1_macro_pooled"] == pytest.approx(sk_scores(y, pooled, [0, 1, 2])[0], abs=1e-9)
    want = ["5", f"{got['f1_macro_pooled']:.3f}", f"{np.mean(per_fold):.3f}", "±", f"{np.std(per_fold):.3f}",
            f"{np.mean(accs):.3f}", "±", f"{np.std(accs):.3f}"]
    assert knn.stdout.splitlines()[1].split() == want
    assert knn.stdout.splitlines()[0].split() == ["k", "macro", "F1", "pooled", "macro", "F1", "per", "fold",
                                                  "accuracy", "per", "fold"]

    report = tmp_path / "cv.json"
    tuned = run(["finetune", emb, "--labels", labels, "--folds", "4", "--seeds", "2", "--epochs", "30",
                 "--json", report])
    assert tuned.exit_code == 0, tuned.output
    cv = json.loads(report.read_text())
    seed_f1 = []
    for seed in cv["seeds"]:  # per-class F1 from each seed's pooled confusion matrix, independently
        conf = np.array(seed["confusion_matrix"], dtype=float)
        from_confusion = 2 * np.diag(conf) / (conf.sum(0) + conf.sum(1))
        np.testing.assert_allclose([seed["per_class_f1"][c] for c in names], from_confusion, atol=1e-12)
        seed_f1.append(from_confusion.mean())
    per_class = [cv["per_class_f1"][c] for c in names]  # the table: means over seeds
    assert cv["macro_f1_pooled"]["mean"] == pytest.approx(np.mean(per_class), abs=1e-12)
    assert (cv["macro_f1_pooled"]["mean"], cv["macro_f1_pooled"]["std"]) == (pytest.approx(np.mean(seed_f1)),
                                                                             pytest.approx(np.std(seed_f1)))
    assert cv["macro_f1_pooled"]["n"] == 2 and cv["macro_f1"]["n"] == 8
    lines = tuned.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == list(names)
    p, f = cv["macro_f1_pooled"], cv["macro_f1"]
    assert lines[4].split() == ["macro", "F1", "pooled", f"{p['mean']:.3f}", "±", f"{p['std']:.3f},", "per", "fold",
                                f"{f['mean']:.3f}", "±", f"{f['std']:.3f}", "(4", "folds", "x", "2", "seeds)"]
    assert lines[5].split()[:3] == ["accuracy", "pooled", f"{cv['accuracy_pooled']['mean']:.3f}"]


def test_each_run_is_scored_on_its_own_test_truth():
    """The library's runs, checked against scikit-learn on each fold's own predictions."""
    x, cls, groups = uneven_wells(seed=1)
    y = np.eye(3, dtype=np.uint8)[cls]
    rows = LabelledRows([f"r{i}" for i in range(len(x))], y, groups, ["a", "b", "c"], False)
    split_list = plan(y, groups, False, 4, 2, val_fraction=0.0)
    runs, pooled = cross_validate(FrozenTask(x, rows, FinetuneConfig(epochs=20)), y, False, split_list)
    for sp, r in zip(split_list, runs):
        pred = np.eye(3, dtype=np.uint8)[pooled[sp.seed][sp.test].argmax(1)]
        f1, acc = sk_scores(y[sp.test], pred, sorted(set(cls[sp.test])))
        assert (r.macro_f1, r.accuracy) == (pytest.approx(f1, abs=1e-12), pytest.approx(acc, abs=1e-12))
    report = summarize(runs, pooled, y, rows.classes, False)
    seed_f1 = [f1_score(cls, pooled[s].argmax(1), average="macro") for s in sorted(pooled)]
    assert report["macro_f1_pooled"]["mean"] == pytest.approx(np.mean(seed_f1), abs=1e-12)
    assert report["macro_f1_pooled"]["std"] == pytest.approx(np.std(seed_f1), abs=1e-12)


def test_metrics_match_scikit_learn_with_and_without_scored_classes():
    rng = np.random.default_rng(0)
    for _ in range(30):
        t = rng.integers(0, 5, 40)
        p = np.where(rng.random(40) < 0.6, t, rng.integers(0, 5, 40))
        scored = rng.random(5) < 0.7
        scored[t[0]] = True
        keep = np.isin(t, np.flatnonzero(scored))
        f1, acc = metrics(np.eye(5)[t], np.eye(5)[p], scored)
        present = np.intersect1d(np.flatnonzero(scored), t)
        assert f1 == pytest.approx(f1_score(t[keep], p[keep], labels=present, average="macro", zero_division=0))
        assert acc == pytest.approx(accuracy_score(t[keep], p[keep]))
        # multi-label: the scored columns of the rows carrying a scored class; subset accuracy
        tm, pm = (rng.random((40, 5)) < 0.3).astype(np.uint8), (rng.random((40, 5)) < 0.3).astype(np.uint8)
        tm[np.arange(40), t] = 1
        keep = tm[:, scored].any(1)
        present = np.flatnonzero(tm[keep][:, scored].any(0))
        f1, acc = metrics(tm, pm, scored)
        assert f1 == pytest.approx(f1_score(tm[keep][:, scored], pm[keep][:, scored], labels=present, average="macro",
                                            zero_division=0))
        assert acc == pytest.approx(accuracy_score(tm[keep][:, scored], pm[keep][:, scored]))
    assert metrics(np.eye(3)[[2, 2]], np.eye(3)[[0, 1]], np.array([True, True, False])) is None


def test_multilabel_classes_count_the_groups_of_the_rows_carrying_them(caplog):
    y = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=np.uint8)
    groups = np.array(["g0", "g0", "g1", "g1", "g2", "g2"])  # c only in g0 (with a)
    assert scored_classes(y, groups, ["a", "b", "c"], "l.csv").tolist() == [True, True, False]
    assert "c (1 group) cannot be measured" in caplog.text
    with pytest.raises(ProtlocError, match=r"l.csv: no class can be measured \(a \(1 group\), b \(1 group\)\)"):
        scored_classes(y[:, :2], np.array(["g0"] * 6), ["a", "b"], "l.csv")
    with pytest.raises(ProtlocError, match="l.csv: the labelled rows hold only the class a"):
        scored_classes(np.ones((4, 1)), None, ["a"], "l.csv")


def test_multilabel_folds_are_not_stratified():
    """What the README says: multi-label folds are scikit-learn's plain KFold, or GroupKFold."""
    y = (np.random.default_rng(0).random((30, 3)) < 0.5).astype(np.uint8)
    groups = np.arange(30) // 3
    ours = [test.tolist() for _, test in splits(y, None, 4, 7, multilabel=True)]
    assert ours == [test.tolist() for _, test in KFold(4, shuffle=True, random_state=7).split(y)]
    try:
        splitter = GroupKFold(4, shuffle=True, random_state=7)
    except TypeError:
        splitter = GroupKFold(4)
    ours = [test.tolist() for _, test in splits(y, groups, 4, 7, multilabel=True)]
    assert ours == [test.tolist() for _, test in splitter.split(y, groups=groups)]


def test_a_fold_that_trains_on_none_of_a_tested_class_is_named(caplog):
    y = np.eye(2, dtype=np.uint8)[[0, 0, 1, 1, 0, 1]]
    check_folds(y, [(np.array([0, 1, 4]), np.array([2, 3, 5])), (np.array([2, 3, 5]), np.array([0, 1, 4]))],
                ["er", "golgi"], np.array([True, True]))
    assert caplog.text.count("the folds test class(es) er, golgi in a fold that trains on none of them") == 1


def test_no_groups_keeps_the_tiles_of_an_image_together(tmp_path):
    """Tiles of one image are near-copies: split apart they would find each other and score ~1."""
    rng = np.random.default_rng(0)
    images = 12
    image_x = rng.normal(size=(images, 8))
    x = np.repeat(image_x, 4, axis=0) + 0.01 * rng.normal(size=(4 * images, 8))
    ids = [f"img{i}.tif#tile={t}" for i in range(images) for t in range(4)]
    image_label = np.arange(images) % 2
    (tmp_path / "labels.csv").write_text("id,label,group\n" + "".join(
        f"img{i}.tif,{'ab'[image_label[i]]},well{i % 2}\n" for i in range(images)))  # group = class: unmeasurable
    np.savez(tmp_path / "e.npz", embeddings=x.astype(np.float32), ids=np.array(ids), meta=np.array("{}"))
    one_error_line(run(["knn", tmp_path / "e.npz", "--labels", tmp_path / "labels.csv", "--loo"]), "--no-groups")
    result = run(["knn", tmp_path / "e.npz", "--labels", tmp_path / "labels.csv", "--loo", "--no-groups", "-k", "1"])
    assert result.exit_code == 0, result.output
    y = np.eye(2, dtype=np.uint8)[np.repeat(image_label, 4)]
    image = np.repeat(np.arange(images), 4)
    pred = np.concatenate([knn_predict(x, y, np.flatnonzero(image != image[i]), [i], 1) for i in range(len(x))])
    f1 = sk_scores(y, pred, [0, 1])[0]
    assert f1 < 0.9 and result.stdout.splitlines()[1].split()[1] == f"{f1:.3f}"


# --- labels and ids ----------------------------------------------------------------------------------


def test_class_names_differing_in_case_or_blanks_are_one_class(tmp_path, caplog):
    csv = tmp_path / "labels.csv"
    csv.write_text("id,label\na,Nucleoplasm \nb, nucleoplasm\nc,nucleoplasm\nd,Nucleoplasm\ne,ER\nf,er;Cytosol\n"
                   "g,cytosol\nh,ER\n")
    labels = read_labels(csv)
    # Nucleoplasm and nucleoplasm 2 rows each: the first met wins the tie; ER 2 rows, er 1
    assert labels.classes == ["Cytosol", "ER", "Nucleoplasm"] and labels.multilabel
    assert labels.labels == [("Nucleoplasm",), ("Nucleoplasm",), ("Nucleoplasm",), ("Nucleoplasm",), ("ER",),
                             ("Cytosol", "ER"), ("Cytosol",), ("ER",)]
    merged = [r.getMessage() for r in caplog.records if "differ only in case" in r.getMessage()]
    assert len(merged) == 1
    assert "'Nucleoplasm' (2 rows) and 'nucleoplasm' (2 rows) -> 'Nucleoplasm'" in merged[0]
    assert "'ER' (2 rows) and 'er' (1 row) -> 'ER'" in merged[0] and "'Cytosol' (1 row) and 'cytosol'" in merged[0]
    # the same image listed again in another case is a repeat, not a conflict; "a;A" is one label
    csv.write_text("id,label\na,ER\na,er\nb,ER;er\nc,golgi\n")
    labels = read_labels(csv)
    assert labels.keys == ["a", "b", "c"] and labels.labels == [("ER",), ("ER",), ("golgi",)] and not labels.multilabel


def test_messy_class_names_score_as_the_clean_ones(tmp_path):
    x, cls, groups = uneven_wells(seed=2, per=3, wells=9)
    ids = [f"cell{i}" for i in range(len(x))]
    clean = tmp_path / "clean"
    emb, labels = write_set(clean, x, ids, np.array(["nucleoplasm", "cytosol", "er"])[cls], groups)
    messy = labels.read_text().replace(",nucleoplasm,", ",Nucleoplasm ,", 5).replace(",cytosol,", ", cytosol,", 3)
    (tmp_path / "messy.csv").write_text(messy)
    want = run(["knn", emb, "--labels", labels, "-k", "5", "--folds", "3"])
    got = run(["knn", emb, "--labels", tmp_path / "messy.csv", "-k", "5", "--folds", "3"])
    assert got.exit_code == 0 and got.stdout == want.stdout
    assert "3 classes" in got.stderr
    assert len(warning_lines(got, "'Nucleoplasm' (5 rows) and 'nucleoplasm'")) == 1


def test_ids_files_are_read_stripped_and_refused_when_blank_or_repeated(tmp_path):
    x, cls, groups = uneven_wells(per=2)
    ids = [f"cell{i}" for i in range(len(x))]
    emb, labels = write_set(tmp_path, x, ids, np.array(["a", "b", "c"])[cls], groups)
    np.save(tmp_path / "e.npy", x)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    want = run(["knn", tmp_path / "e.npy", "--ids", tmp_path / "ids.txt", "--labels", labels,
                "-k", "3", "--folds", "3"])
    assert want.exit_code == 0, want.output
    (tmp_path / "blanks.txt").write_text("".join(f"{i}  \r\n" if n % 2 else f" {i}\t\n" for n, i in enumerate(ids))
                                         + "\n\n")
    got = run(["knn", tmp_path / "e.npy", "--ids", tmp_path / "blanks.txt", "--labels", labels,
               "-k", "3", "--folds", "3"])
    assert got.exit_code == 0 and got.stdout == want.stdout

    (tmp_path / "hole.txt").write_text("\n".join(ids[:3] + [""] + ids[3:-1]) + "\n")
    one_error_line(run(["knn", tmp_path / "e.npy", "--ids", tmp_path / "hole.txt", "--labels", labels]),
                   "hole.txt: line 4 is blank")

    twice = ids[:5] + ["cell2 "] + ids[6:]  # cell2 again, with a trailing blank
    (tmp_path / "twice.txt").write_text("\n".join(twice) + "\n")
    assert run(["finetune", emb, "--labels", labels, "--folds", "0", "-o", tmp_path / "m.pt",
                "--epochs", "3"]).exit_code == 0
    for args in (["knn", tmp_path / "e.npy", "--labels", labels],
                 ["finetune", tmp_path / "e.npy", "--labels", labels, "-o", tmp_path / "m2.pt"],
                 ["predict", tmp_path / "e.npy", "--weights", tmp_path / "m.pt"],
                 ["plot", "embedding", tmp_path / "e.npy", "-o", tmp_path / "map.png"]):
        result = run([*args, "--ids", tmp_path / "twice.txt"])
        one_error_line(result, "twice.txt", "id cell2 is repeated (rows 3 and 6)")
        assert result.stdout == ""
    assert not (tmp_path / "m2.pt").exists() and not (tmp_path / "map.png").exists()

    np.savez(tmp_path / "twice.npz", embeddings=x, ids=np.array(ids[:5] + ["cell2"] + ids[6:]), meta=np.array("{}"))
    one_error_line(run(["predict", tmp_path / "twice.npz", "--weights", tmp_path / "m.pt"]),
                   "twice.npz", "id cell2 is repeated")


def test_a_single_class_is_no_classifier(tmp_path):
    x = np.random.default_rng(0).normal(size=(12, 4))
    ids = [f"r{i}" for i in range(12)]
    emb, labels = write_set(tmp_path, x, ids, ["Golgi"] * 6 + ["golgi "] * 6, [f"g{i % 4}" for i in range(12)])
    for folds in ("0", "3"):
        result = run(["finetune", emb, "--labels", labels, "--folds", folds, "-o", tmp_path / "m.pt"])
        one_error_line(result, "labels.csv", "only the class Golgi", "at least 2 classes")
        assert not (tmp_path / "m.pt").exists()
    one_error_line(run(["knn", emb, "--labels", labels, "--folds", "3"]), "only the class Golgi")


def test_the_temperature_check_is_the_vote_functions_own():
    from protloc.knn import knn_scores

    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ProtlocError, match="temperature must be a positive number"):
            knn_scores(np.eye(2), [0, 1], np.eye(2), [1], bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(knn_scores(np.eye(2), [0, 1], np.eye(2), [1], 1e-30)[1]).all()
