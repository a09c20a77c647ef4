#!/usr/bin/env bash
# GPU machine: a model's table rows (issue 5), JOBS rows at a time, dealt round-robin to the machine's GPUs in
# row order (one GPU each: a row's script then loads the model on that GPU). A small model leaves the GPU
# mostly idle and lm-eval's per-request Python work is the bottleneck, so rows run as parallel processes; their
# calibration and evaluation seconds are then upper bounds (shared GPU and CPU): run_wave<N>.json records the
# concurrency. A wave may outlast one call: the first call starts the rows in their own process session
# (setsid: they outlive the call while the machine stays warm) and waits up to LIMIT_S; the same command
# again waits for the same rows instead of starting them anew. Every call returns what has finished (row
# results, logs, parameter files) as one archive, $OUT/wave<N>.tar.gz once the wave is complete and
# $OUT/wave<N>.partial.tar.gz before: the machine returns only a few files and drops names with parentheses.
#   MODEL=SmolLM2-135M (default): the first call of a machine carries .gpu_b, right after a call that carried
#     .whl .gpu_a and installed the wheels (bench/gpu/perf.sh PART=setup); later calls carry nothing.
#   MODEL=Qwen2.5-Coder-1.5B or Gemma3-270M: after a call carrying .whl .gpu_t (PART=setup_qwen) and the calls of
#     bench/gpu/model_transfer.sh that join /tmp/scratch/qwen.gguf or gemma3.gguf; carry nothing.
#   WAVE=1: full precision, plain lm-eval, MinMax FP, sequential calibration
#   WAVE=2: the paper's quantized rows and the NVFP4 / MXFP4 references
#   WAVE=3: FPQ_only_eval (wave 2's parameter file, kept on the warm machine) and the ablations
#   WAVE=4: the slow ablation (4x the candidates)
#   ROWS="a b" replaces the wave's rows (WAVE then only names the wave's folder and archive, any number).
#   ROW_GPUS="0" deals the rows to these GPUs only (default: every GPU), e.g. while a benchmark has another.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_MININTERVAL=60
MODEL=${MODEL:-SmolLM2-135M}
# Gemma3's 262,144-token vocabulary: at 32, boolq's longest batch asked 76 GiB for the head's logits (2026-12-07)
[ "$MODEL" = Gemma3-270M ] && default_batch=8 || default_batch=32
export OMP_NUM_THREADS=1 BATCH_SIZE=${BATCH_SIZE:-$default_batch} OUT PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
case "${WAVE:?set WAVE=1 to 4, or any number with ROWS}" in
  1) rows="full_precision plain_lm_eval MinMax_FP ablation_sequential" ;;
  2) rows="FPQ FPQ_baseline MinMax_INT SmoothQuant NVFP4 MXFP4" ;;
  3) rows="FPQ_only_eval ablation_bias_space ablation_calib128 ablation_W4A8 ablation_W8A8_E4M3 ablation_W4A4E8" ;;
  4) rows="ablation_candidates400" ;;
  *) [ -n "${ROWS:-}" ] || { echo "WAVE=$WAVE has no rows of its own: set ROWS"; exit 2; } ;;
esac
rows=${ROWS:-$rows}
if [ "$MODEL" = SmolLM2-135M ]; then
  source bench/gpu/join_smollm2.sh
  gguf=$LLM_FP4_SMOLLM2_GGUF
else  # Qwen2.5-Coder-1.5B or Gemma3-270M: joined by the bench/gpu/model_transfer.sh calls
  case $MODEL in Qwen2.5-Coder-1.5B) gguf=/tmp/scratch/qwen.gguf ;; Gemma3-270M) gguf=/tmp/scratch/gemma3.gguf ;;
    *) echo "MODEL=$MODEL: SmolLM2-135M, Qwen2.5-Coder-1.5B or Gemma3-270M"; exit 2 ;; esac
  [ -f "${gguf%.gguf}.ok" ] || { echo "no checked $gguf: run the bench/gpu/model_transfer.sh calls first"; exit 1; }
  export LLM_FP4_CACHE=/tmp/scratch/cache MODEL_ADDR=$gguf
  if [ "$MODEL" = Gemma3-270M ]; then  # transformers >= 5.23 (bench/gpu/make_carry.sh, .gpu_tf)
    [ -d /tmp/site_gemma3 ] || { echo "no /tmp/site_gemma3: carry .gpu_tf beside .whl in queue.sh's start call"; exit 1; }
    export PYTHONPATH=/tmp/site_gemma3:$PYTHONPATH
  fi
