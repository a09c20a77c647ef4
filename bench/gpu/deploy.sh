#!/usr/bin/env bash
# GPU machine, issue 21 (real FP4): the CUDA tests and benchmarks of FP8 and packed execution, each part started in
# its own process session (setsid, results in /tmp/scratch/<part>) so the call returns while it runs; timings
# need a quiet GPU, so start table rows only after the parts that time.
#   PART=quiet (carry .whl; without it, no install): wheels (lm-eval's and pytest, compressed-tensors with theirs), then in the background:
#        the CUDA tests of tests/test_fp8_linear.py, test_packed_linear.py and the kernel check, bench/fp8_gemm.py,
#        bench/packed_gemm.py --parts gemm (STEPS: a subset of pytest kernel_check fp8_gemm packed_gemm; default
#        without kernel_check, which session.sh PART=smol runs and which takes over 200 s on an H100)
#   PART=qwen (no carry; after the 21 calls of bench/gpu/qwen_transfer.sh): in the background on Qwen2.5-Coder-1.5B,
#        bench/fp8_eval_throughput.py (a quick FPQ search: timing), bench/packed_gemm.py --parts model (NVFP4),
#        then bench/ct_real_check.py (the compressed-tensors export loaded by transformers, against the simulation)
#   PART=wait BG=quiet|qwen (no carry): wait up to LIMIT_S for it, print its log, return $OUT/<BG>.tar.gz
set -uo pipefail
S=/tmp/scratch
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_MININTERVAL=60
step() { echo "== $1 $(date +%T)"; shift; timeout "$@" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -60; }
start() {  # $1: part; runs PART=<part>_background in its own session
  rm -rf $S/$1 && mkdir -p $S/$1/tree && tar --exclude='./.gpu_*' --exclude=./.whl --exclude=./.git -cf - . | tar -xf - -C $S/$1/tree
  # the whole subshell redirected: a background `cd && cmd > log &` keeps the caller's stdout open until cmd ends
  (cd $S/$1/tree && OUT=$S/$1 PART=$1_background exec setsid bash bench/gpu/deploy.sh) > $S/$1/background.log 2>&1 \
    < /dev/null &
}
case "${PART:?set PART=quiet, qwen or wait}" in
quiet)
  [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  start quiet
  ;;
quiet_background)  # STEPS: which of them (default all)
  export BENCH_RESULTS=$OUT
  wanted() { [[ " ${STEPS:-pytest fp8_gemm packed_gemm} " == *" $1 "* ]]; }
  wanted pytest && step pytest_cuda 400 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_linear.py tests/test_packed_linear.py \
    -k "cuda" -rs | tee $OUT/pytest_cuda.txt
  wanted kernel_check && step kernel_check 600 python3 tests/kernel_check.py cuda | tee $OUT/kernel_check_cuda.txt
  wanted fp8_gemm && step fp8_gemm 300 python3 bench/fp8_gemm.py
  wanted packed_gemm && step packed_gemm 300 python3 bench/packed_gemm.py --parts gemm
  date > $OUT/done
  ;;
qwen)
  [ -f $S/qwen.gguf ] || { echo "no $S/qwen.gguf: run the bench/gpu/qwen_transfer.sh calls first"; exit 1; }
  start qwen
  ;;
qwen_background)
  export BENCH_RESULTS=$OUT LLM_FP4_CACHE=$S/cache
  if [ ! -d $S/cache/tasks ]; then  # the task data and the exllamav2 wheel staged from .gpu_t (session.sh PART=stage)
    mkdir -p $S/cache/wheels && tar -C $S/cache -xJf $S/tasks.tar.xz && cp $S/exllamav2-*.whl $S/cache/wheels/
  fi
  step fp8_eval_throughput 420 python3 bench/fp8_eval_throughput.py --model $S/qwen.gguf
  step packed_model_nvfp4 420 python3 bench/packed_gemm.py --parts model --model_args pretrained=$S/qwen.gguf
  step ct_real_check 420 python3 bench/ct_real_check.py --model $S/qwen.gguf
  date > $OUT/done
  ;;
wait)
  deadline=$(( $(date +%s) + ${LIMIT_S:-540} ))
  until [ -f $S/${BG:?set BG=quiet or qwen}/done ] || [ "$(date +%s)" -ge $deadline ]; do sleep 5; done
  [ -f $S/$BG/done ] || echo "$BG still running"
  cat $S/$BG/background.log
  tar -czf $OUT/$BG.tar.gz --exclude=./tree -C $S/$BG .
  ;;
esac
