#!/usr/bin/env bash
# GPU machine: the performance benchmarks (bench/*.py), in parts that fit one call each while the machine
# stays warm. Results go to $OUT (BENCH_RESULTS); copy them into bench/results/ afterwards.
#   PART=setup (carry .whl .gpu_a): wheels and the first GGUF piece only (then bench/gpu/table_rows.sh)
#   PART=setup_qwen (carry .whl .gpu_t): wheels, task data and calibration text for Qwen's table, then the
#                               23 calls of bench/gpu/model_transfer.sh (carry folders: bench/gpu/make_carry.sh)
#   PART=1 (carry .whl .gpu_a): wheels, first GGUF piece, kernel check on CUDA, kernel bandwidth,
#                               8-layer 7B-shape calibration, a profile of one block's search
#   PART=2 (no carry):          32-layer 7B-shape calibration
#   PART=3 (carry .whl .gpu_a): wheels, first GGUF piece, original-vs-ours on one Linear of each shape
#   PART=3r (no carry):         the 32-layer 7B shape with --weight_refine 8 --act_coarse_tokens 1024 (into
#                               $OUT/cheaper_steps; original-vs-ours times these flags in PART=3 and PART=fast)
#   PART=4 (carry .gpu_b):      join the SmolLM2 GGUF, evaluation throughput (right after PART=3: warm machine)
#   PART=5 (no carry):          calibration scaling
#   PART=multi8 / multi32:      (several GPUs) calibration split over the GPUs, time and per-GPU peak memory
#   PART=pair32 (4 GPUs):       at once, the 32-layer shape split over GPUs 0,1 and on GPU 2 alone
#   PART=multi32 on 4 GPUs:     the 32-layer shape split over all four
#   PART=x4 (4 GPUs, no carry): multi32, then pair32 with the kernel check and bandwidth on GPU 3 beside it
#   PART=x2 (2 GPUs, carry .whl .gpu_t): setup_qwen, then in the background (setsid, results in $S/x2) while
#                               Qwen's pieces arrive: original-vs-ours alone on GPU 0; on GPU 1 the kernel check
#                               and Qwen-shaped memory traces at 32 and 128 sequences (timings that need a quiet
#                               GPU, as PART=5, go before or after table rows, never beside them)
#   PART=fast (one GPU: GPU $PERF_GPU, default 1; no carry; torch, triton and transformers only): in the
#                               background (setsid, results in $S/fast), e.g. while table rows run on the other GPU:
#                               the kernel check on CUDA, original-vs-ours with every configuration of
#                               bench/original_search.py --ours ($REPEATS runs, default 3), a block profile with
#                               --weight_refine 8 --coarse_tokens 1024 --act_refine 2, and the 8-layer 7B shape with
#                               the defaults and with those cheaper steps (into $OUT/defaults, $OUT/cheaper_steps)
#   PART=wait BG=x2|fast:       wait for that background run, return its results as $OUT/$BG.tar.gz
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BENCH_RESULTS=$OUT TQDM_MININTERVAL=30
S=/tmp/scratch
step() { echo "== $1 $(date +%T)"; shift; timeout "$@" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -40; }
install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}
setup() {
  install_wheels
  mkdir -p $S && cp .gpu_a/gguf.part1 $S/
}
case "${PART:?set PART=setup, setup_qwen, 1 to 5, 3r, multi8, multi32, pair32, x4, x2, fast or wait}" in
setup)
  setup
  ;;
