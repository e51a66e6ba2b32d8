#!/usr/bin/env bash
# The paper-regime study at 128x128 on one GPU (issue 29, part 4): Table 3's core rows (baseline, net1-net4, net8),
# each distilled variant with its twin, 2 seeds, width 32, 400 student steps, at most 8 minutes on one H100/H200.
#
#     bash recipes/gpu_study.sh                 # runs in runs/study-gpu/paper128, writes the paper128 section of
#                                               # recipes/results/2026-12-07-distillation-study.md
#     OUT=/scratch/study bash recipes/gpu_study.sh train.steps=800     # more steps when the first run shows room
#
# Four runs share the GPU at once (small networks leave it mostly idle one at a time), two CPU threads each.
# The study stops at 7.5 minutes whatever is left (the finished runs are kept; running the script again resumes
# the rest), then writes the table of what finished. Sized from estimated step times: not yet run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/study-gpu}
LIMIT=${LIMIT:-450}
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# timeout signals the study's whole process group, so its training runs stop with it
timeout "$LIMIT" python recipes/study.py paper128 --device cuda --jobs 4 --threads 2 --seeds 0 1 --out "$OUT" "$@" \
    || echo "gpu_study.sh: stopped after ${LIMIT} s; the table below has the runs that finished"
python recipes/study.py paper128 --table-only --device cuda --jobs 4 --threads 2 --seeds 0 1 --out "$OUT" "$@"
echo "gpu_study.sh: $(( $(date +%s) - start )) s in all"
