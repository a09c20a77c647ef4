#!/usr/bin/env bash
# Do issue 19's block-format fixes (MX shared exponent from the float's bits, zero NVFP4 block scales, E8M0 down to
# 2^-127) change the NVFP4 / MXFP4 rows? The same CPU command by the code before them (OLD, a checkout of bfa06a6:
# git archive bfa06a6 | (mkdir -p .gpu_old && tar -x -C .gpu_old)) and by this tree, on the embedded SmolLM2:
# held-out perplexity of 4 x 512 tokens, round to nearest (the rows' own configs). Prints one line per row and code.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$(cd "${OLD:-.gpu_old}" && pwd)
OUT=$PWD/docs/results/SmolLM2-135M/block_fix_rows_cpu
mkdir -p $OUT
for row in NVFP4 MXFP4; do
  for code in old new; do
    src=$PWD; [ $code = old ] && src=$OLD
    (cd "$src" && MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2 python3 main.py --tasks piqa --limit 1 --device cpu \
       --batch_size 8 --calib_size 1 --calib_seqlen 256 --heldout_ppl 4 --quant_config ${row}_config_llama \
       --search_result_dir /tmp/block_fix_rows/$code --output_path $OUT/${row}_$code.json 2>&1 \
       | grep "held-out perplexity" | sed "s/^/$row $code: /")
  done
done
