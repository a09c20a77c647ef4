#!/usr/bin/env bash
# FPQ W4A4E4 re-evaluated from its saved parameters (run FPQ.sh first) on Gemma3-270M, the paper's settings (env.sh).
source "$(dirname "$0")/env.sh"
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "$DEVICE" --batch_size "$BATCH_SIZE" \
--no_cache --num_fewshot 0 --quant_config 'FPQ_config_llama' --qbits 4 4 4 2 2 2 --only_eval --plot \
--ptq_param_path "./search_result/Gemma3-270M/FPQ_config_llama/W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt" --heldout_ppl 16 --output_path "$OUT/FPQ_only_eval.json"
