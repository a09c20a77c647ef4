#!/usr/bin/env bash
# Full precision (no quantization) on SmolLM2-135M-Instruct (the embedded default; set MODEL_ADDR for another model), the paper's settings.
# Environment: TASKS (default: the paper's 6 + openbookqa + lambada_openai), DEVICE (cuda), OUT (results folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL_ARGS=${MODEL_ADDR:+pretrained=$MODEL_ADDR,}use_accelerate=True
TASKS=${TASKS:-arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande,lambada_openai}
OUT=${OUT:-docs/results/SmolLM2-135M}
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "${DEVICE:-cuda}" --batch_size auto \
--no_cache --num_fewshot 0  --output_path "$OUT/full_precision.json"
