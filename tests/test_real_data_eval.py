"""benchmarks/real_data_eval.py, the evidence that pretraining helps: its baselines are what they
say (the raw-pixel features, the run's own initialization) and its scores are protloc's."""

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from protloc.pretrain import Trainer
from protloc.recipes import resolve
from protloc.sources import discover

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_data_eval  # noqa: E402  (benchmarks/ is not a package)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """40 fields of 24 x 24, 2 channels, uint16; class b is 4x brighter in channel 0; 8 groups."""
    folder = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(0)
    rows = []
    for k in range(40):
        label = "ab"[k % 2]
        image = rng.integers(0, 500, (2, 24, 24), dtype=np.uint16)
        if label == "b":
            image[0] *= 4
        tifffile.imwrite(folder / f"f{k:02d}.tif", image)
        rows.append(f"f{k:02d}.tif,{label},g{k % 8}\n")
    (folder / "labels.csv").write_text("path,label,group\n" + "".join(rows))
    return folder


def test_a_checkpoints_random_init_is_the_start_of_its_run(labelled, tmp_path):
    """--checkpoint rebuilds the pretraining's initial weights from the recorded settings, and views
    images as the run did (the same dataset statistics)."""
    sources = discover([str(labelled)])
    cfg = resolve("small", {"steps": 2, "depth": 1, "out_dim": 16, "batch_size": 4, "global_size": 16, "seed": 3})
    ckpt = tmp_path / "run.pt"
    trainer = Trainer(sources, cfg, str(ckpt), workers=0)
    start = {k: v.clone() for k, v in trainer.teacher.backbone.state_dict().items()}
    trainer.run()
    s = real_data_eval.EvalSet("cells", [str(labelled)], str(labelled / "labels.csv"), group_column="group")
    initial, pretrained, opts, recorded = real_data_eval.starting_point(s, sources, "dino", None, str(ckpt), 0,
                                                                        str(tmp_path))
    assert recorded == cfg  # the checkpoint's settings, not --recipe's
    for name, tensor in initial.state_dict().items():
        torch.testing.assert_close(tensor, start[name], rtol=0, atol=0, msg=name)
    for name, tensor in pretrained.state_dict().items():
        torch.testing.assert_close(tensor, trainer.teacher.backbone.state_dict()[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(initial.state_dict()["blocks.0.attn.qkv.weight"],
                           pretrained.state_dict()["blocks.0.attn.qkv.weight"])
    assert (opts.size, opts.normalize, opts.dataset_stats) == (64, "dataset", trainer.view.dataset_stats)


def test_raw_pixels_and_scores(labelled):
    """Raw pixels: RAW_SIZE^2 features per channel, each standardized over the set; brightness
    separates the classes, so k-NN and the probe score them perfectly on grouped folds."""
    s = real_data_eval.EvalSet("cells", [str(labelled)], str(labelled / "labels.csv"), group_column="group")
    ids, x = real_data_eval.raw_pixels(discover([str(labelled)]), s, workers=0)
    assert x.shape == (40, 2 * real_data_eval.RAW_SIZE ** 2) and len(ids) == 40
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-4)
    row = real_data_eval.scores(ids, x, s)
    assert set(row) == {"knn5", "knn10", "knn20", "probe"}
    assert row["knn5"][0] == 1.0 and row["probe"][0] == 1.0
    shuffled = real_data_eval.scores(ids, np.random.default_rng(0).normal(size=x.shape), s)
    assert shuffled["probe"][0] < 0.9  # noise does not score
