"""The command line end to end: real shell pipes, outputs, and every bad input a user can cause."""

import json
import os
import pty
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from protloc.checkpoint import save_checkpoint
from protloc.cli import main
from protloc.model import ViTConfig, VisionTransformer
from protloc.synth import write_dataset

PROTLOC = [sys.executable, "-m", "protloc"]
RANDOM = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--workers", "0"]


def run(args, **kw):
    """Invoke the CLI in-process; stdout and stderr kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    out = tmp_path_factory.mktemp("cells")
    write_dataset(out, n=30, size=64, seed=3, fields_per_protein=1)  # 3 proteins (groups) per class
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=2, img_size=64,
                                        channels=["nucleus", "protein"]))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model.config, model.state_dict())
    return path


def one_error_line(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("protloc: error: "), result.stderr
    for needle in needles:
        assert str(needle) in lines[0]


def test_shell_pipe_writes_npy_rows_in_input_order(cells, tmp_path):
    cmd = (f"{sys.executable} -m protloc embed {cells} --weights random --arch vit_tiny --patch 8 "
           "--ids ids.txt > emb.npy")
    proc = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    emb = np.load(tmp_path / "emb.npy")
    assert emb.shape == (30, 192) and emb.dtype == np.float32 and np.isfinite(emb).all()
    ids = (tmp_path / "ids.txt").read_text().splitlines()
    assert ids == sorted(str(p) for p in cells.glob("*.tif"))
    assert "embedded 30 image(s)" in proc.stderr


def test_embed_piped_into_knn(cells, tmp_path):
    """`protloc embed ... | protloc knn - ...` through a real pipe: knn reads the .npy to EOF, which comes
    when embed exits, after it wrote the ids; the scores are those of the same embeddings from a file."""
    labels = tmp_path / "labels.csv"  # ungrouped: each class is one protein here, grouped folds would score 0
    labels.write_text("path,label\n" + "".join(f"{cells / line.split(',')[0]},{line.split(',')[1]}\n"
                                               for line in (cells / "labels.csv").read_text().splitlines()[1:]))
    embed = f"{sys.executable} -m protloc embed {cells} {' '.join(RANDOM)} --depth 1 --ids ids.txt"
    knn = f"{sys.executable} -m protloc knn - --ids ids.txt --labels {labels} -k 1,5 --folds 3"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{embed} | {knn}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "embedded 30 image(s)" in proc.stderr and "<stdin>: 30 labelled row(s)" in proc.stderr
    assert run(["embed", cells, *RANDOM, "--depth", "1", "-o", tmp_path / "e.npz"]).exit_code == 0
    from_file = run(["knn", tmp_path / "e.npz", "--labels", labels, "-k", "1,5", "--folds", "3"])
    assert proc.stdout == from_file.stdout and float(proc.stdout.splitlines()[1].split()[1]) > 0


def test_paths_on_stdin_and_npz_output(cells, tmp_path, checkpoint):
    files = sorted(cells.glob("*.tif"))[::-1][:5]  # stdin order, not sorted order, is the row order
    out = tmp_path / "e.npz"
    result = run(["embed", "-", "--weights", checkpoint, "-o", out, "--workers", "0", "--pool", "mean"],
                 input="\n".join(map(str, files)) + "\n")
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as z:
        assert z["embeddings"].shape == (5, 192)
        assert list(z["ids"]) == [str(f) for f in files]
        meta = json.loads(str(z["meta"]))
    assert meta["pool"] == "mean" and len(meta["sha256"]) == 64 and meta["config"]["arch"] == "vit_tiny"
    assert result.stdout == ""


def test_same_image_same_row_whatever_the_batch(cells, tmp_path):
    a = run(["embed", cells, *RANDOM, "--batch-size", "7", "-o", tmp_path / "a.npy"])
    b = run(["embed", cells, *RANDOM, "--batch-size", "1", "-o", tmp_path / "b.npy"])
    assert a.exit_code == b.exit_code == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-5)


def test_binary_output_is_refused_on_a_terminal(cells):
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([*PROTLOC, "embed", str(cells), *RANDOM], stdout=terminal, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(terminal)
        os.close(controller)
    assert proc.returncode == 1 and "terminal" in proc.stderr


def test_existing_output_needs_force(cells, tmp_path):
    out = tmp_path / "e.npy"
    out.write_bytes(b"precious")
    one_error_line(run(["embed", cells, *RANDOM, "-o", out]), out, "--force")
    assert out.read_bytes() == b"precious"
    assert run(["embed", cells, *RANDOM, "-o", out, "--force"]).exit_code == 0
    assert np.load(out).shape == (30, 192)


def bad_folder(tmp_path, kind):
    folder = tmp_path / "data"
    folder.mkdir()
    good = np.random.default_rng(0).integers(0, 3000, (2, 32, 32)).astype(np.uint16)
    tifffile.imwrite(folder / "a.tif", good)
    if kind == "truncated":
        tifffile.imwrite(folder / "b.tif", good)
        data = (folder / "b.tif").read_bytes()
        (folder / "b.tif").write_bytes(data[: len(data) // 3])
    elif kind == "not-a-tiff":
        (folder / "b.tif").write_text("hello")
    elif kind == "three-channels":
        tifffile.imwrite(folder / "b.tif", np.zeros((3, 32, 32), np.uint16))
    return folder, folder / "b.tif"


@pytest.mark.parametrize("kind", ["truncated", "not-a-tiff", "three-channels"])
def test_a_bad_image_is_one_line_exit_1_and_no_output(tmp_path, kind, checkpoint):
    folder, culprit = bad_folder(tmp_path, kind)
    out = tmp_path / "e.npy"
    result = run(["embed", folder, "--weights", checkpoint, "--workers", "0", "-o", out, "--ids", tmp_path / "ids"])
    one_error_line(result, culprit)
    assert not out.exists() and not (tmp_path / "ids").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary files either
    skipped = run(["embed", folder, "--weights", checkpoint, "--workers", "0", "-o", out, "--on-error", "skip"])
    assert skipped.exit_code == 0 and np.load(out).shape == (1, 192)
    assert str(culprit) in skipped.stderr


def test_missing_file_empty_directory_and_no_images(tmp_path):
    one_error_line(run(["embed", tmp_path / "nope.tif", *RANDOM]), "nope.tif", "no such file")
    (tmp_path / "empty").mkdir()
    one_error_line(run(["embed", tmp_path / "empty", *RANDOM]), "empty", "no .tif")


def test_channel_count_mismatch_names_the_file(tmp_path, checkpoint):
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((32, 32), np.uint16))
    one_error_line(run(["embed", tmp_path / "one.tif", "--weights", checkpoint, "--workers", "0"]),
                   "1 channel", "takes 2")


def test_foreign_or_broken_checkpoint(tmp_path, cells):
    (tmp_path / "w.pt").write_bytes(b"garbage")
    one_error_line(run(["embed", cells, "--weights", tmp_path / "w.pt"]), "w.pt")


def test_debug_shows_the_traceback_and_usage_errors_exit_2(tmp_path):
    result = run(["embed", tmp_path / "nope.tif", *RANDOM, "--debug"])
    assert result.exit_code == 1 and "Traceback" in result.stderr
    assert run(["embed", tmp_path, *RANDOM, "--pool", "max"]).exit_code == 2
    assert run(["embed", tmp_path, *RANDOM, "-o", "x.txt"]).exit_code == 2


def test_embed_then_knn_with_json(cells, tmp_path):
    emb = tmp_path / "e.npz"
    assert run(["embed", cells, *RANDOM, "-o", emb]).exit_code == 0
    result = run(["knn", emb, "--labels", cells / "labels.csv", "-k", "1,3", "--folds", "3",
                  "--json", tmp_path / "knn.json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["k", "macro", "F1"] and [l.split()[0] for l in lines[1:]] == ["1", "3"]
    report = json.loads((tmp_path / "knn.json").read_text())["runs"][0]
    assert [r["k"] for r in report["results"]] == [1, 3]
    assert 0.0 <= report["results"][0]["f1_macro_mean"] <= 1.0 and report["meta"]["grouped"]
    # two files side by side, same folds: the same embeddings score the same
    both = run(["knn", emb, emb, "--labels", cells / "labels.csv", "-k", "1,3", "--folds", "3"])
    assert both.exit_code == 0
    row = both.stdout.strip().splitlines()[2].split()
    assert row[1:8] == row[8:15]


def test_knn_from_a_pipe_and_its_errors(cells, tmp_path):
    npy = tmp_path / "e.npy"
    assert run(["embed", cells, *RANDOM, "-o", npy, "--ids", tmp_path / "ids.txt"]).exit_code == 0
    proc = subprocess.run(f"cat {npy} | {sys.executable} -m protloc knn - --ids {tmp_path / 'ids.txt'} "
                          f"--labels {cells / 'labels.csv'} --loo -k 1", shell=True, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    one_error_line(run(["knn", npy, "--labels", cells / "labels.csv"]), "no row ids")
    labels = tmp_path / "more.csv"
    labels.write_text((cells / "labels.csv").read_text().replace("field_00000.tif", "ghost.tif"))
    one_error_line(run(["knn", npy, "--ids", tmp_path / "ids.txt", "--labels", labels]), "ghost.tif")


def test_synth_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    one_error_line(run(["synth", tmp_path, "--n", "2", "--size", "32"]), "not empty")
    assert run(["synth", tmp_path / "new", "--n", "2", "--size", "32",
                "--channels", "nucleus,protein,er"]).exit_code == 0
    assert tifffile.imread(tmp_path / "new" / "field_00000.tif").shape == (3, 32, 32)


def test_yeast_crops_embed_to_1131_rows(shared_data, tmp_path):
    """The foundation's acceptance check, on 1,131 real two-file yeast cells."""
    cmd = (f"{sys.executable} -m protloc embed {shared_data / 'yeast_crops'} --channel-suffixes gfp,rfp "
           f"--weights random --arch vit_tiny --patch 8 --size 64 --ids ids.txt > e.npy")
    proc = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "e.npy").shape == (1131, 192)
    result = run(["knn", tmp_path / "e.npy", "--ids", tmp_path / "ids.txt", "--labels",
                  shared_data / "yeast_crops" / "labels.csv", "--id-column", "protein_file",
                  "--label-column", "control_localization", "--channel-suffixes", "gfp,rfp", "-k", "5"])
    assert result.exit_code == 0, result.output
    assert "1131 labelled row(s), 2 classes" in result.stderr


