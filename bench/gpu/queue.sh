#!/usr/bin/env bash
# GPU machine: one session's work as one queue that runs by itself while the calls bring the data. The first call
# starts it; every later call carries one data folder, stages it, and prints where the queue is; the last collects.
# Steps run one after another (timings need a quiet GPU), each waiting for the data it reads:
#   benches    pytest -k cuda (FP8 and packed), bench/fp8_gemm.py, bench/packed_gemm.py --parts gemm   (no model)
#   qwen_bench Qwen2.5-Coder-1.5B: bench/fp8_eval_throughput.py, bench/packed_gemm.py --parts model,
#              bench/ct_real_check.py (or one of them: qwen_fp8, qwen_packed, qwen_ct)           (Qwen's GGUF)
#   calib7b    bench/calib_7b.py with the recipe CALIB_RECIPE (default the NVFP4 pick,
#              NVFP4_4over6_search_gptq_smooth_headsmooth_config_llama) at 8 and 32 LLaMA-7B-shaped layers, alone on
#              the GPU (a timing); each run writes issue 20's calib_7b_best_recipe_minutes (once 32 layers ran) and
#              the peak ratio (no model data: it can run while the calls stage the GGUFs); CALIB_LAYERS (default
#              "8 32") picks the layer counts
#   memtrace   bench/mem_trace.py --placement offload --layers 2 --calib_size 32 --quant_config CALIB_RECIPE: the
#              recipe's peak GPU memory per block and per search step at the 7B target's tokens (no model data)
#   stepcosts  bench/step_costs.py --shape llama7b: each step of the best recipe on LLaMA-7B's Linear shapes, per block
#              (where calib7b's minutes go; no model data)
#   stepmem    bench/step_memory.py --device cuda on down_proj and gate_proj: the line of each step of the best recipe
#              that holds its peak GPU memory (where memtrace's block peak sits, line by line; no model data)
#   probes     held-out perplexity only, SmolLM2: bench/gpu/recipe_probe.sh with RECIPES=$PROBE_RECIPES, FLAGS=$PROBE_FLAGS,
#              TAG=$PROBE_TAG (e.g. PROBE_FLAGS="--gptq_damping 0.1" PROBE_TAG=_damping0.1), PROBE_JOBS at once (default
#              all), into out/probes
#   rows       table rows: SmolLM2's SMOL_ROWS (JOBS_SMOL at once) beside Qwen's QWEN_ROWS (JOBS_QWEN) and Gemma3's
#              GEMMA_ROWS (JOBS_GEMMA) (bench/gpu/table_rows.sh, waves WAVE_SMOL, WAVE_QWEN, WAVE_GEMMA: numbers not
#              yet used in that model's docs/results folder, since run_wave<N>.json lands there); each model's rows
#              start once its data is there, a model without rows is skipped); with PROBE_RECIPES set, the probes
#              (as the step probes) follow SmolLM2's rows in the slots they free, beside the other models' rows
#              Keep JOBS_SMOL + JOBS_QWEN + JOBS_GEMMA at 6 or fewer: processes share the GPU by time slices, and
#              with 10 (5 + 2 + 3, 2026-12-06) SmolLM2's evaluations fell from about 250 to 45-55 requests a second and
#              no row finished in the session (bench/results/gpu_logs/queue_2026-12-06c_call_output.txt).
#              Memory on an 80 GB H100: a Qwen evaluation holds about 29 GiB and lm-eval's log_softmax asks up to
#              11.5 GiB more, a Gemma3 one about 13 GiB; JOBS_QWEN=2 beside JOBS_GEMMA=2 ran out of memory there
#              (bench/results/gpu_logs/queue_2026-12-07e.txt): keep JOBS_QWEN=1 beside Gemma3's rows on an H100.
# STEPS (default "benches qwen_bench rows") picks and orders them. Results under /tmp/scratch/queue/.
#   PART=start   (carry .whl, and .gpu_tf for Gemma3's rows): wheels, a frozen copy of this tree, the queue started in its own session
#   PART=stage   (carry one of .gpu_a .gpu_t .gpu_b .gpu_q00 .. .gpu_q22 .gpu_g00 .. .gpu_g05): stage it (SmolLM2
#                joins when .gpu_b comes, after .gpu_a; Qwen and Gemma3 when their last piece comes,
#                bench/gpu/model_transfer.sh), then the queue's status
#   PART=status  (no carry): the queue's status (keep a call in flight: the machine goes back after 30 s idle)
#   PART=wait    (no carry): WAIT_S seconds (default 120) of status calls' work, or less once the queue is done:
#                every 20 s the archive of PART=collect is rewritten (renamed into place), so a call cut off at the
#                device budget's end still brings back everything finished until then (the machine returns $OUT
#                of a killed call)
#   PART=collect (no carry): everything finished so far as $OUT/queue.tar.gz (parameter files over 4 MiB stay)
set -uo pipefail
S=/tmp/scratch Q=/tmp/scratch/queue
export PYTHONPATH=/tmp/site:$Q/repo PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_MININTERVAL=60
step() { echo "== $1 $(date +%T)"; shift; timeout "$@" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -60; }
wait_for() { until [ -f "$1" ]; do sleep 5; done; }
source "$(dirname "${BASH_SOURCE[0]}")/unpack_tasks.sh"
task_cache() { wait_for $S/tasks.tar.xz; unpack_tasks; }  # the tasks' data, once it came (bench/gpu/unpack_tasks.sh)
status() {
  echo "queue: $(cat $Q/current 2>/dev/null || echo 'not started')"
  tail -n 3 $Q/queue.log 2>/dev/null
  for log in $S/wave*/out/logs/*.log; do
    [ -f "$log" ] && echo "$(basename "$log"): $(tail -c 160 "$log" | tr '\r' '\n' | tail -1)"
  done
  true
}
collect() {  # everything finished so far (results, logs, parameter files up to 4 MiB) as $OUT/queue.tar.gz
  (cd $Q/repo && find search_result -type f ! -size +4194304c 2>/dev/null) > $Q/small_files
  # out/wave*.tar.gz (table_rows.sh's archives) left out: they repeat wave*/out and the small parameter files, and
  # with them the archive passed the 16 MiB a returned file may have (2026-12-07)
  tar --warning=no-file-changed --exclude='out/wave*.tar.gz' -czf $OUT/.queue.tar.gz -C $Q $(cd $Q && ls -d out *.log) \
    -C $S $(cd $S && ls -d wave*/out 2>/dev/null) -C $Q/repo -T $Q/small_files
  # tar's status 1: a file changed while it was read (a running row's log), the archive is still whole
  [ $? -le 1 ] && mv $OUT/.queue.tar.gz $OUT/queue.tar.gz
}
case "${PART:?set PART=start, stage, status, wait or collect}" in
start)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # Gemma3's rows only: transformers >= 5.23 (bench/gpu/make_carry.sh, .gpu_tf), carried beside .whl
  [ -d .gpu_tf ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_gemma3 .gpu_tf/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  rm -rf $Q && mkdir -p $Q/repo $Q/out
  tar --exclude='./.gpu_*' --exclude=./.whl --exclude=./.git -cf - . | tar -xf - -C $Q/repo
  # the whole subshell redirected: a background `cd && cmd > log &` would keep the call's stdout open
  (cd $Q/repo && PART=run exec setsid bash bench/gpu/queue.sh) > $Q/queue.log 2>&1 < /dev/null &
  sleep 2; status
  ;;
stage)
  mkdir -p $S
  for file in .gpu_a/* .gpu_t/*; do  # renamed into place: a waiting step never reads a half-copied file
    [ -f "$file" ] && cp "$file" "$S/.$(basename "$file")" && mv "$S/.$(basename "$file")" "$S/$(basename "$file")"
  done
  [ -d .gpu_b ] && (source bench/gpu/join_smollm2.sh && touch $S/smollm2.ok)
  bash bench/gpu/model_transfer.sh
  status
  ;;
status)
  status
  ;;
wait)
  deadline=$(( $(date +%s) + ${WAIT_S:-120} ))
  while true; do
    finished=$(grep -c '^done' $Q/current 2>/dev/null)  # read before the last collect: it holds everything
    collect
    { [ "$finished" = 1 ] || [ $(( $(date +%s) + 20 )) -ge "$deadline" ]; } && break
    sleep 20
  done
  status
  ;;
collect)
  status
  collect
  ;;
run)  # the queue itself (started by PART=start, in its own session, in the frozen copy)
  export BENCH_RESULTS=$Q/out
  probes() {
    wait_for $S/smollm2.ok
    mkdir -p $Q/out/probes
    step probes 1800 env RECIPES="${PROBE_RECIPES:?name PROBE_RECIPES}" FLAGS="${PROBE_FLAGS:-}" TAG="${PROBE_TAG:-}" \
      JOBS="${PROBE_JOBS:-999}" OUT=$Q/out/probes LIMIT_S=1700 bash bench/gpu/recipe_probe.sh
  }
  recipe=${CALIB_RECIPE:-NVFP4_4over6_search_gptq_smooth_headsmooth_config_llama}  # calib7b's and memtrace's
  for name in ${STEPS:-benches qwen_bench rows}; do
    echo "$name since $(date +%T)" > $Q/current
    case $name in
    benches)
      step pytest_cuda 600 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_linear.py tests/test_gptq.py \
        tests/test_packed_linear.py -k cuda -rs | tee $Q/out/pytest_cuda.txt
      step fp8_gemm 300 python3 bench/fp8_gemm.py
      step packed_gemm 420 python3 bench/packed_gemm.py --parts gemm
      ;;
    calib7b)
      # each run rewrites the target files from every run file so far (the minutes only once 32 layers ran)
      for layers in ${CALIB_LAYERS:-8 32}; do
        step calib_7b_L$layers 3600 python3 bench/calib_7b.py --quant_config $recipe --layers $layers
      done
      ;;
    memtrace)
      step mem_trace 900 env OUT=$Q/out python3 bench/mem_trace.py --placement offload --layers 2 --calib_size 32 \
        --quant_config $recipe
      ;;
    stepcosts)
      step step_costs 900 python3 bench/step_costs.py --shape llama7b --device cuda
      ;;
    stepmem)
      for linear in down_proj gate_proj; do
        step step_memory_$linear 900 env OUT=$Q/out python3 bench/step_memory.py --device cuda --linear $linear
      done
      ;;
    qwen_bench | qwen_fp8 | qwen_packed | qwen_ct)  # qwen_bench: all three
      wait_for $S/qwen.ok
      task_cache
      export LLM_FP4_CACHE=$S/cache
      case $name in qwen_bench | qwen_fp8)
        step fp8_eval_throughput 420 python3 bench/fp8_eval_throughput.py --model $S/qwen.gguf ;; esac
      case $name in qwen_bench | qwen_packed)
        step packed_model 420 python3 bench/packed_gemm.py --parts model --model_args pretrained=$S/qwen.gguf ;; esac
      case $name in qwen_bench | qwen_ct)
        step ct_real_check 420 python3 bench/ct_real_check.py --model $S/qwen.gguf ;; esac
      ;;
    probes)
      probes
      ;;
    rows)
      rows() {  # $1 model, $2 the file its data waits on, $3 wave, $4 rows, $5 jobs
        [ -n "$4" ] || return 0
        [ -n "$3" ] || { echo "$1 has rows but no wave number (WAVE_SMOL, WAVE_QWEN, WAVE_GEMMA)"; return 1; }
        wait_for "$2"
        [ "$1" = SmolLM2-135M ] || task_cache
        MODEL=$1 WAVE=$3 ROWS="$4" JOBS=$5 LIMIT_S=7200 OUT=$Q/out bash bench/gpu/table_rows.sh > $Q/rows_$1.log 2>&1
      }
      { rows SmolLM2-135M $S/smollm2.ok "${WAVE_SMOL:-}" "${SMOL_ROWS:-}" ${JOBS_SMOL:-4}
        [ -z "${PROBE_RECIPES:-}" ] || probes; } &
      rows Qwen2.5-Coder-1.5B $S/qwen.ok "${WAVE_QWEN:-}" "${QWEN_ROWS:-}" ${JOBS_QWEN:-2} &
      rows Gemma3-270M $S/gemma3.ok "${WAVE_GEMMA:-}" "${GEMMA_ROWS:-}" ${JOBS_GEMMA:-4} &
      wait
      ;;
    *) echo "unknown step $name" ;;
    esac
  done
  echo "done $(date +%T)" > $Q/current
  ;;
esac
