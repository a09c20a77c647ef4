#!/usr/bin/env bash
# CPU probe of the recipes beyond the paper (configs/recipes.py) on the embedded SmolLM2-135M at small scale, judged
# on held-out perplexity only (--heldout_ppl: 8 x 512 tokens of exllamav2's Wikipedia excerpt, neither calibration
# nor evaluation data; piqa's first 20 documents ride along and are not read). Small settings (calibration 4 x 512
# tokens, 1 round, 0.3 1.2 9): not comparable with the GPU rows, which are the evidence; this says early which
# components move perplexity. One results JSON per recipe in docs/results/SmolLM2-135M/recipes_heldout_cpu/.
# RECIPES="NVFP4 NVFP4_search" runs only those (a name is a --quant_config without _config_llama).
set -euo pipefail
source "$(dirname "$0")/cpu_probe_settings.sh"
OUT=docs/results/SmolLM2-135M/recipes_heldout_cpu
mkdir -p $OUT
for name in ${RECIPES:-NVFP4 NVFP4_search NVFP4_gptq NVFP4_rot NVFP4_search_gptq_rot NVFP4_4over6 NVFP4_tensor \
             NVFP4_4over6_search_gptq_rot MXFP4 MXFP4_search MXFP4_gptq MXFP4_rot MXFP4_search_gptq_rot FPQ \
             FPQ_gptq FPQ_rot FPQ_gptq_rot}; do
  python3 main.py "${common[@]}" --quant_config "${name}_config_llama" \
    --search_result_dir "search_result/recipes_cpu/$name" --output_path "$OUT/$name.json" 2>&1 \
    | grep "held-out perplexity" | sed "s/^/$name: /"
done
