#!/usr/bin/env bash
# GPU machine, call 2 of 2: join the SmolLM2 GGUF, unpack the task data, then run the SmolLM2 rows in the paper's
# command shape with the paper's full search settings (32 x 1024 calibration tokens, 3 rounds, 0.01 1.2 100) and
# an --only_eval rerun of the FPQ file. ROWS (default: all) and TASKS (default piqa) select the work.
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
S=/tmp/scratch
if [ ! -f $S/smollm2.gguf ]; then
  cat $S/gguf.part1 .gpu_b/gguf.part2 > $S/smollm2.gguf
  echo "$(cat .gpu_b/gguf.sha256)  $S/smollm2.gguf" | sha256sum -c -
  mkdir -p $S/cache && tar -C $S/cache -xJf .gpu_b/tasks.tar.xz
  mkdir -p $S/cache/wheels && cp .gpu_b/exllamav2-*.whl $S/cache/wheels/
fi
export LLM_FP4_SMOLLM2_GGUF=$S/smollm2.gguf LLM_FP4_CACHE=$S/cache
export TASKS=${TASKS:-piqa} DEVICE=cuda OUT=$OUT
for row in ${ROWS:-full_precision MinMax_INT MinMax_FP FPQ_baseline FPQ FPQ_only_eval}; do
  echo "== $row $(date +%T)"
  bash complete_scripts/SmolLM2-135M/$row.sh 2>&1 | grep -v "it/s\]\|s/it\]" | tee -a $OUT/log.txt | tail -12
done
cp search_result/FPQ_config_llama/*.pt $OUT/ 2>/dev/null || true
