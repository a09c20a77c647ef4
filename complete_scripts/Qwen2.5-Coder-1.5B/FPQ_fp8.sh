#!/usr/bin/env bash
# FPQ W4A4E4 re-evaluated from its saved parameters (run FPQ.sh first) with --execution fp8: every Linear's W4A4
# product on FP8 tensor cores (E4M3 codes, row-wise scales; needs a GPU of compute capability 8.9+). Its task
# accuracies against FPQ_only_eval's (the simulated forward on the same parameters): issue 21's "within 0.1 points".
source "$(dirname "$0")/env.sh"
python3 main.py --model hf-causal-experimental --model_args "$MODEL_ARGS" \
--tasks "$TASKS" --device "$DEVICE" --batch_size "$BATCH_SIZE" \
--no_cache --num_fewshot 0 --quant_config 'FPQ_config_llama' --qbits 4 4 4 2 2 2 --only_eval --execution fp8 \
--ptq_param_path "./search_result/Qwen2.5-Coder-1.5B/FPQ_config_llama/W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt" --heldout_ppl 16 --output_path "$OUT/FPQ_fp8.json"
