#!/usr/bin/env bash
# ablation: FPQ W4A4E4 with 400 candidates per search step (the paper: 100) on SmolLM2-135M-Instruct, the paper's settings (env.sh).
source "$(dirname "$0")/env.sh"
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "$DEVICE" --batch_size "$BATCH_SIZE" \
--no_cache --num_fewshot 0 --quant_config 'FPQ_config_llama' --qbits 4 4 4 2 2 2 --search_result_dir search_result/ablation_candidates400 --calib_size 32 --search_round 3 \
--search_intervals 0.01 1.2 400 --heldout_ppl 16 --output_path "$OUT/ablation_candidates400.json"
