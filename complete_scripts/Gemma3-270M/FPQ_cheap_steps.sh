#!/usr/bin/env bash
# FPQ W4A4E4 on Gemma3-270M, the paper's settings (env.sh), with the opt-in cheaper search steps (--weight_refine 8 --act_coarse_tokens 1024 --act_refine 2; issue 22 item 6: made the defaults only if held-out perplexity moves < 2% and the informative average < 0.3 points on every model).
source "$(dirname "$0")/env.sh"
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "$DEVICE" --batch_size "$BATCH_SIZE" \
--no_cache --num_fewshot 0 --quant_config 'FPQ_config_llama' --qbits 4 4 4 2 2 2 --calib_size 32 --search_result_dir search_result/Gemma3-270M --search_round 3 \
--search_intervals 0.01 1.2 100 --heldout_ppl 16 --weight_refine 8 --act_coarse_tokens 1024 --act_refine 2 --output_path "$OUT/FPQ_cheap_steps.json"
