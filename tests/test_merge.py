"""`protloc embed --shard I/N` parts and `protloc merge`: the joined parts equal one whole run; parts of
another run, missing and repeated parts are refused in one line."""

import numpy as np
import pytest
from click.testing import CliRunner

from protloc.cli import main
from protloc.embeddings import read_embeddings
from protloc.shard import part_slice
from protloc.synth import write_dataset

MODEL = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--size", "32", "--workers",
         "0", "-q"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A whole run and its 3 parts (tiles, so per-row meta is joined too), all from one folder."""
    root = tmp_path_factory.mktemp("merge")
    write_dataset(root / "cells", n=10, size=64, seed=5)
    runner = CliRunner()
    args = ["embed", str(root / "cells"), *MODEL, "--tile", "32"]
    assert runner.invoke(main, args + ["-o", str(root / "whole.npz")]).exit_code == 0
    for i in (1, 2, 3):
        result = runner.invoke(main, args + ["--shard", f"{i}/3", "-o", str(root / f"part{i}.npz")])
        assert result.exit_code == 0, result.output
    return root


def _merge(*args):
    return CliRunner().invoke(main, ["merge", *map(str, args)])


def _load(path):
    emb = read_embeddings(str(path))
    return emb.x, emb.ids, {**emb.meta, "obs": emb.obs}


@pytest.mark.parametrize("n,count", [(10, 3), (7, 7), (100, 8), (5, 2)])
def test_parts_are_contiguous_and_cover_every_input_once(n, count):
    slices = [range(n)[part_slice(n, i, count)] for i in range(count)]
    assert [i for s in slices for i in s] == list(range(n))
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_merged_parts_equal_the_whole_run_whatever_order_they_are_given_in(runs):
    result = _merge(runs / "part3.npz", runs / "part1.npz", runs / "part2.npz", "-o", runs / "merged.npz",
                    "--ids", runs / "merged.txt")
    assert result.exit_code == 0, result.output
    x, ids, meta = _load(runs / "merged.npz")
    wx, wids, wmeta = _load(runs / "whole.npz")
    assert ids == wids and np.array_equal(x, wx)
    assert meta["obs"] == wmeta["obs"] and "origin_y" in meta["obs"]
    assert "shard" not in meta
    assert (runs / "merged.txt").read_text().split() == wids
    _, part_ids, part_meta = _load(runs / "part2.npz")
    assert part_meta["shard"]["index"] == 2 and part_meta["shard"]["count"] == 3 and part_meta["shard"]["inputs"] == 10
    assert 0 < len(part_ids) < len(wids)


def test_parts_merge_into_anndata_with_their_columns(runs, tmp_path):
    pytest.importorskip("anndata")
    result = _merge(runs / "part2.npz", runs / "part1.npz", runs / "part3.npz", "-o", tmp_path / "merged.h5ad")
    assert result.exit_code == 0, result.output
    x, ids, meta = _load(tmp_path / "merged.h5ad")
    wx, wids, wmeta = _load(runs / "whole.npz")
    assert ids == wids and np.array_equal(x, wx)
    assert meta["obs"]["origin_x"] == wmeta["obs"]["origin_x"]


def test_missing_repeated_and_foreign_parts_are_refused_in_one_line(runs, tmp_path):
    missing = _merge(runs / "part1.npz", runs / "part3.npz", "-o", tmp_path / "m.npz")
    assert missing.exit_code == 1 and "part(s) 2 of 3 missing" in missing.output
    twice = _merge(runs / "part1.npz", runs / "part2.npz", runs / "part2.npz", runs / "part3.npz",
                   "-o", tmp_path / "m.npz")
    assert twice.exit_code == 1 and "given twice" in twice.output
    whole = _merge(runs / "whole.npz", "-o", tmp_path / "m.npz")
    assert whole.exit_code == 1 and "not a part of a sharded run" in whole.output
    # a part of the same inputs embedded by another model
    other = CliRunner().invoke(main, ["embed", str(runs / "cells"), *MODEL, "--tile", "32", "--seed", "1",
                                      "--shard", "2/3", "-o", str(tmp_path / "other2.npz")])
    assert other.exit_code == 0, other.output
    foreign = _merge(runs / "part1.npz", tmp_path / "other2.npz", runs / "part3.npz", "-o", tmp_path / "m.npz")
    assert foreign.exit_code == 1 and "another run" in foreign.output and "seed" in foreign.output
    for result in (missing, twice, whole, foreign):
        assert result.output.count("\n") == 1, result.output
    assert not (tmp_path / "m.npz").exists()


def test_more_parts_than_inputs_is_refused(runs):
    result = CliRunner().invoke(main, ["embed", str(runs / "cells"), *MODEL, "--shard", "1/11",
                                       "-o", str(runs / "x.npz")])
    assert result.exit_code == 1 and "more parts than the 10 input image(s)" in result.output
    bad = CliRunner().invoke(main, ["embed", str(runs / "cells"), *MODEL, "--shard", "4/3", "-o", str(runs / "x.npz")])
    assert bad.exit_code == 2 and "1 <= I <= N" in bad.output
