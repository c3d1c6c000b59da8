#!/usr/bin/env bash
# The one GPU check: run it whenever a CUDA GPU is at hand, then commit the table it writes.
#
#     bash benchmarks/gpu_check.sh              # on the GPU machine, as ONE command with a ~570 s limit
#     bash benchmarks/gpu_check.sh --dry-run    # anywhere: the same stages, each a quick stand-in
#
# Stages, in order, each under its own `timeout` (SIGINT, then SIGKILL 15 s later; limits below),
# the next one run whatever the last one did:
#   tests        the GPU tests (pytest -m gpu) of the files in GPU_TESTS, named one by one so that
#                a file that cannot be imported costs its own tests only
#   patch_embed  benchmarks/bench_patch_embed.py --quick
#   attention    benchmarks/bench_attention.py --quick
#   pretrain     benchmarks/bench_pretrain.py on CUDA, torch and triton backends
# Every stage also gets no more than what is left of GPU_CHECK_BUDGET_S (default 540 s from the
# start) less 10 s, so the script ends, summary written, before the caller's limit.
#
# Where things go: with $OUT set (GPU machines return only files under $OUT, at most 8, and the
# last 12,000 characters of output), each stage's log is $OUT/<stage>.log, written as it runs, and
# the summary $OUT/gpu_check_<card>.txt is rewritten as each stage ends: a run cut short keeps
# everything measured before. Without $OUT, logs go to a temporary folder and the summary to
# benchmarks/results/gpu_check_<card>.txt (in a dry run or without a GPU, to the temporary folder).
# The summary is printed at the end. Exit 0 when every stage passed, 1 otherwise (and when there
# is no CUDA GPU: the summary says so).
#
# Needs python3 with torch, triton, numpy, scipy, tifffile, click, scikit-learn, tqdm and pytest
# (e.g. torch 2.11 + Triton 3.6 on Python 3.12); protloc itself is put on PYTHONPATH from this
# checkout (a tree of links, no pip): nothing is installed or downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
GPU_TESTS="tests/test_attention_triton.py tests/test_patch_embed_triton.py tests/test_augment.py"
BUDGET=${GPU_CHECK_BUDGET_S:-540}
RESERVE=10  # seconds kept for the summary
TESTS_S=200 PATCH_EMBED_S=90 ATTENTION_S=90 PRETRAIN_S=150  # each stage's own limit
dry_run=0
case "${1:-}" in
    --dry-run) dry_run=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

echo "gpu_check: meant to run as ONE command on the GPU machine with a limit of about 570 s (timeout_s=570);"
echo "gpu_check: stages tests $TESTS_S s, patch_embed $PATCH_EMBED_S s, attention $ATTENTION_S s," \
    "pretrain $PRETRAIN_S s, within $BUDGET s in all"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# protloc from this checkout: protloc/ with kernels/ and cli/ inside, as pyproject.toml maps them
mkdir -p "$work/site/protloc"
ln -s "$PWD"/protloc/* "$work/site/protloc/"
ln -s "$PWD/kernels" "$work/site/protloc/kernels"
ln -s "$PWD/cli" "$work/site/protloc/cli"
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"

# one line: card|versions (card "none" without a CUDA GPU; "dry-run" in a dry run)
probe=$($PY - "$dry_run" 2>"$work/probe.err" <<'EOF'
import platform, sys
import numpy, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
import protloc.kernels  # noqa: F401  (the checkout imports)
card = "dry-run" if sys.argv[1] == "1" else torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"{card}|torch {torch.__version__}, triton {triton_version}, numpy {numpy.__version__}, "
      f"python {platform.python_version()}")
EOF
) || { echo "gpu_check: cannot import torch, numpy or protloc with $PY:"; tail -n 5 "$work/probe.err"; exit 1; }
card=${probe%%|*}
card=${card// /-}
versions=${probe#*|}

if [ -n "${OUT:-}" ]; then
    logs=$OUT
    summary=$OUT/gpu_check_$card.txt
elif [ "$card" = none ] || [ "$dry_run" = 1 ]; then  # nothing measured: nothing for benchmarks/results
    logs=$work
    summary=$work/gpu_check_$card.txt
else
    logs=$work
    summary=benchmarks/results/gpu_check_$card.txt
fi
mkdir -p "$logs" "$(dirname "$summary")"
status=0
stages=()  # "name|verdict|seconds"

write_summary() {
    {
        echo "# protloc GPU check on $card, $(date -u +%Y-%m-%dT%H:%MZ); $versions"
        [ "$dry_run" = 1 ] && echo "# dry run: each stage a quick stand-in, nothing measured"
        printf '%-12s %-36s %8s\n' stage result seconds
        for row in "${stages[@]}"; do
            IFS='|' read -r name verdict secs <<< "$row"
            printf '%-12s %-36s %8s\n' "$name" "$verdict" "$secs"
        done
        if [ -f "$logs/tests.log" ]; then
            echo "# tests: $(grep -E '(passed|failed|error|skipped|deselected|no tests ran|collected)' "$logs/tests.log" | tail -n 1)"
            grep -E '^(FAILED|ERROR) ' "$logs/tests.log"
        fi
        for name in patch_embed attention pretrain; do
            [ -s "$work/$name.txt" ] && { echo; cat "$work/$name.txt"; }
        done
    } > "$summary"
}

# stage NAME LIMIT_S COMMAND...: runs COMMAND under its own time limit, output to NAME.log
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - RESERVE))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then  # too short to be worth starting
        stages+=("$name|skipped: the budget is spent|0")
        status=1
        write_summary
        return
    fi
    echo "== $name (limit $limit s)"
    local start=$SECONDS rc verdict
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) verdict=ok ;;
        124 | 137) verdict="timed out at $limit s" ;;
        *) verdict="failed (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || status=1
    stages+=("$name|$verdict|$((SECONDS - start))")
    write_summary
}

if [ "$card" = none ]; then
    stages+=("all|not run: no CUDA GPU|0")
    write_summary
    cat "$summary"
    exit 1
fi

if [ "$dry_run" = 1 ]; then
    # shellcheck disable=SC2086
    stage tests $TESTS_S $PY -m pytest --collect-only -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
        $GPU_TESTS
    stage patch_embed $PATCH_EMBED_S $PY benchmarks/bench_patch_embed.py --help
    stage attention $ATTENTION_S $PY benchmarks/bench_attention.py --help
    stage pretrain $PRETRAIN_S $PY benchmarks/bench_pretrain.py --help
else
    # shellcheck disable=SC2086
    stage tests $TESTS_S $PY -m pytest -v -m gpu -p no:cacheprovider --continue-on-collection-errors -rfE --tb=short \
        $GPU_TESTS
    stage patch_embed $PATCH_EMBED_S $PY benchmarks/bench_patch_embed.py --quick --out "$work/patch_embed.txt"
    stage attention $ATTENTION_S $PY benchmarks/bench_attention.py --quick --out "$work/attention.txt"
    stage pretrain $PRETRAIN_S $PY benchmarks/bench_pretrain.py --device cuda --archs vit_small --batch-size 64 \
        --backends torch,triton --out "$work/pretrain.txt"
fi

echo
echo "== summary ($summary)"
cat "$summary"
exit $status
