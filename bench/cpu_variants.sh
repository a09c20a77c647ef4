#!/usr/bin/env bash
# CPU probe of what moves FPQ on SmolLM2-135M at small scale, judged on held-out perplexity (--heldout_ppl:
# 8 x 512 tokens of exllamav2's Wikipedia excerpt, neither calibration nor evaluation data). Small settings
# (calibration 4 x 512 tokens, 1 round, 0.3 1.2 9): not comparable with the GPU rows. One results JSON per
# variant in docs/results/SmolLM2-135M/variants_heldout_cpu/ (piqa's first 20 documents ride along), and
# layer_mse_candidates36.json: each Linear's searched output MSE with 4x the candidates against FPQ's
# (bench/compare_layer_mse.py; the 36-candidate grid holds the 9-candidate one).
# VARIANTS="FPQ FPQ_candidates36" runs only those.
set -euo pipefail
source "$(dirname "$0")/cpu_probe_settings.sh"
OUT=docs/results/SmolLM2-135M/variants_heldout_cpu
mkdir -p $OUT
run() {
  local name=$1; shift
  [ -z "${VARIANTS:-}" ] || [[ " $VARIANTS " == *" $name "* ]] || return 0
  python3 main.py "${common[@]}" "$@" --search_result_dir "search_result/variants/$name" \
    --output_path "$OUT/$name.json" 2>&1 | grep "held-out perplexity"
}
run full_precision
run MinMax_FP --quant_config MinMax_config_llama
run FPQ --quant_config FPQ_config_llama
run FPQ_sequential --quant_config FPQ_config_llama --sequential
run FPQ_bias_space --quant_config FPQ_config_llama --search_space bias
run FPQ_exhaustive_act --quant_config FPQ_config_llama --act_coarse_tokens 0
run FPQ_candidates36 --quant_config FPQ_config_llama --search_intervals 0.3 1.2 36
run SmoothQuant --quant_config SmoothQuant_config_llama --qbits 4 4 16 2 2 2
run NVFP4 --quant_config NVFP4_config_llama
run MXFP4 --quant_config MXFP4_config_llama
python3 bench/compare_layer_mse.py search_result/variants/FPQ search_result/variants/FPQ_candidates36 \
  --output $OUT/layer_mse_candidates36.json
