#!/usr/bin/env bash
# Where round-to-nearest NVFP4's perplexity gap lies on Qwen2.5-Coder-1.5B-Instruct, on the CPU: the NVFP4 config
# with weights only, activations only, and both quantized (--qbits: 16 bits = not quantized), both with the head and
# the embedding in full precision (the recipe NVFP4_fpends), and full precision,
# judged on held-out perplexity (--heldout_ppl 4: the first 4 x 1024 tokens of exllamav2's Wikipedia excerpt; the
# GPU rows use 16 windows, so the figures are not the rows'). piqa's first 20 documents ride along (not read).
# Round to nearest calibrates nothing (1 x 1024 tokens are read and unused). One results JSON per variant in
# docs/results/Qwen2.5-Coder-1.5B/split_heldout_cpu/. VARIANTS="W4A16E4 ..." runs only those.
set -euo pipefail
source "$(dirname "$0")/../complete_scripts/Qwen2.5-Coder-1.5B/env.sh"
OUT=docs/results/Qwen2.5-Coder-1.5B/split_heldout_cpu
mkdir -p $OUT
common=(--model_args "pretrained=$MODEL_ADDR" --tasks piqa --limit 20 --device cpu --batch_size 8 --heldout_ppl 4
        --calib_size 1 --calib_seqlen 1024)
declare -A variant=([W4A4E4]="NVFP4 4 4 4" [W4A16E4]="NVFP4 4 16 4" [W16A4E16]="NVFP4 16 4 16"
                    [fpends_W4A4E4]="NVFP4_fpends 4 4 4")  # config, then --qbits' W A E (exponent bits 2 2 2)
for name in ${VARIANTS:-full_precision W4A16E4 W16A4E16 W4A4E4 fpends_W4A4E4}; do
  if [ "$name" = full_precision ]; then quant=(); else
    read -r config w a e <<< "${variant[$name]}"
    quant=(--quant_config "${config}_config_llama" --qbits $w $a $e 2 2 2
           --search_result_dir "search_result/split_cpu/$name")
  fi
  python3 main.py "${common[@]}" "${quant[@]}" --output_path "$OUT/$name.json" 2>&1 \
    | grep "held-out perplexity" | sed "s/^/$name: /"
done
