#!/usr/bin/env bash
# Issue 19's GPU acceptance: FPQ calibration of SmolLM2-135M and Qwen2.5-Coder-1.5B with the paper's settings by
# the code before the reshape (OLD, a checkout of bfa06a6) and after it (this tree), each evaluated the same way
# (same tasks, --limit, batch size 32 as the committed rows): identical parameter tensors, identical metrics and
# identical held-out perplexity. Writes $OUT/<model>/reshape_check/{old,new}.json and their parameter files and
# prints one line per model; exits 1 on any difference.
#
# Here, before the call:  git archive bfa06a6 | (mkdir -p .gpu_old && tar -x -C .gpu_old)   (ignored, ~1 MiB)
# plus the usual carried folders (bench/gpu/make_carry.sh). On the GPU machine, after join_smollm2.sh (SmolLM2)
# and the bench/gpu/model_transfer.sh calls (Qwen):  OLD=.gpu_old MODELS=SmolLM2-135M bash bench/gpu/reshape_check.sh
# Smaller values make a plumbing check on the CPU, e.g. DEVICE=cpu MODELS=SmolLM2-135M TASKS=piqa
# EVAL="--limit 2 --heldout_ppl 1" SETTINGS="--calib_size 1 --calib_seqlen 64 --search_round 1 --search_intervals 0.5 1.2 4"
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD=$(cd "${OLD:-.gpu_old}" && pwd)
OUT=${OUT:-docs/results}
DEVICE=${DEVICE:-cuda}
QWEN=${QWEN:-/tmp/scratch/qwen.gguf}
[ -f "$OLD/main.py" ] || { echo "error: no checkout of the old code in $OLD (see the header)" >&2; exit 2; }
read -r -a RUN <<< "--no_cache --num_fewshot 0 --quant_config FPQ_config_llama --qbits 4 4 4 2 2 2 \
${SETTINGS:---calib_size 32 --search_round 3 --search_intervals 0.01 1.2 100} ${EVAL:---heldout_ppl 16 --limit 300}"
TASKS=${TASKS:-arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande,lambada_openai}
status=0
for model in ${MODELS:-SmolLM2-135M Qwen2.5-Coder-1.5B}; do
  args=(--model_args use_accelerate=True)  # as complete_scripts/<model>/env.sh
  [ "$model" = Qwen2.5-Coder-1.5B ] && args=(--model_args "pretrained=$QWEN,use_accelerate=True")
  mkdir -p "$OUT/$model/reshape_check"
  work=$(cd "$OUT/$model/reshape_check" && pwd)
  for code in ${CODES:-old new}; do  # CODES=new: the old run is already there
    src=$PWD; [ $code = old ] && src=$OLD
    # The CPU numerics the new main.py pins, for the old code too (they matter on a CPU run only).
    (cd "$src" && MKL_CBWR=${MKL_CBWR:-COMPATIBLE} ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} python3 main.py \
       "${args[@]}" --tasks "$TASKS" --device "$DEVICE" --batch_size 32 "${RUN[@]}" \
       --search_result_dir "$work/$code" --output_path "$work/$code.json")
  done
  python3 - "$work" <<'PY' || status=1
import glob, json, sys
import torch
from safetensors.torch import load_file
work = sys.argv[1]
old = load_file(glob.glob(f"{work}/old/*/*.safetensors")[0])
new = load_file(glob.glob(f"{work}/new/*/*.safetensors")[0])
differing = sorted(k for k in old.keys() | new.keys() if k not in old or k not in new or not torch.equal(old[k], new[k]))
before, after = json.load(open(f"{work}/old.json")), json.load(open(f"{work}/new.json"))
metrics = [f"{task}/{key}" for task, row in before["results"].items() for key, value in row.items()
           if isinstance(value, float) and after["results"].get(task, {}).get(key) != value]
ppl = [run["quantization"].get("heldout_perplexity", {}).get("perplexity") for run in (before, after)]
print(f"{work}: {len(new)} tensors, {len(differing)} differ {differing[:3]}; "
      f"{sum(isinstance(v, float) for row in before['results'].values() for v in row.values())} metrics, "
      f"{len(metrics)} differ {metrics[:3]}; held-out ppl {ppl[0]} -> {ppl[1]}")
sys.exit(1 if differing or metrics or ppl[0] != ppl[1] else 0)
PY
  sha256sum "$work"/old/*/*.pt "$work"/new/*/*.pt
done
exit $status