setup_qwen)
  install_wheels
  mkdir -p $S && cp .gpu_t/* $S/ && source bench/gpu/unpack_tasks.sh && unpack_tasks
  ;;
1)
  setup
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  step kernel_check 90 python3 tests/kernel_check.py cuda | tee $OUT/kernel_check_cuda.txt
  step kernel_bandwidth 90 python3 bench/kernel_bandwidth.py
  step calib_7b_8_layers 200 python3 bench/calib_7b.py --layers 8
  step profile_block 120 python3 bench/profile_block.py | tee $OUT/profile_block.txt
  ;;
2)
  step calib_7b_32_layers 590 python3 bench/calib_7b.py --layers 32
  ;;
3)
  setup
  step original_search 590 python3 bench/original_search.py --linears q_proj gate_proj down_proj
  ;;
3r)
  mkdir -p $OUT/cheaper_steps
  ( export BENCH_RESULTS=$OUT/cheaper_steps
    step calib_7b_cheaper 590 python3 bench/calib_7b.py --layers 32 --weight_refine 8 --coarse_tokens 1024 )
  ;;
4)
  source bench/gpu/join_smollm2.sh
  step eval_throughput 560 python3 bench/eval_throughput.py \
    --param_file "docs/results/SmolLM2-135M/gpu_piqa/FPQ_config_llama_W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt"
  ;;
5)
  step calib_scaling 300 python3 bench/calib_scaling.py --sizes 8 16 32 64 --candidates 25 50 100 200
  ;;
multi8)   # issue 8, on nvidia-h100-x2 or larger: split vs one GPU, 8 layers
  step multi_gpu_compare 590 python3 bench/multi_gpu.py --layers 8 --compare
  ;;
multi32)  # issue 8: the 32-layer 7B shape split over every GPU
  step multi_gpu_32 590 python3 bench/multi_gpu.py --layers 32
  ;;
pair32)   # issue 8, on nvidia-h100-x4 or larger: two GPUs against one, side by side on one machine
  CUDA_VISIBLE_DEVICES=0,1 timeout 590 python3 bench/multi_gpu.py --layers 32 > $S.pair.log 2>&1 &
  CUDA_VISIBLE_DEVICES=2 timeout 590 python3 bench/multi_gpu.py --layers 32 > $S.single.log 2>&1
  wait
  grep -v "block/s" $S.pair.log | tail -3; grep -v "block/s" $S.single.log | tail -3
  ;;
x4)       # issue 8 and 6 in one background run (setsid, OUT on /tmp/scratch) while Qwen's pieces arrive
  PART=multi32 bash bench/gpu/perf.sh
  ( export CUDA_VISIBLE_DEVICES=3,0  # the check's second-GPU case uses cuda:1 (GPU 0): correctness only
    step kernel_check 180 python3 tests/kernel_check.py cuda | tee $OUT/kernel_check_cuda.txt
    CUDA_VISIBLE_DEVICES=3 step kernel_bandwidth 240 python3 bench/kernel_bandwidth.py ) > $S/kernel.log 2>&1 &
  PART=pair32 bash bench/gpu/perf.sh
  wait
  cp $S/kernel.log $S.pair.log $S.single.log $OUT/
  ;;
x2)
  PART=setup_qwen bash bench/gpu/perf.sh
  mkdir -p $S/x2 && rm -f $S/x2/done
  OUT=$S/x2 PART=x2_background setsid bash bench/gpu/perf.sh > $S/x2/background.log 2>&1 < /dev/null &
  ;;
x2_background)
  ( CUDA_VISIBLE_DEVICES=0 step original_search 420 python3 bench/original_search.py \
      --linears q_proj gate_proj down_proj ) > $OUT/gpu0.log 2>&1 &
  ( export CUDA_VISIBLE_DEVICES=1
    step kernel_check 180 python3 tests/kernel_check.py cuda | tee $OUT/kernel_check_cuda.txt
    for size in 32 128; do
      step mem_trace_$size 240 python3 bench/mem_trace.py --placement single --shape qwen1.5b --layers 4 \
        --calib_size $size
    done
  ) > $OUT/gpu1.log 2>&1
  wait
  date > $OUT/done
  ;;
fast)
  mkdir -p $S/fast && rm -f $S/fast/done
  OUT=$S/fast PART=fast_background setsid bash bench/gpu/perf.sh > $S/fast/background.log 2>&1 < /dev/null &
  ;;
fast_background)
  export CUDA_VISIBLE_DEVICES=${PERF_GPU:-1}
  step kernel_check 180 python3 tests/kernel_check.py cuda | tee $OUT/kernel_check_cuda.txt
  step original_search 900 python3 bench/original_search.py --linears q_proj gate_proj down_proj --repeats ${REPEATS:-3}
  step profile_block_fast 200 python3 bench/profile_block.py --weight_refine 8 --coarse_tokens 1024 --act_refine 2 \
    | tee $OUT/profile_block_refine8_coarse1024_act2.txt
  mkdir -p $OUT/defaults $OUT/cheaper_steps  # 8-layer runs side by side (their summaries are not the 32-layer files)
  ( export BENCH_RESULTS=$OUT/defaults; step calib_7b_8_layers 200 python3 bench/calib_7b.py --layers 8 )
  ( export BENCH_RESULTS=$OUT/cheaper_steps
    step calib_7b_cheaper 200 python3 bench/calib_7b.py --layers 8 --weight_refine 8 --coarse_tokens 1024 --act_refine 2 )
  date > $OUT/done
  ;;
wait)
  until [ -f $S/${BG:?set BG=x2 or fast}/done ]; do sleep 5; done
  cat $S/$BG/*.log
  tar -czf $OUT/$BG.tar.gz -C $S/$BG .
  ;;
esac
