#!/usr/bin/env bash
# Issue 30's GPU figures in one run of at most 5 minutes on one H100/H200: Table 2's layout (Net8 deployed against
# EdgeConnect and the other adapters) in bfloat16, eager and under torch.compile, and the demo recipe's training
# step against the bare network's forward and backward, with its parts.
#
#     bash recipes/gpu_bench.sh            # prints the figures and writes runs/gpu-bench/*.json and *.txt
#
# Each step has its own time limit; a step cut off says so and the next one runs. Not yet run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-bench}
mkdir -p "$OUT"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step() {  # step LIMIT NAME COMMAND...
    local limit=$1 name=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "gpu_bench.sh: $name stopped after $limit s"
    return 0
}
step 70 bench-bf16 kdinpaint bench --device cuda --dtype bfloat16 --size 256 --json "$OUT/bench-bf16.json"
step 100 bench-bf16-compile kdinpaint bench --device cuda --dtype bfloat16 --size 256 --compile \
    --adapters reference edgeconnect --json "$OUT/bench-bf16-compile.json"
step 60 bench-fp32 kdinpaint bench --device cuda --dtype float32 --size 256 --adapters reference edgeconnect \
    --json "$OUT/bench-fp32.json"
step 60 train-step python recipes/bench_ops.py train_step --device cuda --repeats 5
echo "gpu_bench.sh: $(( $(date +%s) - start )) s in all"
