#!/usr/bin/env bash
# GPU machine, call 2 of 2: join the SmolLM2 GGUF, unpack the task data, then run the SmolLM2 rows in the paper's
# command shape with the paper's full search settings (32 x 1024 calibration tokens, 3 rounds, 0.01 1.2 100) and
# an --only_eval rerun of the FPQ file. ROWS (default: all) and TASKS (default piqa) select the work.
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
source bench/gpu/join_smollm2.sh
export TASKS=${TASKS:-piqa} DEVICE=cuda OUT=$OUT
for row in ${ROWS:-full_precision MinMax_INT MinMax_FP FPQ_baseline FPQ FPQ_only_eval}; do
  echo "== $row $(date +%T)"
  bash complete_scripts/SmolLM2-135M/$row.sh 2>&1 | grep -v "it/s\]\|s/it\]" | tee -a $OUT/log.txt | tail -12
done
cp search_result/FPQ_config_llama/*.pt $OUT/ 2>/dev/null || true
