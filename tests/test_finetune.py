"""finetune and predict: the head, the cross-validation protocol, MODEL files and the commands."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from protloc.checkpoint import load_checkpoint, save_checkpoint
from protloc.cli import main
from protloc.crossval import cross_validate, plan, stratified_fraction, summarize, validation_split
from protloc.finetune import FinetuneConfig, FrozenTask, LabelledRows, layer_groups, rows_of
from protloc.head import Head, epoch_order, loss_function, sample_weights
from protloc.model import ViTConfig, VisionTransformer
from protloc.synth import write_dataset

TINY = ["--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def one_error_line(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("protloc: error: "), result.stderr
    for needle in needles:
        assert str(needle) in lines[-1], lines[-1]


def blobs(n=80, dim=32, classes=4, spread=0.6, seed=0, multilabel=False):
    """Separable clusters: row i is class i % classes; groups of 4 rows share a class."""
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % classes
    y = np.eye(classes, dtype=np.uint8)[cls]
    if multilabel:  # every third row also carries the next class, and sits between both centers
        extra = np.arange(0, n, 3)
        y[extra, (cls[extra] + 1) % classes] = 1
    centers = rng.normal(size=(classes, dim)) * 3
    x = (y @ centers) / y.sum(1, keepdims=True) + spread * rng.normal(size=(n, dim))
    groups = np.array([f"g{(i // classes) // 4}_{i % classes}" for i in range(n)])
    return x.astype(np.float32), LabelledRows([f"r{i}" for i in range(n)], y, groups,
                                              [f"c{k}" for k in range(classes)], multilabel)


def cross_validated(x, rows, folds=4, seeds=1, **cfg):
    task = FrozenTask(x, rows, FinetuneConfig(**{"epochs": 60, **cfg}))
    splits = plan(rows.y, rows.groups, rows.multilabel, folds, seeds)
    runs, pooled = cross_validate(task, rows.y, rows.multilabel, splits)
    return summarize(runs, pooled, rows.y, rows.classes, rows.multilabel)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_frozen_head_separates_separable_embeddings(head):
    x, rows = blobs()
    report = cross_validated(x, rows, head=head)
    assert report["macro_f1"]["mean"] > 0.95, report["macro_f1"]
    shuffled = LabelledRows(rows.ids, rows.y[np.random.default_rng(1).permutation(len(x))], rows.groups,
                            rows.classes, False)
    assert cross_validated(x, shuffled, head=head)["macro_f1"]["mean"] < 0.6  # the same head on noise labels


def test_folds_times_seeds_report_mean_and_std():
    x, rows = blobs(spread=5.0)  # overlapping: scores differ between runs
    report = cross_validated(x, rows, folds=3, seeds=2)
    runs = report["runs"]
    assert [(r["seed"], r["fold"]) for r in runs] == [(s, k) for s in (0, 1) for k in range(3)]
    f1s = [r["macro_f1"] for r in runs]
    assert report["macro_f1"] == {"mean": pytest.approx(np.mean(f1s)), "std": pytest.approx(np.std(f1s)), "n": 6}
    assert report["macro_f1"]["std"] > 0
    assert sum(r["n_test"] for r in runs) == 2 * len(x)  # every row tested once per seed
    confusion = np.array(report["confusion_matrix"])
    assert confusion.shape == (4, 4) and confusion.sum() == 2 * len(x)
    assert set(report["per_class_f1"]) == set(rows.classes)


def test_folds_never_leak_a_group_and_validation_comes_from_training():
    x, rows = blobs()
    for sp in plan(rows.y, rows.groups, False, folds=4, seeds=2, fraction=0.5, val_fraction=0.25):
        assert not set(rows.groups[np.concatenate([sp.train, sp.val])]) & set(rows.groups[sp.test])
        assert not set(rows.groups[sp.train]) & set(rows.groups[sp.val])
        assert len(sp.val) and not set(sp.train) & set(sp.val)


def test_fraction_is_stratified_and_seeded():
    y = np.eye(3, dtype=np.uint8)[np.repeat([0, 1, 2], [40, 20, 3])]
    rows = np.arange(len(y))
    a = stratified_fraction(y, rows, 0.25, np.random.default_rng(0))
    assert np.bincount(y[a].argmax(1)).tolist() == [10, 5, 1]  # round(f * n_c), at least one
    assert np.array_equal(a, stratified_fraction(y, rows, 0.25, np.random.default_rng(0)))
    assert not np.array_equal(a, stratified_fraction(y, rows, 0.25, np.random.default_rng(1)))
    assert np.array_equal(stratified_fraction(y, rows, 1.0, np.random.default_rng(0)), rows)
    x, labelled = blobs()
    sizes = {len(sp.train) + len(sp.val) for sp in plan(labelled.y, labelled.groups, False, 4, 1, fraction=0.5)}
    assert sizes == {30}  # half of each 60-row training part, 15 per class


def test_validation_split_falls_back_when_groups_or_classes_are_few():
    y = np.eye(2, dtype=np.uint8)[np.arange(20) % 2]
    train, val, grouped = validation_split(y, np.array(["a", "b"] * 10), np.arange(20), 0.2, 0, False)
    assert not grouped and len(val) == 4 and not set(train) & set(val)  # 2 groups: ungrouped
    train, val, _ = validation_split(np.eye(10, dtype=np.uint8)[np.arange(20) % 10], None, np.arange(20), 0.1, 0, False)
    assert len(val) == 2 and len(train) == 18  # classes of 2 rows cannot be stratified 10 ways


def test_multilabel_head():
    x, rows = blobs(multilabel=True, spread=0.3)
    report = cross_validated(x, rows, folds=3, lr=1e-2)
    assert report["multilabel"] and report["macro_f1"]["mean"] > 0.9
    assert np.array(report["confusion_matrix"]).shape == (4, 2, 2)


def test_class_balance_weights_and_sampling():
    y = np.eye(3, dtype=np.uint8)[np.repeat([0, 1, 2], [60, 30, 10])]
    logits, t = torch.zeros(3, 3), torch.tensor([0, 1, 2])
    weighted = loss_function(y, False, "weight")(torch.tensor([[9.0, 0, 0]]), torch.tensor([2]))
    plain = loss_function(y, False, "none")(torch.tensor([[9.0, 0, 0]]), torch.tensor([2]))
    assert float(weighted) == pytest.approx(float(plain))  # one row: the weight cancels in the mean
    w = 100 / (3 * np.array([60, 30, 10]))
    expected = torch.nn.functional.cross_entropy(logits, t, weight=torch.tensor(w, dtype=torch.float32))
    assert float(loss_function(y, False, "weight")(logits, t)) == pytest.approx(float(expected))
    draws = epoch_order(100, "sample", sample_weights(y), torch.Generator().manual_seed(0))
    drawn = np.bincount(y[draws.numpy()].argmax(1), minlength=3)
    assert drawn.sum() == 100 and drawn.min() > 20  # about a third each, not 60/30/10
    multi = np.array([[1, 0], [1, 1], [1, 0], [1, 0]], dtype=np.uint8)
    bce = loss_function(multi, True, "weight")(torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]))
    assert float(bce) == pytest.approx(np.log(2) * (0 / 4 + 3) / 2, rel=1e-5)  # pos_weight = neg / pos: 0, 3


def test_tiles_carry_their_images_label_and_group():
    images = LabelledRows(["a.tif", "b.tif"], np.eye(2, dtype=np.uint8), None, ["x", "y"], False)
    tiles = rows_of(images, ["a.tif#tile=0", "a.tif#tile=1", "b.tif#tile=0"])
    assert tiles.y.argmax(1).tolist() == [0, 0, 1]
    assert tiles.groups.tolist() == ["a.tif", "a.tif", "b.tif"]  # no labelled groups: an image is one
    grouped = LabelledRows(images.ids, images.y, np.array(["g", "g"]), images.classes, False)
    assert rows_of(grouped, ["b.tif#tile=3"]).groups.tolist() == ["g"]
    assert rows_of(images, ["b.tif"]).groups is None


def test_layer_decay_learning_rates():
    backbone = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=2, img_size=32))
    head = Head(192, 3)
    groups = layer_groups(backbone, head, FinetuneConfig(backbone_lr_scale=0.1, layer_decay=0.5))
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of[id(backbone.pos_embed)] == pytest.approx(0.1 * 0.5 ** 3)
    assert scale_of[id(backbone.blocks[0].attn.qkv.weight)] == pytest.approx(0.1 * 0.5 ** 2)
    assert scale_of[id(backbone.blocks[1].mlp.fc2.weight)] == pytest.approx(0.1 * 0.5)
    assert scale_of[id(backbone.norm.weight)] == pytest.approx(0.1)
    assert scale_of[id(head.net.weight)] == 1.0
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(backbone.cls_token)] == 0 and decay[id(head.net.bias)] == 0 and decay[id(head.net.weight)] > 0


# --- the commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    out = tmp_path_factory.mktemp("cells")
    write_dataset(out, n=20, size=32, seed=3, fields_per_protein=1)  # 2 proteins (groups) per class
    return out


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=1, img_size=32))
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pt"
    save_checkpoint(path, model.config, model.state_dict())
    return path


@pytest.fixture(scope="module")
def emb(cells, backbone, tmp_path_factory):
    path = tmp_path_factory.mktemp("emb") / "e.npz"
    assert run(["embed", cells, "--weights", backbone, "--workers", "0", "-o", path]).exit_code == 0
    return path


def read_tsv(text):
    lines = [line.split("\t") for line in text.strip().splitlines()]
    return lines[0], lines[1:]


def test_head_on_embeddings_then_predict_round_trip(cells, emb, backbone, tmp_path):
    model, report = tmp_path / "head.pt", tmp_path / "cv.json"
    result = run(["finetune", emb, "--labels", cells / "labels.csv", "--folds", "2", "--seeds", "2", "--epochs", "20",
                  "-o", model, "--json", report])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["class", "F1"] and lines[-2].startswith("macro F1") and "2 folds x 2 seeds" in lines[-2]
    cv = json.loads(report.read_text())
    assert len(cv["runs"]) == 4 and cv["meta"]["grouped"] and cv["final"]["model"] == str(model)
    # a frozen linear head is a linear probe: no validation split, no epochs, C by inner cross-validation
    assert cv["meta"]["val_fraction"] == 0 and all(r["n_val"] == 0 and r["epochs"] is None and r["C"] > 0
                                                   for r in cv["runs"])
    classes = sorted({line.split(",")[1] for line in (cells / "labels.csv").read_text().splitlines()[1:]})
    assert cv["classes"] == classes

    predicted = run(["predict", cells, "--weights", model, "--workers", "0"])
    assert predicted.exit_code == 0, predicted.output
    header, rows = read_tsv(predicted.stdout)
    assert header == ["id", "predicted", *classes]
    assert [r[0] for r in rows] == sorted(str(p) for p in cells.glob("*.tif"))
    probs = np.array([[float(v) for v in r[2:]] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert [r[1] for r in rows] == [classes[j] for j in probs.argmax(1)]
    from_emb = run(["predict", emb, "--weights", model, "-o", tmp_path / "p.tsv"])
    assert from_emb.exit_code == 0 and from_emb.stdout == ""
    np.testing.assert_allclose(
        np.array([[float(v) for v in r[2:]] for r in read_tsv((tmp_path / "p.tsv").read_text())[1]]), probs, atol=2e-6)

    # the head holds no backbone: predict finds it by its stored path and checks its SHA-256
    assert "model" not in load_checkpoint(model)
    one_error_line(run(["embed", cells, "--weights", model, "-o", tmp_path / "x.npy"]), "holds no backbone")
    moved = tmp_path / "moved.pt"
    shutil.move(backbone, moved)
    try:
        one_error_line(run(["predict", cells, "--weights", model, "--workers", "0"]), "missing", "--backbone")
        assert run(["predict", cells, "--weights", model, "--workers", "0",
                    "--backbone", moved]).stdout == predicted.stdout
        other = tmp_path / "other.pt"
        torch.manual_seed(1)
        net = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=1, img_size=32))
        save_checkpoint(other, net.config, net.state_dict())
        one_error_line(run(["predict", cells, "--weights", model, "--backbone", other]), "other.pt", "sha256")
    finally:
        shutil.move(moved, backbone)


def test_frozen_from_images_with_tiles_and_predict_tiles(cells, backbone, tmp_path):
    model = tmp_path / "tiles.pt"
    result = run(["finetune", cells, "--labels", cells / "labels.csv", "--weights", backbone, "--freeze",
                  "--tile", "16", "--folds", "2", "--epochs", "5", "--head", "mlp", "--balance", "sample",
                  "-o", model, *TINY[-2:]])
    assert result.exit_code == 0, result.output
    assert "80 labelled row(s)" in result.stderr and "grouped" in result.stderr  # 4 tiles per image
    ckpt = load_checkpoint(model)
    assert ckpt["classifier"]["views"]["tile"] == 16 and ckpt["classifier"]["head_kind"] == "mlp"
    header, rows = read_tsv(run(["predict", cells, "--weights", model, "--workers", "0"]).stdout)
    first = sorted(cells.glob("*.tif"))[0]
    assert [r[0] for r in rows[:4]] == [f"{first}#tile={k}" for k in range(4)]
    tiles = np.array([[float(v) for v in r[2:]] for r in rows])
    _, whole = read_tsv(run(["predict", cells, "--weights", model, "--workers", "0", "--tile", "0"]).stdout)
    assert len(whole) == 20 and whole[0][0] == str(first)
    _, mean = read_tsv(run(["predict", cells, "--weights", model, "--workers", "0", "--aggregate", "mean"]).stdout)
    assert len(mean) == 20 and len(tiles) == 80
    # the MODEL holds its frozen backbone: embed uses it
    assert run(["embed", cells, "--weights", model, "-o", tmp_path / "e.npy", "--workers", "0"]).exit_code == 0


def test_multilabel_and_balance_through_the_cli(tmp_path):
    x, rows = blobs(n=48, multilabel=True, spread=0.3)
    np.savez(tmp_path / "e.npz", embeddings=x, ids=np.array(rows.ids), meta=np.array("{}"))
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n" + "".join(
        f"{i},{';'.join(c for c, on in zip(rows.classes, y) if on)}\n" for i, y in zip(rows.ids, rows.y)))
    for balance in ("weight", "sample", "none"):
        result = run(["finetune", tmp_path / "e.npz", "--labels", labels, "--folds", "3", "--balance", balance,
                      "-o", tmp_path / f"{balance}.pt", "--epochs", "40", "--lr", "0.01"])
        assert result.exit_code == 0, result.output
        assert "(multi-label)" in result.stderr
        assert float(result.stdout.strip().splitlines()[-2].split()[3].rstrip(",")) > 0.85  # pooled macro F1
    _, predicted = read_tsv(run(["predict", tmp_path / "e.npz", "--weights", tmp_path / "weight.pt"]).stdout)
    assert predicted[0][1] == "c0;c1" and predicted[1][1] == "c1"  # row 0 carries c0 and c1


def test_full_fine_tuning_smoke(cells, tmp_path):
    model, report = tmp_path / "ft.pt", tmp_path / "ft.json"
    result = run(["finetune", cells, "--labels", cells / "labels.csv", "--weights", "random", *TINY, "--size", "32",
                  "--epochs", "2", "--min-steps", "0", "--folds", "2", "--batch-size", "8", "--layer-decay", "0.75",
                  "-o", model, "--json", report])
    assert result.exit_code == 0, result.output
    assert "fine-tuning random" in result.stderr and "macro F1" in result.stdout
    cv = json.loads(report.read_text())
    assert len(cv["runs"]) == 2 and all(1 <= r["best_epoch"] <= r["epochs"] <= 2 for r in cv["runs"])
    assert cv["meta"]["val_fraction"] == 0.1 and all(r["n_val"] > 0 for r in cv["runs"])  # fine-tuning stops early
    ckpt = load_checkpoint(model)
    assert ckpt["classifier"]["backbone"]["fine_tuned"] and ckpt["config"]["depth"] == 1
    start = VisionTransformer(ViTConfig.from_dict(ckpt["config"]))
    torch.manual_seed(0)  # the random start, as finetune built it: the weights moved
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in ckpt["model"].items())
    predicted = run(["predict", cells, "--weights", model, "--workers", "0"])
    assert predicted.exit_code == 0 and len(read_tsv(predicted.stdout)[1]) == 20
    emb = tmp_path / "ft.npz"
    assert run(["embed", cells, "--weights", model, "--size", "32", "--workers", "0", "-o", emb]).exit_code == 0
    assert run(["predict", emb, "--weights", model]).stdout == predicted.stdout  # the same views
    one_error_line(run(["predict", cells, "--weights", model, "--backbone", model]), "holds its own backbone")


def labels_file(path, cells, rename=None):
    """The cells' labels with absolute paths, one file or one class renamed."""
    lines = (cells / "labels.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    for old, new, column in rename or []:
        rows = [[new if (i == column and v == old) else v for i, v in enumerate(r)] for r in rows]
    path.write_text(lines[0] + "\n" + "".join(f"{cells / r[0]},{r[1]},{r[2]}\n" for r in rows))
    return path


def test_finetune_errors(cells, emb, tmp_path):
    ghost = labels_file(tmp_path / "ghost.csv", cells, [("field_00013.tif", "ghost.tif", 0)])
    one_error_line(run(["finetune", emb, "--labels", ghost]), "1 labelled image has no embedding row", "ghost.tif")
    one_error_line(run(["finetune", cells, "--labels", ghost, "--weights", "random", *TINY, "--freeze"]), "ghost.tif")
    solo = (cells / "labels.csv").read_text().splitlines()[1].split(",")[1]
    lonely = labels_file(tmp_path / "lonely.csv", cells)
    lonely.write_text(lonely.read_text().replace(f",{solo},", ",solo,", 1))
    solo_run = run(["finetune", emb, "--labels", lonely, "--folds", "2"])  # one row: not measurable, not scored
    assert solo_run.exit_code == 0 and "solo (1 group) cannot be measured" in solo_run.stderr
    with np.load(emb) as z:
        np.save(tmp_path / "e.npy", z["embeddings"])
        (tmp_path / "ids.txt").write_text("\n".join(list(z["ids"])[1:]) + "\n")
    one_error_line(run(["finetune", tmp_path / "e.npy", "--labels", cells / "labels.csv"]), "no row ids")
    one_error_line(run(["finetune", tmp_path / "e.npy", "--ids", tmp_path / "ids.txt", "--labels",
                        cells / "labels.csv"]), "19 ids for 20 embedding rows")
    (tmp_path / "ids.txt").write_text("\n".join(list(np.load(emb)["ids"])[1:] + ["elsewhere.tif"]) + "\n")
    one_error_line(run(["finetune", tmp_path / "e.npy", "--ids", tmp_path / "ids.txt", "--labels",
                        cells / "labels.csv"]), "no embedding row", "field_00000.tif")
    assert run(["finetune", emb, "--labels", cells / "labels.csv", "--folds", "1"]).exit_code == 2
    assert run(["finetune", emb, "--labels", cells / "labels.csv", "--folds", "0"]).exit_code == 2
    assert run(["finetune", cells, "--labels", cells / "labels.csv"]).exit_code == 2  # images need --weights
    assert not list(tmp_path.glob("*.pt"))
