"""Signals as schedulers send them: `timeout`, Slurm, systemd and Ctrl-C signal the whole process
group, loader workers included. Each run here has 2 loader workers, runs in its own session and
is signalled with os.killpg, as they do.

To catch embed, predict and finetune --freeze mid-run whatever the machine's speed, one image,
z_wait.tif, is slow to read: the process reading it (a loader worker) says so by creating the
file READY, then waits until the file GO exists (the read is patched in the command's process
before it starts; workers inherit the patch)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from protloc.checkpoint import load_checkpoint
from protloc.cli import main
from protloc.cli.progress import StatusLine

pytestmark = [pytest.mark.skipif(not hasattr(signal, "sigtimedwait"), reason="worker signal handling is Linux's"),
              pytest.mark.usefixtures("one_thread")]

TINY = ["--arch", "vit_tiny", "--patch", "8", "--depth", "1"]
PRETRAIN = [*TINY, "--out-dim", "32", "--batch-size", "2", "--global-size", "32", "--local-size", "16",
            "--local-crops", "1", "--device", "cpu"]

PROTLOC_WITH_A_SLOW_IMAGE = """
import os, sys, time
import protloc.source_tiff
read = protloc.source_tiff.read_tiff
def slow(path, *args, **kwargs):
    if path.endswith("z_wait.tif"):
        open("READY", "w").close()
        while not os.path.exists("GO"):
            time.sleep(0.01)
    return read(path, *args, **kwargs)
protloc.source_tiff.read_tiff = slow
from protloc.cli import main
from protloc.cli.progress import StatusLine
main(sys.argv[1:], prog_name="protloc")
"""


@pytest.fixture
def images(tmp_path):
    """Four 2-channel 32 x 32 images and their labels (2 classes)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in "abcd":
        tifffile.imwrite(folder / f"{name}.tif", rng.integers(0, 4000, (2, 32, 32), dtype=np.uint16))
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"images/{n}.tif,{'xy'[i % 2]}\n"
                                                                   for i, n in enumerate("abcd")))
    return folder


@pytest.fixture
def slow_image(images):
    """A fifth image, sorted last (the first image is read in the main process), slow to read."""
    tifffile.imwrite(images / "z_wait.tif", np.ones((2, 32, 32), np.uint16))


def start(*args, cwd, status_every=None):
    """`protloc ARGS --workers 2` in its own session (z_wait.tif is slow to read)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if status_every is not None:
        env["PROTLOC_STATUS_EVERY"] = str(status_every)
    return subprocess.Popen([sys.executable, "-c", PROTLOC_WITH_A_SLOW_IMAGE, *map(str, args), "--workers", "2"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def group(pgid: int) -> list[int]:
    """The processes of a process group (from /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(pid))
    return pids


def wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")


def reading_slow_image(proc, cwd):
    """Wait until a loader worker reads z_wait.tif (the run waits for it); check the run has its 2 workers."""
    def ready():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        return (cwd / "READY").exists()
    wait_for(ready, "worker reading z_wait.tif")
    assert len(group(proc.pid)) == 3, "the main process and its 2 loader workers"


def read_status(proc, prefix: str) -> list[str]:
    """stderr lines up to the first that starts with `prefix` (a status line: the run is stepping)."""
    lines = []
    while not lines or not lines[-1].startswith(prefix):
        line = proc.stderr.readline()
        assert line, f"the run ended before {prefix!r}: {''.join(lines)[-2000:]}"
        lines.append(line.rstrip("\n"))
    assert len(group(proc.pid)) == 3, "the main process and its 2 loader workers"
    return lines


def ended(proc, sig, cwd=None) -> tuple[str, str]:
    """Signal the run's process group as a scheduler does (then let z_wait.tif be read, when
    `cwd` holds it); its stdout and stderr once it has ended, with no process of its group left."""
    os.killpg(proc.pid, sig)
    if cwd is not None:
        (cwd / "GO").touch()
    stdout, stderr = proc.communicate(timeout=120)
    wait_for(lambda: not group(proc.pid), "empty process group", timeout=20)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr[-3000:]
    return stdout, stderr


