#!/usr/bin/env bash
# CPU probe: NVFP4 round to nearest after SmoothQuant's migration with one strength alpha for every norm
# (bench/smooth_alpha.py), on the embedded SmolLM2-135M at the CPU probe scale (bench/cpu_probe_settings.sh), judged on
# held-out perplexity: does one alpha stand out, or does each norm need its own (the `smoothfit` recipe component)?
# One results JSON per alpha in docs/results/SmolLM2-135M/smooth_alpha_cpu/. ALPHAS="0.5 0.8" runs only those;
# BASE=NVFP4_4over6_search_gptq puts the migration ahead of that recipe instead of round to nearest (BASE=NVFP4).
set -euo pipefail
source "$(dirname "$0")/cpu_probe_settings.sh"
OUT=docs/results/SmolLM2-135M/smooth_alpha_cpu
mkdir -p $OUT
for alpha in ${ALPHAS:-0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 0.95}; do
  python3 bench/smooth_alpha.py "$alpha" "${BASE:-NVFP4}" "${common[@]}" \
    --search_result_dir "search_result/smooth_alpha_cpu/${BASE:+${BASE}_}$alpha" \
    --output_path "$OUT/${BASE:-NVFP4}_smooth$alpha.json" 2>&1 | grep "held-out perplexity" | sed "s/^/alpha $alpha: /"
done