def test_knn_ignores_unlabelled_rows_correctly(tmp_path):
    """Rows without a label are left out, and the labelled rows keep their own vectors."""
    rng = np.random.default_rng(0)
    ids = [f"img{i}.tif" for i in range(12)]
    x = rng.standard_normal((12, 8)).astype(np.float32)
    x[1::2] += 6.0  # odd images form a far-away cluster: every unlabelled row sits among them
    labelled = [0, 2, 4, 6, 8, 10, 1, 3]  # 6 even (class a) and 2 odd (class b) rows
    np.savez(tmp_path / "e.npz", embeddings=x, ids=np.array(ids), meta=np.array(json.dumps({"cwd": str(tmp_path)})))
    (tmp_path / "labels.csv").write_text("id,label\n"
                                         + "".join(f"img{i}.tif,{'b' if i % 2 else 'a'}\n" for i in labelled))
    result = run(["knn", tmp_path / "e.npz", "--labels", tmp_path / "labels.csv", "--loo", "-k", "1"])
    assert result.exit_code == 0, result.output
    assert "4 unlabelled row(s) ignored" in result.stderr
    # brute force on the labelled rows only: 1-NN by cosine, leave-one-out
    xn = x[labelled] / np.linalg.norm(x[labelled], axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    y = np.array([i % 2 for i in labelled])
    accuracy = float((y[sim.argmax(1)] == y).mean())
    assert result.stdout.strip().splitlines()[1].split()[2] == f"{accuracy:.3f}"  # k, macro F1, accuracy (pooled)


def test_outputs_get_the_usual_file_mode(tmp_path):
    from protloc.output import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.bin") as tmp:
            open(tmp, "wb").write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
