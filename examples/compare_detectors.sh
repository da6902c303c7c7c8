#!/usr/bin/env bash
# Compare detectors (flow validator, gradient, probe, token-confidence, sampling...) on one model,
# one feature store and one split, with their costs relative to plain generation (smoke-sized).
#
#   bash examples/compare_detectors.sh [WORKDIR]
#
# Needs the feature store and validator of examples/train_your_own_validator.sh (run it first with
# the same WORKDIR). --max-per-split keeps the run small; never report numbers from it.
set -euo pipefail
WORK="${1:-flowcheck-example}"
MODEL="${MODEL:-SmolLM2-135M-Instruct}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

if [ ! -d "$WORK/features" ]; then
    echo "No feature store at $WORK/features: run examples/train_your_own_validator.sh $MODEL $WORK first." >&2
    exit 2
fi

flowcheck compare --model "$MODEL" --features "$WORK/features" --validator "$WORK/validator" \
    --max-per-split 12 --samples 2 --max-new-tokens 16 --bootstrap 100 --json "$WORK/compare.json"
