#!/usr/bin/env bash
# Recipe FPQ_gptq_rot_ohad32 W4A4E4 (FPQ; GPTQ rounding, residual rotation, online Hadamard of 32-channel blocks before o_proj; configs/recipes.py) on SmolLM2-135M-Instruct, the paper's settings (env.sh).
source "$(dirname "$0")/env.sh"
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "$DEVICE" --batch_size "$BATCH_SIZE" \
--no_cache --num_fewshot 0 --quant_config 'FPQ_gptq_rot_ohad32_config_llama' --qbits 4 4 4 2 2 2 --calib_size 32 --search_round 3 \
--search_intervals 0.01 1.2 100 --heldout_ppl 16 --output_path "$OUT/FPQ_gptq_rot_ohad32.json"
