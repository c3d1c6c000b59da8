"""Resumable embed (protloc.embed_resume): a run killed at any moment continues to the output an
uninterrupted run writes (same ids, order and rows, bit for bit); changed inputs or settings are refused."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch

from protloc.data import ViewOptions
from protloc.embed import EmbedStats, embed
from protloc.embed_resume import ChunkStore, embed_resumable, work_folder
from protloc.errors import ProtlocError
from protloc.model import ViTConfig, VisionTransformer
from protloc.sources import discover
from protloc.synth import write_dataset

PROTLOC = [sys.executable, "-m", "protloc"]
MODEL = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--size", "32"]


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_dataset(root / "cells", n=48, size=64, seed=3)
    return root / "cells"


def _run(args, cwd, **kw):
    return subprocess.run(PROTLOC + args, cwd=cwd, capture_output=True, text=True, **kw)


def _same(a, b):
    with np.load(a) as x, np.load(b) as y:
        assert list(x["ids"]) == list(y["ids"])
        assert np.array_equal(x["embeddings"], y["embeddings"])  # bit for bit


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(cells, tmp_path):
    # small batches at 64 px: slow enough that the kill lands mid-run
    slow = ["--size", "64", "--batch-size", "2", "--workers", "0", "-q"]
    whole = _run(["embed", str(cells), *MODEL, *slow, "-o", "whole.npz"], tmp_path)
    assert whole.returncode == 0, whole.stderr
    args = ["embed", str(cells), *MODEL, *slow, "-o", "out.npz", "--resume", "--chunk-images", "4"]
    work = tmp_path / work_folder("out.npz")
    proc = subprocess.Popen(PROTLOC + args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if work.is_dir() and len(list(work.glob("chunk-*.npz"))) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    committed = len(list(work.glob("chunk-*.npz")))
    assert not (tmp_path / "out.npz").exists()
    again = _run(args, tmp_path)
    assert again.returncode == 0, again.stderr
    _same(tmp_path / "out.npz", tmp_path / "whole.npz")
    assert not work.exists()  # removed once the output is whole
    assert 3 <= committed < 12


def test_resume_with_other_inputs_or_settings_is_refused(cells, tmp_path):
    args = ["embed", str(cells), *MODEL, "-o", "out.npz", "--chunk-images", "8", "--workers", "0", "-q"]
    work = tmp_path / work_folder("out.npz")
    work.mkdir()  # as a run of other inputs and another model left it
    (work / "run.json").write_text('{"fingerprint": {"inputs": "x", "model": {}}, "chunk_images": 8, "sources": 9}')
    bad = _run(args + ["--resume"], tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "inputs" in bad.stderr and "model" in bad.stderr, bad.stderr
    assert not (tmp_path / "out.npz").exists()
    # met without --resume: continue it or start afresh, never mixed silently
    plain = _run(args, tmp_path)
    assert plain.returncode == 1 and "--resume" in plain.stderr and plain.stderr.count("\n") == 1, plain.stderr
    fresh = _run(args + ["--force"], tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert (tmp_path / "out.npz").exists() and not work.exists()


def _model():
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=1, channels=["nucleus", "protein"]))


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("view", [dict(size=32), dict(tile=32), dict(tile=32, aggregate="mean")])
def test_interrupted_library_run_with_tiles_and_a_bad_image_resumes_exactly(cells, tmp_path, view):
    sources = discover([str(cells)])
    bad = tmp_path / "bad.tif"
    tifffile.imwrite(bad, np.zeros((2, 4, 4), np.uint16))  # smaller than a patch: skipped
    sources = sources[:20] + discover([str(bad)]) + sources[20:]
    opts = ViewOptions(**view)
    model = _model()
    kw = dict(batch_size=5, workers=0, on_error="skip")

    whole_stats = EmbedStats()
    whole = [(i, v) for ids, vs in embed(model, sources, opts, stats=whole_stats, **kw) for i, v in zip(ids, vs)]

    folder = str(tmp_path / "w")
    fingerprint = {"inputs": "same"}
    seen = [0]

    def stop_after_13(n):
        seen[0] += n
        if seen[0] >= 13:
            raise Interrupted

    store = ChunkStore(folder, fingerprint, len(sources), resume=False, chunk_images=4)
    with pytest.raises(Interrupted):
        for _ in embed_resumable(store, model, sources, opts, EmbedStats(), progress=stop_after_13, **kw):
            pass
    store = ChunkStore(folder, fingerprint, len(sources), resume=True, chunk_images=4)
    assert 0 < store.start < len(sources)
    stats = EmbedStats()
    resumed = [(i, v) for ids, vs in embed_resumable(store, model, sources, opts, stats, **kw) for i, v in zip(ids, vs)]
    assert [i for i, _ in resumed] == [i for i, _ in whole]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(resumed, whole))
    assert stats.images == whole_stats.images and stats.views == whole_stats.views
    assert stats.view_meta == whole_stats.view_meta
    assert [s[0] for s in stats.skipped] == [s[0] for s in whole_stats.skipped] == [str(bad)]
    assert stats.channel_maps == whole_stats.channel_maps


def test_a_changed_fingerprint_names_what_changed(tmp_path):
    folder = str(tmp_path / "w")
    ChunkStore(folder, {"inputs": "a", "model": "m", "view": "v"}, 10, resume=False)
    with pytest.raises(ProtlocError, match=r"inputs, view differ"):
        ChunkStore(folder, {"inputs": "b", "model": "m", "view": "w"}, 10, resume=True)
    with pytest.raises(ProtlocError, match="--resume"):
        ChunkStore(folder, {"inputs": "a", "model": "m", "view": "v"}, 10, resume=False)
