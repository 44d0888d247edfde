#!/usr/bin/env bash
# The CPU speed reference (benchmarks/results/README.md): BiXT-Ti/16 against the authors' formulation under bixt's
# allocator setting and under glibc's defaults, bf16 autocast and torch.compile, gradient checkpointing's memory.
# First `bixt tune` caches this machine's fastest attention backend per shape (its check: auto against the best
# single backend at shapes it was not tuned on), in bf16 too where the CPU has it, so `ours` runs with auto as tuned
# here; the matmul floor of the authors' steps (benchmarks/gemm_floor.py). About 35 minutes on 2
# cores; run it with nothing else on the machine. TAG names the machine in the file names (default: xeon).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-xeon}
R=benchmarks/results

bixt tune --out "$R/tune_${TAG}_2t.json" > "$R/tune_${TAG}_2t.txt"
if python -c "import sys; from bixt.nn.precision import cpu_supports_bf16; sys.exit(not cpu_supports_bf16())"; then
    bixt tune --dtype bf16 --out "$R/tune_${TAG}_2t_bf16.json" > "$R/tune_${TAG}_2t_bf16.txt"  # auto under --amp
fi

python benchmarks/bench_authors.py --allocator tuned --repeats 3 --out "$R/authors_${TAG}_tuned.json"
python benchmarks/bench_authors.py --allocator glibc --runs authors ours --repeats 2 --no-gemm \
    --out "$R/authors_${TAG}_glibc.json"
python benchmarks/bench_authors.py --allocator tuned --runs authors ours_compile --repeats 1 --no-gemm \
    --out "$R/authors_${TAG}_compile.json"

# The matmul floor: the authors' step against its matrix products alone, the most any re-arrangement could gain.
for mode in train infer; do
    for tokens in 196 1024 4096 16384; do python benchmarks/gemm_floor.py --tokens "$tokens" --mode "$mode"; done
done > "$R/floor_${TAG}.txt"
if python -c "import sys; from bixt.nn.precision import cpu_supports_bf16; sys.exit(not cpu_supports_bf16())"; then
    for mode in train infer; do  # the same products in bf16, as autocast runs them: the floor of the 1.8x target
        for tokens in 196 1024 4096 16384; do python benchmarks/gemm_floor.py --tokens "$tokens" --mode "$mode" --bf16; done
    done > "$R/floor_${TAG}_bf16.txt"
fi

# Gradient checkpointing's memory at 16,384 tokens: each under the allocator setting bixt picks for it.
for gc in "" "--grad-checkpointing"; do
    bixt profile --model bixt_ti_l64_p16 --seq-len 16384 --mode train --quick --json $gc
done > "$R/checkpointing_${TAG}.jsonl"
