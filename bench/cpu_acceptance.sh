#!/usr/bin/env bash
# The paper's two commands on 2 CPU cores with the embedded SmolLM2 GGUF as the model path and small settings
# (issue 4's acceptance): calibrate + evaluate piqa (first 50 docs), then --only_eval from the saved file.
# Writes both results JSON files and the wall times into docs/results/SmolLM2-135M/cpu_acceptance/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_ADDR=${MODEL_ADDR:-$(python3 -c "from utils.data.models import smollm2_gguf_path; print(smollm2_gguf_path())")}
OUT=docs/results/SmolLM2-135M/cpu_acceptance
mkdir -p $OUT
start=$(date +%s)
python3 main.py --model hf-causal-experimental --model_args pretrained=$MODEL_ADDR,use_accelerate=True \
--tasks piqa --device cpu --batch_size auto \
--no_cache --num_fewshot 0 --quant_config 'FPQ_config_llama' --qbits 4 4 4 2 2 2 --calib_size 4 --search_round 1 \
--search_intervals 0.01 1.2 20 --limit 50 --output_path $OUT/calibrate.json
middle=$(date +%s)
python3 main.py --model hf-causal-experimental --model_args pretrained=$MODEL_ADDR,use_accelerate=True \
--tasks piqa --device cpu --batch_size auto \
--no_cache --num_fewshot 0 --quant_config 'FPQ_config_llama' --qbits 4 4 4 2 2 2 --only_eval \
--ptq_param_path "./search_result/FPQ_config_llama/W4A4E4_search_round1_search_intervals(0.01,1.2,20).pt" \
--limit 50 --output_path $OUT/only_eval.json
end=$(date +%s)
printf '{"machine": "2 CPU cores (developer machine)", "calibrate_command_seconds": %d, "only_eval_command_seconds": %d}\n' \
  $((middle - start)) $((end - middle)) > $OUT/times.json
cat $OUT/times.json
