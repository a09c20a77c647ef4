#!/usr/bin/env bash
# GPU machine: SmolLM2-135M's table rows (issue 5), JOBS rows at a time on the one GPU. A 135M model leaves the
# GPU mostly idle and lm-eval's per-request Python work is the bottleneck, so rows run as parallel processes;
# their calibration and evaluation seconds are then upper bounds (shared GPU and CPU): $OUT/run_wave<N>.json
# records the concurrency. Row results, logs and parameter files come back under $OUT.
# The first call of a machine carries .gpu_b, right after a call that carried .whl .gpu_a and installed the wheels
# (bench/gpu/perf.sh PART=setup); later calls on the warm machine carry nothing.
#   WAVE=1: full precision, plain lm-eval, MinMax FP, sequential calibration
#   WAVE=2: the paper's quantized rows and the NVFP4 / MXFP4 references
#   WAVE=3: FPQ_only_eval (wave 2's parameter file, kept on the warm machine) and the ablations
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_MININTERVAL=60
export OMP_NUM_THREADS=1 BATCH_SIZE=${BATCH_SIZE:-32} OUT PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
case "${WAVE:?set WAVE=1, 2 or 3}" in
  1) rows="full_precision plain_lm_eval MinMax_FP ablation_sequential" ;;
  2) rows="FPQ FPQ_baseline MinMax_INT SmoothQuant NVFP4 MXFP4" ;;
  3) rows="FPQ_only_eval ablation_bias_space ablation_calib128 ablation_W4A8 ablation_W8A8_E4M3 ablation_W4A4E8" ;;
esac
rows=${ROWS:-$rows}
source bench/gpu/join_smollm2.sh
python3 -c "from utils.models import gguf_to_folder, smollm2_gguf_path; from utils.task_data import build_task_data
print(gguf_to_folder(smollm2_gguf_path()), build_task_data())"
mkdir -p "$OUT/logs"
run_row() {
  if [ "$1" = FPQ_only_eval ]; then  # written (renamed into place) by the FPQ row of this or an earlier call
    until [ -f "search_result/FPQ_config_llama/W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt" ]; do sleep 5; done
  fi
  if [ "$1" = plain_lm_eval ]; then
    python3 bench/plain_lm_eval.py --batch_size "$BATCH_SIZE" --output "$OUT/plain_lm_eval.json"
  else
    bash "complete_scripts/SmolLM2-135M/$1.sh"
  fi > "$OUT/logs/$1.log" 2>&1
  echo "$1 exit $? at $(date +%T)"
}
export -f run_row
start=$(date +%s)
echo $rows | tr ' ' '\n' | timeout ${LIMIT_S:-560} xargs -P "${JOBS:-6}" -I{} bash -c 'run_row {}'
printf '{"wave": %s, "rows": "%s", "concurrent_processes": %s, "batch_size": %s, "seconds": %s, "device": "%s"}\n' \
  "$WAVE" "$rows" "${JOBS:-6}" "$BATCH_SIZE" "$(( $(date +%s) - start ))" \
  "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" > "$OUT/run_wave$WAVE.json"
tail -n 3 "$OUT"/logs/*.log
# one archive: parameter file names hold parentheses and the machine returns only a few files
tar -czf "$OUT/wave$WAVE.tar.gz" -C "$OUT" logs $(cd "$OUT" && ls *.json *.png 2>/dev/null) -C "$PWD" search_result
