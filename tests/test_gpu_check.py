"""What the GPU run depends on, checked without a GPU: benchmarks/gpu_check.sh (its stages, time limits,
and what it leaves under $OUT), the pretraining benchmark's two timings, and the ahead-of-time compile
check (benchmarks/compile_check.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["tests", "patch_embed", "attention", "pretrain"]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")


def gpu_check(tmp_path, *args, python=sys.executable, **env):
    """Run gpu_check.sh with OUT=tmp_path/out; (exit code, output, {file name: text} under OUT)."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "PYTHON": str(python), **env}
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, {p.name: p.read_text() for p in out.iterdir()}


def stage_results(summary):
    """{stage: result} from the summary's stage table."""
    rows = re.findall(r"^(\w+) +(ok|failed \(exit \d+\)|timed out at \d+ s|skipped: [^\d]+?) +\d+$", summary, re.M)
    return dict(rows)


def test_the_script_names_every_test_file_with_gpu_tests():
    named = re.search(r'^GPU_TESTS="([^"]+)"', SCRIPT.read_text(), re.M).group(1).split()
    marked = sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                    if "pytest.mark.gpu" in p.read_text() and p.name != Path(__file__).name)
    assert sorted(named) == marked


def test_dry_run_writes_each_stage_log_and_the_summary_under_out(tmp_path):
    rc, output, files = gpu_check(tmp_path, "--dry-run")
    assert rc == 0, output
    assert "timeout_s=570" in output  # how the run is meant to be called
    assert set(files) == {f"{s}.log" for s in STAGES} | {"gpu_check_dry-run.txt"}  # GPU machines return <= 8
    summary = files["gpu_check_dry-run.txt"]
    assert stage_results(summary) == dict.fromkeys(STAGES, "ok")
    assert re.search(r"^# tests: \d+/\d+ tests collected", summary, re.M)
    for name in re.search(r'^GPU_TESTS="([^"]+)"', SCRIPT.read_text(), re.M).group(1).split():
        assert f"{name}::" in files["tests.log"]  # each file imports and has GPU tests
    assert summary in output  # printed at the end too


@no_gpu
def test_without_a_gpu_it_stops_at_once_with_a_summary(tmp_path):
    rc, output, files = gpu_check(tmp_path)
    assert rc == 1
    assert list(files) == ["gpu_check_none.txt"]
    assert "not run: no CUDA GPU" in files["gpu_check_none.txt"]


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python3: the probe names a GPU; the tests fail, one benchmark passes, one fails, one hangs
case "$1" in
    -) cat > /dev/null; echo "Fake GPU|torch 0, triton 0"; exit 0 ;;
    -m) echo "FAILED tests/test_x.py::test_y - boom"; echo "1 failed, 2 passed in 0.1s"; exit 1 ;;
esac
out=; prev=
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
case "$1" in
    benchmarks/bench_patch_embed.py) echo "patch row" | tee "$out"; exit 0 ;;
    benchmarks/bench_attention.py) echo "attention broke" >&2; exit 3 ;;
    benchmarks/bench_pretrain.py) echo "pretrain row 1" | tee "$out"; exec sleep 60 ;;
esac
exit 99
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "fake-python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def test_each_stage_runs_whatever_the_last_did_and_a_timeout_keeps_what_was_measured(tmp_path, fake_python):
    # a budget of 18 s, less the 10 s kept for the summary: the hanging last stage is stopped at ~8 s
    rc, output, files = gpu_check(tmp_path, python=fake_python, GPU_CHECK_BUDGET_S="18")
    assert rc == 1
    summary = files["gpu_check_Fake-GPU.txt"]
    results = stage_results(summary)
    assert results["tests"] == "failed (exit 1)" and results["patch_embed"] == "ok"
    assert results["attention"] == "failed (exit 3)" and results["pretrain"].startswith("timed out at")
    assert "# tests: 1 failed, 2 passed" in summary and "FAILED tests/test_x.py::test_y - boom" in summary
    assert "patch row" in summary and "pretrain row 1" in summary  # the stopped stage's rows are kept
    assert "attention broke" in files["attention.log"] and "pretrain row 1" in files["pretrain.log"]


def test_a_spent_budget_skips_the_stages_and_still_writes_the_summary(tmp_path, fake_python):
    rc, output, files = gpu_check(tmp_path, python=fake_python, GPU_CHECK_BUDGET_S="5")
    assert rc == 1
    assert stage_results(files["gpu_check_Fake-GPU.txt"]) == dict.fromkeys(STAGES, "skipped: the budget is spent")


def test_pretrain_benchmark_reports_the_model_step_apart_from_the_whole_step(tmp_path):
    table = tmp_path / "pretrain.txt"
    env = {**os.environ, "PROTLOC_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_pretrain.py"), "--archs", "vit_tiny",
                           "--batch-size", "2", "--steps", "1", "--global-size", "32", "--local-size", "16",
                           "--local-crops", "2", "--out-dim", "64", "--out", str(table)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = table.read_text().splitlines()
    assert "s / step" in lines[2] and "GFLOP per model step" in lines[3]
    rows = {line.split(None, 2)[2].rsplit(None, 4)[0]: line.split() for line in lines[4:7]}
    assert set(rows) == {"model, per crop size (--pack off)", "model, packed (--pack on)",
                         "end to end on TIFFs (--pack auto: off)"}
    for arch, backend, *_, seconds, rate, _, bound in rows.values():
        assert (arch, backend) == ("vit_tiny", "torch") and min(float(seconds), float(rate), float(bound)) > 0
    assert lines[7].startswith("# vit_tiny: end to end / model step alone") and "decode" in lines[7]
    assert lines == proc.stdout.splitlines()  # printed as written


def compile_check(*args, **env):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), *args],
                          capture_output=True, text=True, env=env, timeout=1200)


def test_compile_check_under_the_interpreter_compiles_nothing():
    proc = compile_check(TRITON_INTERPRET="1")
    assert proc.returncode == 0 and "nothing compiled" in proc.stdout


@pytest.mark.slow
def test_compile_check_compiles_every_kernel_for_sm_90(tmp_path):
    pytest.importorskip("triton")
    proc = compile_check("--quick", "--arch", "90", "--out", str(tmp_path / "compiled.txt"))
    if "nothing compiled" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "compiled.txt").read_text()
    for kernel in ("_patch_embed_fwd", "_patch_embed_bwd_weight", "_fwd_kernel", "_bwd_preprocess_kernel",
                   "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        # ... kernel config warps stages registers spills(stored/loaded) shared-KB seconds verdict
        row = re.search(rf"^sm_90 .* {kernel} +\S+ +\d+ +\d+ +(\d+) +\d+/\d+ +([\d.]+) +[\d.]+ +(ok|spills)$",
                        table, re.M)
        assert row and int(row.group(1)) > 0, kernel
