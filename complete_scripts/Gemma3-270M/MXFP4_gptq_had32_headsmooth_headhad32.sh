#!/usr/bin/env bash
# Recipe MXFP4_gptq_had32_headsmooth_headhad32 W4A4E4 (MXFP4; GPTQ rounding, online 32-block Hadamard before every decoder Linear, and before the head after SmoothQuant's migration (alpha 0.5) into the final norm; configs/recipes.py) on Gemma3-270M, the paper's settings (env.sh).
source "$(dirname "$0")/env.sh"
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "$DEVICE" --batch_size "$BATCH_SIZE" \
--no_cache --num_fewshot 0 --quant_config 'MXFP4_gptq_had32_headsmooth_headhad32_config_llama' --qbits 4 4 4 2 2 2 --calib_size 32 --search_result_dir search_result/Gemma3-270M --search_round 3 \
--search_intervals 0.01 1.2 100 --heldout_ppl 16 --output_path "$OUT/MXFP4_gptq_had32_headsmooth_headhad32.json"
