"""Sharded embedding under torchrun: two gloo processes give the rows of one process, in order."""

import os
import subprocess
import sys

import numpy as np
import pytest

from protloc.distributed import World
from protloc.shard import my_slice
from protloc.synth import write_dataset


def test_slices_cover_the_inputs_in_order():
    for n in (0, 1, 5, 12):
        for size in (1, 2, 3, 4):
            parts = [list(range(n))[my_slice(n, World(rank, size))] for rank in range(size)]
            assert sum(parts, []) == list(range(n))


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    out = tmp_path_factory.mktemp("cells")
    write_dataset(out, n=7, size=32, seed=1)
    return out


def embed_cmd(cells, out, *extra):
    return ["-m", "protloc", "embed", str(cells), "--weights", "random", "--arch", "vit_tiny", "--patch", "16",
            "--depth", "1", "--workers", "0", "--device", "cpu", "-o", str(out), *extra]


def test_torchrun_two_processes_write_the_rows_of_one(cells, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *embed_cmd(cells, tmp_path / "one.npz")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              *embed_cmd(cells, tmp_path / "two.npz")], capture_output=True, text=True, env=env,
                             timeout=300, cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "on 2 processes" in sharded.stderr
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert list(two["ids"]) == list(one["ids"]) and len(one["ids"]) == 7
    np.testing.assert_allclose(two["embeddings"], one["embeddings"], atol=1e-5)
