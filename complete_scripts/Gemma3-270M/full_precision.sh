#!/usr/bin/env bash
# full precision on Gemma3-270M, the paper's settings (env.sh).
source "$(dirname "$0")/env.sh"
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "$DEVICE" --batch_size "$BATCH_SIZE" \
--no_cache --num_fewshot 0 --heldout_ppl 16 --output_path "$OUT/full_precision.json"
