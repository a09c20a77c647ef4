#!/usr/bin/env bash
# CPU probe of issue 22's attention rows on the embedded SmolLM2-135M at small scale (bench/cpu_probe_settings.sh),
# judged on held-out perplexity only: BASE (default FPQ; a --quant_config without _config_llama) without and with the
# KV cache at 8 and 4 bits and the two attention matmuls at 4 bits, the flags of complete_scripts/SmolLM2-135M/
# <BASE>_kv8.sh, _kv4.sh and _kv4_attn4.sh. Not comparable with the GPU rows (the evidence); it says early which
# tensor moves perplexity. One results JSON per variant in docs/results/SmolLM2-135M/kv_heldout_cpu/.
# VARIANTS="kv8 kv4" runs only those ("none" is the W4A4 row without attention quantization; kv4_q4 and kv4_p4 split
# kv4_attn4's two matmul inputs: its flags without --attn_p_format, or without --attn_format, so Q alone or P alone).
# P_FORMAT=UE4M0 puts that format in place of the script's --attn_p_format (the variants' names end in _UE4M0).
set -euo pipefail
source "$(dirname "$0")/cpu_probe_settings.sh"
BASE=${BASE:-FPQ}
OUT=docs/results/SmolLM2-135M/kv_heldout_cpu
mkdir -p $OUT
for variant in ${VARIANTS:-none kv8 kv4 kv4_attn4}; do
  script=complete_scripts/SmolLM2-135M/${BASE}_$variant.sh
  extra=() swapped=
  drop=  # the flag (and its value) a split variant leaves out of kv4_attn4's
  case $variant in kv4_q4) drop=--attn_p_format ;; kv4_p4) drop=--attn_format ;; esac
  [ -n "$drop" ] && script=complete_scripts/SmolLM2-135M/${BASE}_kv4_attn4.sh
  if [ "$variant" != none ]; then
    [ -f "$script" ] || { echo "no $script: VARIANTS are none kv8 kv4 kv4_attn4 kv4_q4 kv4_p4"; exit 2; }
    read -ra flags <<< "$(grep -o -- '--kv_format.* --output' "$script" | sed 's/ --output$//')"
    for ((i = 0; i < ${#flags[@]}; i++)); do
      if [ "${flags[i]}" = "$drop" ]; then
        i=$((i + 1))
      elif [ "${flags[i]}" = --attn_p_format ] && [ -n "${P_FORMAT:-}" ]; then
        extra+=(--attn_p_format "$P_FORMAT") swapped=1 i=$((i + 1))
      else
        extra+=("${flags[i]}")
      fi
    done
  fi
  [ -z "${P_FORMAT:-}" ] || [ -n "$swapped" ] || { echo "P_FORMAT: $variant quantizes no P (kv4_attn4 and kv4_p4 do)"; exit 2; }
  name=${BASE}_$variant${P_FORMAT:+_$P_FORMAT}
  python3 main.py "${common[@]}" --quant_config "${BASE}_config_llama" "${extra[@]}" \
    --search_result_dir "search_result/kv_cpu/$name" --output_path "$OUT/$name.json" 2>&1 \
    | grep "held-out perplexity" | sed "s/^/$name: /"
done
