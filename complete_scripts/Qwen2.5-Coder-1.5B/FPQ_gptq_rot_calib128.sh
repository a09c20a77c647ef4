#!/usr/bin/env bash
# Recipe FPQ_gptq_rot W4A4E4 (FPQ; GPTQ rounding, residual rotation; configs/recipes.py) calibrated on 128 sequences instead of 32 on Qwen2.5-Coder-1.5B-Instruct, otherwise the paper's settings (env.sh).
source "$(dirname "$0")/env.sh"
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "$DEVICE" --batch_size "$BATCH_SIZE" \
--no_cache --num_fewshot 0 --quant_config 'FPQ_gptq_rot_config_llama' --qbits 4 4 4 2 2 2 --calib_size 128 --search_result_dir search_result/Qwen2.5-Coder-1.5B/calib128 --search_round 3 \
--search_intervals 0.01 1.2 100 --heldout_ppl 16 --output_path "$OUT/FPQ_gptq_rot_calib128.json"