def files(folder) -> list[str]:
    return sorted(set(os.listdir(folder)) - {"READY", "GO"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_embed_leaves_no_output(images, slow_image, tmp_path, sig):
    proc = start("embed", images, "--weights", "random", *TINY, "-o", "emb.npy", "--ids", "ids.txt", cwd=tmp_path)
    reading_slow_image(proc, tmp_path)
    _, stderr = ended(proc, sig, tmp_path)
    assert proc.returncode == 128 + sig
    assert stderr.splitlines() == [f"protloc: stopped by {sig.name}"]
    assert files(tmp_path) == ["images", "labels.csv"]  # no output, no temporary file


def test_predict_leaves_no_output_on_stdout(images, slow_image, tmp_path):
    model = tmp_path / "model.pt"
    made = CliRunner().invoke(main, ["finetune", *(str(images / f"{n}.tif") for n in "abcd"), "--labels",
                                     str(tmp_path / "labels.csv"), "--freeze", "--weights", "random", *TINY,
                                     "--folds", "0", "--epochs", "2", "--workers", "0", "-o", str(model), "--quiet"])
    assert made.exit_code == 0, made.output
    proc = start("predict", images, "--weights", model, cwd=tmp_path)
    reading_slow_image(proc, tmp_path)
    stdout, stderr = ended(proc, signal.SIGTERM, tmp_path)
    assert proc.returncode == 143 and stderr.splitlines() == ["protloc: stopped by SIGTERM"]
    assert stdout == ""  # not even the header: stdout is written when complete


def test_finetune_freeze_stopped_while_embedding(images, slow_image, tmp_path):
    with open(tmp_path / "labels.csv", "a") as f:
        f.write("images/z_wait.tif,y\n")
    proc = start("finetune", images, "--labels", "labels.csv", "--freeze", "--weights", "random", *TINY,
                 "--folds", "2", "-o", "model.pt", "--json", "cv.json", "--quiet", cwd=tmp_path)
    reading_slow_image(proc, tmp_path)
    _, stderr = ended(proc, signal.SIGINT, tmp_path)
    assert proc.returncode == 130 and stderr.splitlines() == ["protloc: stopped by SIGINT"]
    assert files(tmp_path) == ["images", "labels.csv"]


def test_full_finetuning_stops_after_a_step_and_writes_nothing(images, tmp_path):
    proc = start("finetune", images, "--labels", "labels.csv", "--weights", "random", *TINY, "--size", "16",
                 "--batch-size", "2", "--epochs", "1000", "--folds", "0", "-o", "model.pt", "--device", "cpu",
                 cwd=tmp_path, status_every=0)
    read_status(proc, "protloc: fine-tuning step ")
    _, stderr = ended(proc, signal.SIGTERM)
    assert proc.returncode == 143
    lines = stderr.splitlines()
    assert lines[-1] == ("protloc: stopped by SIGTERM during fine-tuning; nothing written (fine-tuning has no "
                         "resume: rerun it)")
    assert all(line.startswith(("protloc: 4 labelled row(s)", "protloc: warning: ", "protloc: fine-tuning step "))
               for line in lines[:-1]), lines
    assert files(tmp_path) == ["images", "labels.csv"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_pretrain_stops_after_a_step_with_a_checkpoint_that_resumes(images, tmp_path, sig):
    proc = start("pretrain", images, "-o", "p.pt", "--steps", "1000", "--log", "log.jsonl", *PRETRAIN,
                 cwd=tmp_path, status_every=0)
    read_status(proc, "protloc: step ")
    _, stderr = ended(proc, sig)
    assert proc.returncode == 128 + sig
    steps = len((tmp_path / "log.jsonl").read_text().splitlines())
    assert stderr.splitlines()[-1] == (f"protloc: stopped by {sig.name} after step {steps} of 1000; checkpoint p.pt "
                                       "(continue with --resume)")
    assert all(line.startswith("protloc: step ") for line in stderr.splitlines()[:-1])
    assert load_checkpoint(tmp_path / "p.pt")["step"] == steps
    resumed = CliRunner().invoke(main, ["pretrain", str(images), "-o", str(tmp_path / "p.pt"), "--resume",
                                        "--stop-at", str(steps + 1), "--workers", "0", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(tmp_path / "p.pt")["step"] == steps + 1


def test_workers_ignore_sigterm_from_others(images, slow_image, tmp_path):
    """A SIGTERM to the workers alone (not from the main process) changes nothing: the run ends normally."""
    proc = start("embed", images, "--weights", "random", *TINY, "-o", "emb.npy", cwd=tmp_path)
    reading_slow_image(proc, tmp_path)
    for pid in group(proc.pid):
        if pid != proc.pid:
            os.kill(pid, signal.SIGTERM)
    (tmp_path / "GO").touch()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert np.load(tmp_path / "emb.npy").shape == (5, 192)


def test_workers_end_when_the_main_process_dies(images, slow_image, tmp_path):
    """SIGKILL to the main process alone, while a worker is stuck reading a file: no worker lingers."""
    proc = start("embed", images, "--weights", "random", *TINY, "-o", "emb.npy", cwd=tmp_path)
    reading_slow_image(proc, tmp_path)
    proc.kill()
    proc.wait()
    wait_for(lambda: not group(proc.pid), "empty process group", timeout=30)


def test_an_iterator_alive_at_exit_does_not_hang_the_interpreter(tmp_path):
    """Python's exit ends daemonic children with SIGTERM: workers must take it from their main process."""
    script = ("import time, torch\n"
              "from protloc.data import decoded\n"
              "class Slow(torch.utils.data.Dataset):\n"
              "    def __len__(self): return 10**6\n"
              "    def __getitem__(self, i): time.sleep(0.01); return i\n"
              "ITERATOR = decoded(Slow(), 2, batch_size=None)\n"
              "print(next(ITERATOR))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "0\n", done.stderr[-2000:]


# Progress without a terminal (stderr of CliRunner and of these runs is no terminal): status lines


def test_status_lines_after_the_first_step_then_at_the_set_pace(capsys):
    every_step = StatusLine(total=4, every=0)
    for loss in (4.0, 3.0, 2.0, 1.0):
        every_step.update(loss, images=8)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"protloc: step {k}/4" for k in (1, 2, 3, 4)]
    assert lines[1].split(", ")[1] == "loss 3.0000"
    assert all(" img/s, ETA " in line for line in lines) and lines[-1].endswith("ETA 0:00:00")
    seldom = StatusLine(total=1000, initial=10, what="fine-tuning step", every=1e9)
    for _ in range(5):
        seldom.update(1.5, images=2)
    assert capsys.readouterr().err.splitlines()[0].startswith("protloc: fine-tuning step 11/1000, loss 1.5000, ")
    assert seldom.lines == 1


@pytest.mark.parametrize("every, quiet, lines", [("0", False, 3), ("1e9", False, 1), ("0", True, 0)])
def test_pretrain_prints_status_lines_without_a_terminal(images, tmp_path, monkeypatch, every, quiet, lines):
    monkeypatch.setenv("PROTLOC_STATUS_EVERY", every)
    result = CliRunner().invoke(main, ["pretrain", str(images), "-o", str(tmp_path / "p.pt"), "--steps", "3",
                                       *PRETRAIN, "--workers", "0"] + (["--quiet"] if quiet else []))
    assert result.exit_code == 0, result.output
    status = [line for line in result.stderr.splitlines() if line.startswith("protloc: step ")]
    assert len(status) == lines
    assert [line.split(",")[0] for line in status] == [f"protloc: step {k}/3" for k in range(1, lines + 1)]


def test_full_finetuning_prints_status_lines_without_a_terminal(images, tmp_path, monkeypatch):
    monkeypatch.setenv("PROTLOC_STATUS_EVERY", "0")
    result = CliRunner().invoke(main, ["finetune", str(images), "--labels", str(tmp_path / "labels.csv"),
                                       "--weights", "random", *TINY, "--size", "16", "--batch-size", "2",
                                       "--epochs", "2", "--min-steps", "0", "--folds", "2", "--val-fraction", "0",
                                       "--workers", "0"])
    assert result.exit_code == 0, result.output
    status = [line for line in result.stderr.splitlines() if line.startswith("protloc: fine-tuning step ")]
    # 2 folds, each training on 2 images: 1 step per epoch, 2 epochs
    assert [line.split(",")[0] for line in status] == [f"protloc: fine-tuning step {k}/4" for k in (1, 2, 3, 4)]
