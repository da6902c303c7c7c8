#!/usr/bin/env bash
# Extract flow signatures with two processes under `accelerate launch` (small limits).
#
#   bash examples/accelerate_extraction.sh [OUT]
#
# Shard i goes to process i % 2; the result equals a one-process run. `--multi_gpu` works on CPU-only
# machines too: it starts the processes with torchrun, and the pipeline then picks
# PartialState(cpu=True) (a gloo group). Note: `accelerate launch --cpu --num_processes 2` silently
# starts ONE process, and --cpu cannot be combined with --multi_gpu.
set -euo pipefail
OUT="${1:-flowcheck-example/features-2proc}"
MODEL="${MODEL:-SmolLM2-135M-Instruct}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    EXTRA=(--mixed_precision no)
else
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1   # CPU-only: one thread per process
    EXTRA=(--mixed_precision no --dynamo_backend no)
fi

accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "${EXTRA[@]}" \
    -m hf_flowcheck.cli extract --model "$MODEL" --dataset halueval-qa --protocol paired \
    --limit 16 --shard-size 8 --batch-size 4 --out "$OUT" --no-progress
