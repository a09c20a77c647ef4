#!/usr/bin/env bash
# A first look at --sequential on CPU (small settings): FPQ W4A4E4 on the embedded SmolLM2 calibrated with 4 x 512
# C4-excerpt tokens, 1 round, 0.01 1.2 20, with and without --sequential; lambada_openai, first 200 documents.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=docs/results/SmolLM2-135M/sequential_probe_cpu
for mode in independent sequential; do
  flag=$([ $mode = sequential ] && echo --sequential || true)
  python3 main.py --tasks lambada_openai --limit 200 --device cpu --batch_size 16 \
    --quant_config FPQ_config_llama --qbits 4 4 4 2 2 2 --calib_size 4 --calib_seqlen 512 --search_round 1 \
    --search_intervals 0.01 1.2 20 $flag --search_result_dir /tmp/sequential_probe/$mode \
    --output_path $OUT/FPQ_$mode.json
done
python3 -m utils.report.compare $OUT/FPQ_independent.json $OUT/FPQ_sequential.json
