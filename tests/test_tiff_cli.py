"""The TIFF guarantees of issue 13 (items 1-2) end to end: `protloc embed` gives the image a file
means (its row equals the row of the same pixels stored as a plain CYX stack), or one line
`protloc: error: FILE: ...`, exit 1 and no output; tifffile's warnings arrive as one
`protloc: warning: FILE: ...` line each, from the main process, never as a traceback or a raw
UserWarning."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from protloc.cli import main
from test_tiff_layouts import (cut, imagej_description, mm_metas, rand, write_appended, write_described, write_mm,
                               write_multifile_ome)

RANDOM = ["--weights", "random", "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def embed_rows(tmp_path, *inputs, extra=()):
    """Embed `inputs` with one random backbone: (rows, ids, stderr)."""
    out = tmp_path / "emb.npz"
    result = run(["embed", *inputs, *RANDOM, "-o", out, "--force", *extra])
    assert result.exit_code == 0, result.output
    data = np.load(out, allow_pickle=False)
    return data["embeddings"], list(data["ids"]), result.stderr


def one_error_line(tmp_path, inputs, *needles):
    out = tmp_path / "never.npz"
    result = run(["embed", *inputs, *RANDOM, "-o", out])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("protloc: error: "), result.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


def reference(tmp_path, cyx):
    path = tmp_path / "ref_cyx.tif"
    tifffile.imwrite(path, cyx, metadata={"axes": "CYX"})
    return path


def test_appended_stack_row_equals_its_cyx_stack(tmp_path):
    planes = rand((3, 32, 32))
    appended = write_appended(tmp_path / "appended.tif", planes)
    rows, ids, stderr = embed_rows(tmp_path, appended, reference(tmp_path, planes))
    assert len(ids) == 2 and "warning" not in stderr
    np.testing.assert_array_equal(rows[0], rows[1])


def test_channels_last_row_equals_its_cyx_stack(tmp_path):
    data = rand((32, 40, 5))
    path = tmp_path / "yxc5.tif"
    tifffile.imwrite(path, data)
    rows, _, _ = embed_rows(tmp_path, path, reference(tmp_path, data.transpose(2, 0, 1)))
    np.testing.assert_array_equal(rows[0], rows[1])


def test_ambiguous_shape_is_one_error_asking_for_axes(tmp_path):
    path = tmp_path / "cube.tif"
    tifffile.imwrite(path, rand((20, 30, 40)))
    one_error_line(tmp_path, [path], path, "shape (20, 30, 40)", "--axes")
    rows, _, _ = embed_rows(tmp_path, path, extra=["--axes", "ZYX"])
    assert rows.shape == (1, 192)


def test_help_states_the_axes_rule_and_series():
    text = " ".join(run(["embed", "--help"]).output.split())
    assert "4x larger than every other one" in text and "--series K" in text


def test_truncated_imagej_file_is_one_error(tmp_path):
    path = tmp_path / "ij_cut.tif"
    tifffile.imwrite(path, rand((4, 2, 32, 32)), imagej=True, metadata={"axes": "ZCYX"})
    cut(path, os.path.getsize(path) // 2)
    one_error_line(tmp_path, [path], path, "truncated or corrupt", "declares 8 planes but the file holds 1")


def test_multifile_ome_folder_is_one_row_equal_to_its_image(tmp_path):
    data = rand((1, 2, 32, 32))
    write_multifile_ome(tmp_path / "mf", data)
    rows, ids, stderr = embed_rows(tmp_path, tmp_path / "mf", reference(tmp_path, data[0]))
    assert ids == [str(tmp_path / "mf" / "field_C0.ome.tif"), str(tmp_path / "ref_cyx.tif")]
    np.testing.assert_array_equal(rows[0], rows[1])
    assert "UserWarning" not in stderr and "warning" not in stderr


def test_multifile_ome_missing_companion_is_one_error(tmp_path):
    master, companion = write_multifile_ome(tmp_path / "mf", rand((1, 2, 32, 32)))
    os.remove(companion)
    one_error_line(tmp_path, [master], master, companion, "missing")


def test_micromanager_positions_are_one_error(tmp_path):
    path = write_mm(tmp_path / "mm_2pos.tif", rand((12, 32, 32)), mm_metas(2, 3, positions=2))
    one_error_line(tmp_path, [path], path, "holds 2 stage positions (Micro-Manager PositionIndex)")


def test_on_error_skip_skips_a_corrupt_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    tifffile.imwrite(folder / "a_good.tif", rand((2, 32, 32)))
    bad = folder / "b_cut.tif"
    tifffile.imwrite(bad, rand((4, 2, 32, 32)), imagej=True, metadata={"axes": "ZCYX"})
    cut(bad, os.path.getsize(bad) // 2)
    tifffile.imwrite(folder / "c_good.tif", rand((2, 32, 32), seed=1))
    rows, ids, stderr = embed_rows(tmp_path, folder, extra=["--on-error", "skip"])
    assert ids == [str(folder / "a_good.tif"), str(folder / "c_good.tif")]
    assert f"protloc: warning: skipped {bad}: truncated or corrupt" in stderr


def test_several_series_warn_and_series_picks_one(tmp_path):
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as w:
        w.write(rand((2, 32, 32)), metadata={"axes": "CYX"})
        w.write(rand((2, 16, 16), seed=1), metadata={"axes": "CYX"})
    _, _, stderr = embed_rows(tmp_path, path)
    assert f"protloc: warning: {path}: holds 2 image series; read series 0" in stderr
    _, _, stderr = embed_rows(tmp_path, path, extra=["--series", "1"])
    assert "warning" not in stderr
    one_error_line(tmp_path, [path, "--series", "2"], path, "has 2 image series", "no series 2")


def test_tifffile_warning_is_one_line_from_the_main_process(tmp_path):
    """With a loader worker process: the warning is printed once, by the main process, as one line."""
    path = write_described(tmp_path / "order.tif", rand((2, 32, 32)),
                           imagej_description(images=2, channels=2, order="xyz", hyperstack="true"))
    cmd = [sys.executable, "-m", "protloc", "embed", path, *RANDOM[:-2], "--workers", "1", "-o", tmp_path / "e.npz"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert warned == [f"protloc: warning: {path}: ImageJ series of unknown order 'xyz' (tifffile)"], proc.stderr
    assert "Traceback" not in proc.stderr and "UserWarning" not in proc.stderr


def test_a_warning_prints_once_per_run_however_often_the_image_is_read(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_described(folder / "order.tif", rand((2, 32, 32)),
                    imagej_description(images=2, channels=2, order="xyz", hyperstack="true"))
    tifffile.imwrite(folder / "plain.tif", rand((2, 32, 32), seed=1))
    result = run(["pretrain", folder, "-o", tmp_path / "c.pt", "--steps", "3", "--arch", "vit_tiny", "--patch", "8",
                  "--depth", "1", "--out-dim", "64", "--batch-size", "2", "--global-size", "32", "--local-size", "16",
                  "--local-crops", "2", "--warmup-epochs", "0.5", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("unknown order 'xyz'") == 1, result.stderr
