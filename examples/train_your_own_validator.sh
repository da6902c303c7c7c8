#!/usr/bin/env bash
# Train a flow validator on your model: extract -> train -> evaluate, with tiny limits (a few minutes on CPU).
#
#   bash examples/train_your_own_validator.sh [MODEL] [WORKDIR]
#
# MODEL: offline name, local folder or Hub id (default: the bundled SmolLM2-135M-Instruct).
# Data come from $HF_FLOWCHECK_DATA, else ../shared/data next to the repository.
# The paired protocol (teacher-forced right/hallucinated HaluEval answers) is used because it gives both
# classes from very few records; it is leaky (length!) -- for real numbers use --protocol generated
# and a much larger --limit (see docs/guides/evaluate-honestly.md).
set -euo pipefail
MODEL="${1:-SmolLM2-135M-Instruct}"
WORK="${2:-flowcheck-example}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

flowcheck extract --model "$MODEL" --dataset halueval-qa --protocol paired \
    --limit 40 --out "$WORK/features" --batch-size 8 --shard-size 32 --no-progress

flowcheck train --features "$WORK/features" --out "$WORK/validator" \
    --epochs 5 --patience 3 --bootstrap 200 --no-progress

flowcheck evaluate --validator "$WORK/validator" --features "$WORK/features" --split test \
    --bootstrap 200 --json "$WORK/test.json"

echo "Use it: FlowCheckedModelForCausalLM.from_pretrained(\"$MODEL\", validator=\"$WORK/validator\")"
