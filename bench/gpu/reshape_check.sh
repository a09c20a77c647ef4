#!/usr/bin/env bash
# Issue 19's GPU acceptance, in one call on the GPU machine: FPQ calibration of SmolLM2-135M and Qwen2.5-Coder-1.5B
# with the paper's settings by the code before the reshape (OLD, a checkout of bfa06a6) and after it (this tree):
# identical parameter tensors, and the new code's full-split metrics identical to the committed FPQ rows.
#
# Here, before the call:  git archive bfa06a6 | (mkdir -p .gpu_old && tar -x -C .gpu_old)   (ignored, ~1 MiB)
# and the usual carried folders (bench/gpu/make_carry.sh: .whl, the SmolLM2 GGUF pieces, task data; Qwen's GGUF
# already joined in the machine's cache by bench/gpu/qwen_transfer.sh). On the GPU machine:
#   OLD=.gpu_old bash bench/gpu/reshape_check.sh            (writes $OUT/reshape_check/*)
# Prints one line per model: tensors compared, tensors differing, metrics differing; exits 1 on any difference.
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD=${OLD:-.gpu_old}
OUT=${OUT:-docs/results}
DEVICE=${DEVICE:-cuda}
QWEN=${QWEN:-$HOME/.cache/llm_fp4/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}
[ -f "$OLD/main.py" ] || { echo "error: no checkout of the old code in $OLD (see the header)" >&2; exit 2; }
# SETTINGS / TASKS / EVAL / MODELS: smaller values make a plumbing check on the CPU (its metrics then differ from the
# committed rows by design), e.g. DEVICE=cpu MODELS=SmolLM2-135M TASKS=piqa EVAL="--limit 2 --heldout_ppl 1"
# SETTINGS="--calib_size 1 --calib_seqlen 64 --search_round 1 --search_intervals 0.5 1.2 4"
read -r -a PAPER <<< "--no_cache --num_fewshot 0 --quant_config FPQ_config_llama --qbits 4 4 4 2 2 2 \
${SETTINGS:---calib_size 32 --search_round 3 --search_intervals 0.01 1.2 100}"
read -r -a EVAL_ARGS <<< "${EVAL:---heldout_ppl 16}"
TASKS=${TASKS:-arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande,lambada_openai}
status=0
for model in ${MODELS:-SmolLM2-135M Qwen2.5-Coder-1.5B}; do
  args=(--model_args use_accelerate=True)  # as complete_scripts/<model>/env.sh
  [ "$model" = Qwen2.5-Coder-1.5B ] && args=(--model_args "pretrained=$QWEN,use_accelerate=True")
  mkdir -p "$OUT/$model/reshape_check"
  work=$(cd "$OUT/$model/reshape_check" && pwd)
  # Before: the old code's parameter file (evaluated on one document only: its metrics are the committed row's),
  # with the CPU numerics the new main.py pins (they matter on a CPU run only).
  (cd "$OLD" && MKL_CBWR=${MKL_CBWR:-COMPATIBLE} ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} python3 main.py "${args[@]}" --tasks piqa --limit 1 --device "$DEVICE" --batch_size 8 "${PAPER[@]}" \
     --search_result_dir "$work/old" --output_path "$work/old.json")
  # After: this tree, the full row (the committed FPQ row's tasks, batch size and held-out perplexity).
  python3 main.py "${args[@]}" --tasks "$TASKS" --device "$DEVICE" --batch_size auto "${PAPER[@]}" "${EVAL_ARGS[@]}" \
    --search_result_dir "$work/new" --output_path "$work/FPQ_after_reshape.json"
  python3 - "$work" "$OUT/$model/FPQ.json" <<'PY' || status=1
import glob, json, sys
import torch
from safetensors.torch import load_file
work, committed = sys.argv[1], sys.argv[2]
old = load_file(glob.glob(f"{work}/old/*/*.safetensors")[0])
new = load_file(glob.glob(f"{work}/new/*/*.safetensors")[0])
differing = sorted(k for k in old.keys() | new.keys() if k not in old or k not in new or not torch.equal(old[k], new[k]))
after, before = json.load(open(f"{work}/FPQ_after_reshape.json")), json.load(open(committed))
metrics = [f"{task}/{key}" for task, row in before["results"].items() for key, value in row.items()
           if isinstance(value, float) and after["results"].get(task, {}).get(key) != value]
ppl = (before["quantization"].get("heldout_perplexity", {}).get("perplexity"),
       after["quantization"].get("heldout_perplexity", {}).get("perplexity"))
print(f"{work}: {len(new)} tensors, {len(differing)} differ {differing[:3]}; {len(metrics)} metrics differ "
      f"{metrics[:3]}; held-out ppl {ppl[0]} -> {ppl[1]}")
sys.exit(1 if differing or metrics or ppl[0] != ppl[1] else 0)
PY
  sha256sum "$work"/old/*/*.pt "$work"/new/*/*.pt
done
exit $status
