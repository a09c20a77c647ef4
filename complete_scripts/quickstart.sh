#!/usr/bin/env bash
# Quickstart on CPU: FPQ W4A4 calibration of the embedded SmolLM2-135M-Instruct (a small calibration set),
# then full precision and FPQ evaluated on the first documents of four tasks, side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=piqa,arc_easy,hellaswag,lambada_openai
LIMIT=${LIMIT:-50}
OUT=results/quickstart
start=$(date +%s)
python3 main.py --tasks $TASKS --device cpu --batch_size 8 --limit "$LIMIT" --output_path $OUT/full_precision.json
python3 main.py --tasks $TASKS --device cpu --batch_size 8 --limit "$LIMIT" \
  --quant_config FPQ_config_llama --qbits 4 4 4 2 2 2 \
  --calib_size 2 --calib_seqlen 512 --search_round 1 --search_intervals 0.3 1.2 9 \
  --output_path $OUT/FPQ_W4A4E4.json
python3 -m utils.report.compare $OUT/full_precision.json $OUT/FPQ_W4A4E4.json
seconds=$(( $(date +%s) - start ))
printf '{"quickstart_seconds": %d, "machine": "%s CPU cores"}\n' "$seconds" "$(nproc)" > $OUT/time.json
echo "quickstart took ${seconds} s on $(nproc) CPU cores"
