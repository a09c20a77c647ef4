#!/usr/bin/env bash
# FPQ baseline W4A4E4 on SmolLM2-135M-Instruct (the embedded default; set MODEL_ADDR for another model), the paper's settings.
# Environment: TASKS (default: the paper's 6 + openbookqa + lambada_openai), DEVICE (cuda), OUT (results folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL_ARGS=${MODEL_ADDR:+pretrained=$MODEL_ADDR,}use_accelerate=True
TASKS=${TASKS:-arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande,lambada_openai}
OUT=${OUT:-docs/results/SmolLM2-135M}
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "${DEVICE:-cuda}" --batch_size auto \
--no_cache --num_fewshot 0 --quant_config 'FPQ_baseline_config_llama' --qbits 4 4 4 2 2 2 --calib_size 32 --search_round 3 \
--search_intervals 0.01 1.2 100 --output_path "$OUT/FPQ_baseline.json"
