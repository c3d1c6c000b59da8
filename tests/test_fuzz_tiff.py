"""Fuzzing the TIFF reader: mutated real and synthetic TIFFs end in a valid image or protloc's own
one-line error, never another exception, a hang or a memory blow-up.

The bounded run here is part of `make test`. A longer one:

    PROTLOC_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz_tiff.py

Each case runs under a time limit (SIGALRM); memory is bounded by --max-pixels, which the reader
checks against the declared size before decoding, and by an address-space limit on the process
that runs the fuzzer's CLI cases.
"""

import io
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protloc.errors import ProtlocError
from protloc.tiff import read_tiff

EXAMPLES = int(os.environ.get("PROTLOC_FUZZ_EXAMPLES", "150"))
MAX_PIXELS = 1 << 22  # 4 Mpixels: small enough that no accepted image can blow up memory
SECONDS_PER_CASE = 10
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _synthetic_seeds() -> dict[str, bytes]:
    """Small TIFFs of the layouts the reader knows, written in memory."""
    rng = np.random.default_rng(0)
    seeds = {}

    def write(name, data, **kw):
        buf = io.BytesIO()
        tifffile.imwrite(buf, data, **kw)
        seeds[name] = buf.getvalue()

    write("yx_uint16", rng.integers(0, 4000, (32, 40), dtype=np.uint16))
    write("cyx_ome", rng.integers(0, 4000, (2, 24, 24), dtype=np.uint16), ome=True,
          metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    write("zcyx_imagej", rng.integers(0, 255, (3, 2, 16, 16), dtype=np.uint8), imagej=True, metadata={"axes": "ZCYX"})
    write("zlib_tiled", rng.random((2, 64, 64), dtype=np.float32), compression="zlib", tile=(32, 32))
    write("rgb", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), photometric="rgb")
    return seeds


def _real_seeds() -> dict[str, bytes]:
    """A few real microscopy files from ../shared/data, when it is there."""
    picks = ["yeast_crops/*_gfp.tif", "hpa_cells/*_green.tif*", "opencell_atl2/*.tif*"]
    seeds = {}
    for pattern in picks:
        for path in sorted(SHARED.glob(pattern))[:1]:
            seeds[f"real:{path.parent.name}"] = path.read_bytes()
    return seeds


SEEDS = {**_synthetic_seeds(), **_real_seeds()}
BAD_WORDS = [0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 0x10000]


@st.composite
def mutated_tiffs(draw):
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "word", "header_word", "zero_run"]))
        n = len(data)
        if n < 16:
            break
        if kind == "truncate":
            del data[draw(st.integers(0, n - 1)):]
        elif kind == "flip":
            for _ in range(draw(st.integers(1, 16))):
                i = draw(st.integers(0, n - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind in ("word", "header_word"):  # absurd sizes, offsets and counts, often in the IFD
            hi = min(n - 4, 512) if kind == "header_word" else n - 4
            i = draw(st.integers(0, hi))
            data[i:i + 4] = struct.pack("<I", draw(st.sampled_from(BAD_WORDS)))
        else:
            i = draw(st.integers(0, n - 1))
            data[i:i + draw(st.integers(1, 64))] = bytes(min(64, n - i))
    return name, bytes(data)


class Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise Hang


def read_bounded(path):
    """read_tiff under a time limit: a valid image or ProtlocError; anything else propagates."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_CASE)
    try:
        return read_tiff(path, max_pixels=MAX_PIXELS)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(case=mutated_tiffs())
def test_mutated_tiffs_read_or_fail_cleanly(tmp_path, case):
    name, data = case
    path = tmp_path / "case.tif"
    path.write_bytes(data)
    try:
        image = read_bounded(path)
    except ProtlocError as e:
        message = str(e)
        assert str(path) in message and "\n" not in message, message
        return
    except Hang:
        pytest.fail(f"reading a mutated {name} took over {SECONDS_PER_CASE} s")
    pixels = image.pixels
    assert pixels.ndim == 3 and pixels.size <= MAX_PIXELS * pixels.shape[0]
    assert pixels.dtype in (np.uint8, np.uint16, np.float32), pixels.dtype


def test_seeds_themselves_read():
    for name, data in SEEDS.items():
        buf = Path(os.environ.get("TMPDIR", "/tmp")) / f"protloc-seed-{os.getpid()}.tif"
        try:
            buf.write_bytes(data)
            assert read_tiff(buf).pixels.ndim == 3, name
        finally:
            buf.unlink(missing_ok=True)


def test_declared_size_is_refused_before_decoding(tmp_path):
    """A header claiming 2^30 pixels is refused at --max-pixels without allocating them."""
    path = tmp_path / "huge.tif"
    with tifffile.TiffWriter(path) as tw:  # a header only: the strip is never written
        tw.write(shape=(32768, 32768), dtype=np.uint8)
    with pytest.raises(ProtlocError, match="max-pixels"):
        read_tiff(path, max_pixels=MAX_PIXELS)


def test_embed_on_mutated_files_fails_per_file_with_bounded_memory(tmp_path):
    """`protloc embed --on-error skip` over a folder of mutated files: exit 0 or 1, protloc's own
    messages, no traceback, in a process limited to 4 GiB of address space per file read."""
    import random

    rng = random.Random(0)
    names = sorted(SEEDS)
    folder = tmp_path / "fuzz"
    folder.mkdir()
    for i in range(12):
        data = bytearray(SEEDS[names[i % len(names)]])
        for _ in range(3):
            j = rng.randrange(len(data))
            data[j] ^= 1 << rng.randrange(8)
        if i % 3 == 0:
            del data[rng.randrange(len(data)):]
        (folder / f"case_{i:02d}.tif").write_bytes(bytes(data))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
            "from protloc.cli import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, "embed", str(folder), "--weights", "random",
                           "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--size", "32",
                           "--on-error", "skip", "--max-pixels", str(MAX_PIXELS), "--workers", "0",
                           "-o", str(tmp_path / "e.npz"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-3000:]