fi
export MODEL gguf
W=/tmp/scratch/wave$WAVE
RESULTS=$OUT  # what this call returns; the rows write into $W/out, which outlives the call
ROW_GPUS=${ROW_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -o '^GPU [0-9]*' | cut -d' ' -f2 | tr '\n' ' ')}
ROW_GPUS=${ROW_GPUS:-0}
GPUS=$(echo $ROW_GPUS | wc -w)
export GPUS ROW_GPUS
run_row() {  # $1: the row's place in the wave, $2: the row
  local gpus=($ROW_GPUS)
  export CUDA_VISIBLE_DEVICES=${gpus[$(( $1 % GPUS ))]}
  shift
  if grep -q -- "--only_eval" "complete_scripts/$MODEL/$1.sh" 2>/dev/null; then  # FPQ_only_eval, FPQ_fp8: the
    # file it reads, written (renamed into place) by this or an earlier FPQ row
    params=$(grep -o '\./search_result/[^"]*\.pt' "complete_scripts/$MODEL/$1.sh")
    until [ -f "$params" ]; do sleep 5; done
  fi
  if [ "$1" = plain_lm_eval ]; then
    python3 bench/plain_lm_eval.py --model "$gguf" --batch_size "$BATCH_SIZE" --output "$OUT/plain_lm_eval.json"
  else
    bash "complete_scripts/$MODEL/$1.sh"
  fi > "$OUT/logs/$1.log" 2>&1
  echo "$1 exit $? at $(date +%T) on GPU $CUDA_VISIBLE_DEVICES"
}
export -f run_row
if [ ! -f "$W/started" ]; then
  python3 -c "import sys; from pathlib import Path; from utils.data.models import gguf_to_folder
from utils.data.task_data import build_task_data; print(gguf_to_folder(Path(sys.argv[1])), build_task_data())" "$gguf"
  mkdir -p "$W/out/logs" && date +%s > "$W/started"
  OUT=$W/out setsid bash -c "echo $rows | tr ' ' '\n' | nl -v0 -w1 -s' ' | xargs -P ${JOBS:-6} -I{} bash -c 'run_row {}'; date +%s > $W/finished" \
    > "$W/rows.log" 2>&1 < /dev/null &
else
  echo "wave $WAVE already started $(( $(date +%s) - $(cat "$W/started") )) s ago: waiting for it"
fi
deadline=$(( $(date +%s) + ${LIMIT_S:-560} ))
until [ -f "$W/finished" ] || [ "$(date +%s)" -ge "$deadline" ]; do sleep 10; done
cat "$W/rows.log"
if [ -f "$W/finished" ]; then
  printf '{"model": "%s", "wave": %s, "rows": "%s", "concurrent_processes": %s, "gpus": %s, "batch_size": %s, "seconds": %s, "device": "%s", "code_fingerprint": "%s"}\n' \
    "$MODEL" "$WAVE" "$rows" "${JOBS:-6}" "$GPUS" "$BATCH_SIZE" "$(( $(cat "$W/finished") - $(cat "$W/started") ))" \
    "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
    "$(python3 -c 'from utils.run.fileio import code_fingerprint; print(code_fingerprint())')" > "$W/out/run_wave$WAVE.json"
  archive=wave$WAVE.tar.gz
else
  echo "wave $WAVE still running: run the same command again while the machine is warm"
  archive=wave$WAVE.partial.tar.gz
fi
tail -n 3 "$W"/out/logs/*.log
# one archive: parameter file names hold parentheses and the machine returns only a few files, 16 MiB each at
# most, so parameter files over 4 MiB (Qwen's are 16 MB) stay on the machine and are named here
find search_result -type f -size +4194304c -printf 'left on the machine: %p (%s bytes)\n'
find search_result -type f ! -size +4194304c > "$W/small_files"
tar -czf "$RESULTS/$archive" -C "$W/out" . -C "$PWD" -T "$W/small_files"
