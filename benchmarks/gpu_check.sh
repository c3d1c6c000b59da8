#!/usr/bin/env bash
# The one GPU check: run it whenever a CUDA GPU is at hand, then commit the table it writes.
#
#     bash benchmarks/gpu_check.sh [RESULTS_FILE]   # default benchmarks/results/gpu_check_<card>.txt
#
# 1. the GPU tests of every Triton kernel against its torch reference (pytest -m gpu),
# 2. every kernel benchmark in its --quick form, and the pretraining step with each backend,
# 3. one table: printed at the end and written to RESULTS_FILE.
# Under 5 minutes on one H100. It runs offline on a typical CUDA image that has torch, triton,
# numpy, scipy, click, tifffile, scikit-learn, tqdm and pytest (e.g. torch 2.11 + Triton 3.6 on
# Python 3.12): protloc is put on the path by an editable install without dependencies; nothing
# is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! $PY -c "import protloc.kernels" 2>/dev/null; then
    $PY -m pip install --quiet --no-deps --no-index --no-build-isolation -e . || { echo "gpu_check: cannot install protloc"; exit 1; }
fi
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || { echo "gpu_check: no CUDA GPU"; exit 1; }
out=${1:-benchmarks/results/gpu_check_${card}.txt}
work=$(mktemp -d)
status=0

echo "== GPU tests"
$PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$work/tests.txt" || status=1
echo "== patch embedding"
$PY benchmarks/bench_patch_embed.py --quick --out "$work/patch_embed.txt" || status=1
echo "== attention"
$PY benchmarks/bench_attention.py --quick --out "$work/attention.txt" || status=1
echo "== pretraining step"
$PY benchmarks/bench_pretrain.py --device cuda --archs vit_small --batch-size 64 --backends torch,triton \
    --out "$work/pretrain.txt" || status=1

{
    echo "# protloc GPU check on $card, $(date -u +%Y-%m-%d), $($PY -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")')"
    echo "# tests: $(tail -n 1 "$work/tests.txt")"
    for part in patch_embed attention pretrain; do
        [ -f "$work/$part.txt" ] && { echo; cat "$work/$part.txt"; }
    done
} > "$out"
echo
echo "== results ($out)"
cat "$out"
exit $status
