#!/usr/bin/env bash
# Why an 8-bit KV cache costs Qwen2.5-Coder-1.5B-Instruct's FPQ row 10.6% of held-out perplexity (GPU, wave 15) when
# it costs SmolLM2 nothing: the cache alone, on the CPU, every Linear in full precision (MinMax_config_llama at
# --qbits 16 16 16: nothing quantized but what --kv_format names), keys with the rows' static per-channel ranges
# (searched against the attention output on the calibration data; the default --kv_granularity) against dynamic
# per-token ranges, and INT8 in place of E4M3. Small scale: 4 x 512 calibration tokens, held-out perplexity on the
# first 4 x 512 tokens of exllamav2's Wikipedia excerpt (--heldout_ppl 4 at --calib_seqlen 512), so not the rows'
# figures; piqa's first document rides along (not read). One results JSON per variant in
# docs/results/Qwen2.5-Coder-1.5B/kv_heldout_cpu/ (bench/kv_tensor_error.py's tensor_error.json beside them says which
# tensor). The default runs none, kv8_static and kv8_dynamic; VARIANTS="kv8_int8_static ..." runs those named.
set -euo pipefail
source "$(dirname "$0")/../complete_scripts/Qwen2.5-Coder-1.5B/env.sh"
OUT=docs/results/Qwen2.5-Coder-1.5B/kv_heldout_cpu
mkdir -p $OUT
common=(--model_args "pretrained=$MODEL_ADDR" --tasks piqa --limit 1 --device cpu --batch_size 8 --heldout_ppl 4
        --calib_size 4 --calib_seqlen 512 --quant_config MinMax_config_llama --qbits 16 16 16 2 2 2)
declare -A variant=([none]="" [kv8_static]="--kv_format E4M3" [kv4_static]="--kv_format E2M1"
                    [kv8_int8_static]="--kv_format INT8" [kv4_int4_static]="--kv_format INT4"
                    [kv4_nvfp4_dynamic]="--kv_format NVFP4 --kv_granularity per_token per_token"
                    [kv8_dynamic]="--kv_format E4M3 --kv_granularity per_token per_token"
                    [kv4_dynamic]="--kv_format E2M1 --kv_granularity per_token per_token")
for name in ${VARIANTS:-none kv8_static kv8_dynamic}; do
  [ -n "${variant[$name]+set}" ] || { echo "unknown variant $name: ${!variant[*]}"; exit 2; }
  python3 main.py "${common[@]}" ${variant[$name]} --search_result_dir "search_result/kv_cpu_qwen/$name" \
    --output_path "$OUT/$name.json" 2>&1 | grep "held-out perplexity" | sed "s/^/$name: /"
done
