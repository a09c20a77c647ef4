#!/usr/bin/env bash
# CPU probe of the rotations (issue 20's `rot` component and its alternatives) on the embedded SmolLM2-135M at small
# scale, judged on held-out perplexity only (bench/cpu_probe_settings.sh: 8 x 512 tokens of exllamav2's Wikipedia
# excerpt; piqa's first 20 documents ride along and are not read). Not comparable with the GPU rows.
# Variants (bench/rotation_variants.py): none, rot (QuaRot: full-width Hadamard of the residual stream + online
# Hadamard before down_proj), rotnoonline (without the online one), rot16/32/64 (block-diagonal residual and
# down_proj Hadamards of that size), had16/32/64 (BlockHadamard: an online block Hadamard before every Linear),
# rot_ohad64 (rot, then an online Hadamard of 64-channel blocks of o_proj's input only: the recipes' ohad32 at 64).
# RUNS lists "<base>:<variant>:<bits>" (base: a config or recipe without _config_llama; bits W4A4, W4 = weights only,
# A4 = activations only); the default is what the committed note reports, in the order it ran (about 5 to 12 min a
# run on the shared 2-core CPU; the NVFP4_gptq row without rotation is recipes_heldout_cpu/NVFP4_gptq.json, the same
# command). The other variants (NVFP4_gptq:rot, rotnoonline, rot16/32/64, had32/64 on NVFP4, had16/64 on MXFP4,
# MXFP4_gptq, W4, A4) run
# with RUNS, e.g. RUNS="MXFP4_gptq:had32:W4A4 NVFP4:rot:W4". One results JSON per
# run in docs/results/SmolLM2-135M/rotation_probe_cpu/<base>.<variant>.<bits>.json.
set -euo pipefail
source "$(dirname "$0")/cpu_probe_settings.sh"
OUT=docs/results/SmolLM2-135M/rotation_probe_cpu
mkdir -p $OUT
declare -A QBITS=([W4A4]="4 4 4 2 2 2" [W4]="4 16 16 2 2 2" [A4]="16 4 16 2 2 2")
for run in ${RUNS:-NVFP4:none:W4A4 NVFP4:rot:W4A4 NVFP4:had16:W4A4 MXFP4:none:W4A4 MXFP4:had32:W4A4 MXFP4:rot:W4A4}; do
  IFS=: read -r base variant bits <<< "$run"
  python3 bench/rotation_variants.py "${common[@]}" --quant_config "${base}_config_llama~$variant" \
    --qbits ${QBITS[$bits]} --search_result_dir "search_result/rotation_cpu/$bits" \
    --output_path "$OUT/$base.$variant.$bits.json" 2>&1 | grep "held-out perplexity" | sed "s/^/$run: /"
done
