"""One owner per idea (issue 16): the view record (ViewOptions.to_record / from_record) that embeddings
files and MODELs carry, views built from flags in one place, the pixels behind a row, the finetune
run's preparation, EmbedStats.merge, and an unusable PROTLOC_BACKEND as one error line."""

import numpy as np
import tifffile
from click.testing import CliRunner

from protloc.cli import main

TINY = ["--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--workers", "0"]


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def write_image(path, pixels):
    tifffile.imwrite(path, pixels, metadata={"axes": "CYX"})
    return path


def test_an_unusable_backend_is_one_error_line(tmp_path, monkeypatch):
    image = write_image(tmp_path / "a.tif", np.random.default_rng(0).integers(0, 255, (2, 16, 16), dtype=np.uint8))
    monkeypatch.setenv("PROTLOC_BACKEND", "cuda-please")
    result = run(["embed", image, "--weights", "random", *TINY, "-o", tmp_path / "e.npz"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "protloc: error: PROTLOC_BACKEND='cuda-please': expected one of auto, triton, torch"]
    assert not (tmp_path / "e.npz").exists()
