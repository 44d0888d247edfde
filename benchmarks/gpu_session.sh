#!/usr/bin/env bash
# Everything bixt checks on a GPU, in one run (GPU time is short): the CUDA tests, the triton kernel benchmark and
# the reference sweep of results/reference-h200. Run from the repository root:
#
#   bash benchmarks/gpu_session.sh [OUT]        # default OUT: gpu-session/ (every stage's files, also as gpu.tgz)
#   STAGES="bench sweep" bash benchmarks/gpu_session.sh    # some stages only (default: tests bench sweep)
#
# On a machine without network whose Python lacks fvcore (the H200 image: torch 2.11, triton 3.6), put wheels of
# fvcore, iopath, yacs, termcolor, xformers (optional) and bixt itself (`pip wheel --no-deps . -w .whl`) in .whl/:
# they are installed to /tmp/site first. Each stage has its own time limit, so a slow one cannot starve the rest,
# and gpu.tgz is rewritten after every stage. Without a GPU the CUDA tests skip and the benchmark refuses.
set -uo pipefail
OUT=${1:-${OUT:-gpu-session}}
W=$(mktemp -d)
mkdir -p "$OUT"
pack() { tar czf "$OUT/gpu.tgz" -C "$W" . ; }
STAGES=${STAGES:-tests bench sweep}
stage() {  # stage NAME SECONDS CMD...: output to NAME.log, exit code and seconds appended
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$W/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$W/$name.log"
    tail -n 3 "$W/$name.log"
    pack
}
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"; python3 -m pip list 2>/dev/null |
  grep -i -E "^(torch|triton|xformers|fvcore|numpy) "; nproc; } > "$W/env.txt" 2>&1
cat "$W/env.txt"
# Tests first: the measurements mean nothing if the kernels are wrong. Four workers share the GPU.
XDIST=$(python3 -c "import xdist" 2> /dev/null && echo "-n 4")
stage tests 150 python3 -m pytest -p no:cacheprovider $XDIST -rfEs tests/test_triton.py tests/test_cuda.py
stage bench 120 python3 benchmarks/bench_triton.py --out "$W/triton_h200.json"
stage sweep 240 python3 -m bixt_cli.main compare --device cuda --dtype bf16 --baselines vit,perceiver \
    --seq-lens 1024,4096,16384,65536,262144 --timing short --budget-s 60 --out "$W/reference-h200"
cp -r "$W"/. "$OUT"/
echo "written $OUT"
