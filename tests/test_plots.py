"""`protloc plot`: every kind rendered to a real PNG of the expected size from the real outputs of
the other commands, the CLS attention checked against the model's own attention, and the errors."""

import json
import struct
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from protloc import plot_data, plots  # noqa: E402
from protloc.attention_maps import cls_attention  # noqa: E402
from protloc.cli import main  # noqa: E402
from protloc.embeddings import read_embeddings  # noqa: E402
from protloc.errors import ProtlocError  # noqa: E402
from protloc.model import ViTConfig, VisionTransformer  # noqa: E402
from protloc.synth import write_dataset  # noqa: E402

DPI = 40  # small pictures: fast, same code path
RANDOM = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "2"]


def run(args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; asserts the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 1000
    return struct.unpack(">II", data[16:24])


def inches(width, height):
    return round(width * DPI), round(height * DPI)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 synthetic fields, two random-init embeddings of them, k-NN and finetune JSON results."""
    d = tmp_path_factory.mktemp("plots")
    cells = d / "cells"
    write_dataset(cells, n=24, size=64, seed=1, fields_per_protein=2)
    for seed in (0, 1):
        run(["embed", cells, *RANDOM, "--size", "32", "--workers", "0", "--seed", seed,
             "-o", d / f"seed{seed}.npz", "-q"])
    labels = cells / "labels.csv"
    run(["knn", d / "seed0.npz", d / "seed1.npz", "--labels", labels, "-k", "1,3,5", "--folds", "3",
         "--json", d / "knn.json", "-q"])
    run(["finetune", d / "seed0.npz", "--labels", labels, "--folds", "3", "--epochs", "3", "--json", d / "cv.json",
         "-q"])
    return d


def test_training_curves_from_a_resumed_and_interrupted_log(tmp_path):
    log = tmp_path / "train.jsonl"
    lines = [json.dumps({"step": s, "loss": 7 - s / 10, "lr": s * 1e-4, "teacher_temp": 0.04,
                         "teacher_entropy": 5.0, "images_per_s": 30.0}) for s in range(1, 31)]
    resumed = [json.dumps({"step": s, "loss": 1.0, "lr": 0.0}) for s in (29, 30)]  # appended again by --resume
    log.write_text("\n".join(lines + resumed) + '\n{"step": 31, "lo')  # killed mid-line
    curves = plot_data.read_training_log(log)
    assert curves["step"].tolist() == list(range(1, 31))
    assert curves["loss"][-1] == 1.0 and np.isnan(curves["images_per_s"][-1])
    run(["plot", "training", log, log, "-o", tmp_path / "t.png", "--dpi", DPI, "-q"])
    assert png_size(tmp_path / "t.png") == inches(10, 7)


def test_training_log_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ProtlocError, match="bad.jsonl: line 2 is not JSON"):
        plot_data.read_training_log(bad)
    bad.write_text('{"loss": 1}\n')
    with pytest.raises(ProtlocError, match="line 1 has no 'step'"):
        plot_data.read_training_log(bad)


def test_knn_f1_against_k_one_line_per_embeddings_file(data, tmp_path):
    curves = plot_data.read_knn_curves([data / "knn.json"])
    assert [c.name for c in curves] == ["seed0", "seed1"] and curves[0].k.tolist() == [1, 3, 5]
    assert curves[0].protocol == "3-fold, grouped"
    # the same file twice: the names say which file each line is from
    assert plot_data.read_knn_curves([data / "knn.json"] * 2)[0].name == "knn: seed0"
    run(["plot", "knn", data / "knn.json", "-o", tmp_path / "k.png", "--dpi", DPI, "-q"])
    assert png_size(tmp_path / "k.png") == inches(7, 4.5)


def test_confusion_of_finetune_results_and_a_clear_refusal_of_knn_results(data, tmp_path):
    conf = plot_data.read_confusion(data / "cv.json")
    assert conf.matrix.shape == (len(conf.classes),) * 2 and conf.matrix.sum() == 24
    out = tmp_path / "c.png"
    run(["plot", "confusion", data / "cv.json", "-o", out, "--dpi", DPI, "-q"])
    width, height = plots.confusion_figure(conf).get_size_inches()
    assert png_size(out) == inches(width, height)
    result = run(["plot", "confusion", data / "knn.json", "-o", tmp_path / "x.png"], code=1)
    assert "knn.json: k-NN results hold no confusion matrix" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_confusion_multilabel():
    m = np.array([[[5, 1], [2, 3]], [[4, 0], [1, 6]]])
    conf = plot_data.Confusion(["a", "b"], m, np.array([0.6, 0.9]), True, (0.75, 0.05, 3))
    assert plots.confusion_figure(conf).get_size_inches().tolist() == [7.6, 4.8]


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_map_coloured_by_label(data, tmp_path, method):
    emb = read_embeddings(str(data / "seed0.npz"))
    labels = plot_data.row_labels(emb, data / "cells" / "labels.csv")
    assert all(labels) and len(set(labels)) > 3
    xy, axes = plot_data.project_2d(emb.x, method)
    assert xy.shape == (24, 2) and np.isfinite(xy).all() and len(axes) == 2
    out = tmp_path / f"{method}.png"
    run(["plot", "embedding", data / "seed0.npz", "--labels", data / "cells" / "labels.csv", "--method", method,
         "-o", out, "--dpi", DPI, "-q"])
    assert png_size(out) == inches(9, 6.5)


def test_attention_maps_per_head_over_the_images(data, tmp_path):
    images = sorted((data / "cells").glob("*.tif"))[:2]
    out = tmp_path / "a.png"
    run(["plot", "attention", *images, *RANDOM, "--size", "32", "-o", out, "--dpi", DPI, "-q"])
    heads = 3  # vit_tiny: head panels + the image + the mean
    assert png_size(out) == inches(1.9 * (heads + 2), 2.0 * len(images) + 0.4)


@pytest.mark.parametrize("layout", ["fused", "channel"])
def test_cls_attention_is_the_attention_the_last_block_applies(layout):
    """Rebuild the last block's attention output from our probabilities and compare it with what
    the model computed through protloc.kernels."""
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=2, layout=layout)).eval()
    pixels = torch.rand(2, 2, 32, 24)
    scale, shift = torch.ones(2, 2), torch.zeros(2, 2)
    names = ["nucleus", "protein"]
    seen = {}
    attn_module = model.blocks[-1].attn
    hook = attn_module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(pixels, scale, shift, names)
    hook.remove()
    probs = cls_attention(model, pixels, scale, shift, names)  # (B, H, T)
    tokens = 1 + (2 if layout == "channel" else 1) * 4 * 3
    assert probs.shape == (2, 3, tokens - 1) and (probs > 0).all() and (probs.sum(-1) < 1).all()
    x = seen["x"].view(2, tokens, -1)
    v = attn_module.qkv(x).view(2, tokens, 3, 3, -1)[:, :, 2]  # (B, L, H, Dh)
    full = torch.cat([1 - probs.sum(-1, keepdim=True), probs], -1)  # the CLS-to-CLS share is the rest
    cls_out = attn_module.proj(torch.einsum("bhl,blhd->bhd", full, v).reshape(2, -1))
    torch.testing.assert_close(cls_out, seen["out"].view(2, tokens, -1)[:, 0], atol=1e-5, rtol=1e-4)


def test_neighbours_montage_and_query_lookup(data, tmp_path):
    emb = read_embeddings(str(data / "seed0.npz"))
    first = emb.ids[0]
    assert plot_data.find_row(emb, first) == 0
    rows, sims = plot_data.nearest(emb.x, 0, 3)
    assert 0 not in rows and len(rows) == 3 and (np.diff(sims) <= 0).all()
    with pytest.raises(ProtlocError, match="no row 'nope.tif'"):
        plot_data.find_row(emb, "nope.tif")
    out = tmp_path / "n.png"
    run(["plot", "neighbours", data / "seed0.npz", "--query", first, "-k", 3, "--labels",
         data / "cells" / "labels.csv", "-o", out, "--dpi", DPI, "-q"])
    assert png_size(out) == inches(1.8 * 4, 2.8)


def test_neighbours_of_tiles_show_the_tile(data, tmp_path):
    image = sorted((data / "cells").glob("*.tif"))[0]
    run(["embed", image, *RANDOM, "--workers", "0", "--tile", "32", "-o", tmp_path / "tiles.npz", "-q"])
    emb = read_embeddings(str(tmp_path / "tiles.npz"))
    with pytest.raises(ProtlocError, match="has 4 rows; name one"):
        plot_data.find_row(emb, str(image))
    row = plot_data.find_row(emb, f"{image}#tile=3")
    pixels, names = plot_data.read_view(emb, row)
    assert pixels.shape == (2, 32, 32) and names == ["nucleus", "protein"]


def test_output_checks(data, tmp_path):
    run(["plot", "knn", data / "knn.json", "-o", tmp_path / "k.jpg"], code=2)
    (tmp_path / "k.png").write_bytes(b"old")
    result = run(["plot", "knn", data / "knn.json", "-o", tmp_path / "k.png"], code=1)
    assert "already exists" in result.stderr and (tmp_path / "k.png").read_bytes() == b"old"
    run(["plot", "knn", data / "knn.json", "-o", tmp_path / "k.svg", "--force", "-q"])
    assert (tmp_path / "k.svg").read_text().lstrip().startswith("<?xml")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path, data):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = run(["plot", "knn", data / "knn.json", "-o", tmp_path / "k.png"], code=1)
    assert "pip install 'protloc[plot]'" in result.stderr
