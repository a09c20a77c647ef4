#!/usr/bin/env bash
# GPU machine, one session: table rows of both models (bench/gpu/table_rows.sh; ROWS, default the NVFP4 / MXFP4
# reference rows) and, with RESHAPE=1, issue 19's acceptance (bench/gpu/reshape_check.sh, old code in .gpu_old), run
# in the background while Qwen's GGUF arrives. Issue 19's run (2026-12-06): RESHAPE=1 with the default rows.
#   PART=setup (carry .whl): wheels, GPU name and versions
#   PART=stage (carry .gpu_a, then again carrying .gpu_t): copy the carried files to /tmp/scratch (the first SmolLM2
#        piece; the task data and the exllamav2 wheel), one folder a call since the tree plus both passes 64 MiB
#   PART=smol  (carry .gpu_b, and .gpu_old with RESHAPE=1): the old code kept in /tmp/scratch/old, join SmolLM2
#        (and unpack the task data), copy this tree to /tmp/scratch/repo, start in its own process session SmolLM2's
#        ROWS (WAVE=6) and, beside them, the reshape check (RESHAPE=1) and the Triton kernels against their
#        references on CUDA ($S/kernel_check.log)
#   then the 23 calls of bench/gpu/model_transfer.sh (each prints the background logs' last lines)
#   PART=qwen  (no carry): start Qwen's ROWS (WAVE=7) and beside them its reshape check (RESHAPE=1);
#        ROWS=none: the check alone
#   PART=wait  (no carry): wait up to LIMIT_S for both, then return results as $OUT/r19.tar.gz
set -uo pipefail
S=/tmp/scratch R=/tmp/scratch/repo
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_MININTERVAL=60
ROWS=${ROWS:-NVFP4 MXFP4}
background() {  # $1: model, $2: wave number of its rows; log $S/<model>.log, marker $S/<model>.done
  local rows="MODEL=$1 WAVE=$2 ROWS='$ROWS' LIMIT_S=7200 OUT=$S/rows$2 bash bench/gpu/table_rows.sh | tail -5"
  local check="OLD=$S/old OUT=$S/r19 MODELS=$1 bash bench/gpu/reshape_check.sh; echo reshape_check exit \$?"
  [ "$ROWS" != none ] || rows=true
  [ "${RESHAPE:-0}" = 1 ] || check=true
  # the whole subshell redirected: a background `cd && cmd > log &` keeps the call's stdout open until cmd ends
  (cd $R && exec setsid bash -c "($rows) & $check; wait; touch $S/$1.done") > $S/$1.log 2>&1 < /dev/null &
}
case "${PART:?set PART=setup, stage, smol, qwen or wait}" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p $S/r19 $S/rows6 $S/rows7
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  ;;
stage)
  mkdir -p $S && for folder in .gpu_a .gpu_t; do [ -d $folder ] && cp $folder/* $S/; done; ls -l $S
  ;;
smol)
  [ "${RESHAPE:-0}" = 1 ] && rm -rf $S/old && cp -r .gpu_old $S/old
  source bench/gpu/join_smollm2.sh
  # the whole tree as it came (not `git ls-files`: the machine's git index may lag the files sent), without the
  # carried data; the runs read this copy, so later calls (which replace the tree) never change a running script
  rm -rf $R && mkdir -p $R && tar --exclude='./.gpu_*' --exclude=./.whl --exclude=./.git -cf - . | tar -xf - -C $R
  (cd $R && PYTHONPATH=/tmp/site:$R python3 -c "from utils.data.models import gguf_to_folder, smollm2_gguf_path
from utils.data.task_data import build_task_data; print(gguf_to_folder(smollm2_gguf_path()), build_task_data())")
  background SmolLM2-135M 6
  (cd $R && PYTHONPATH=/tmp/site:$R exec setsid timeout 600 python3 tests/kernel_check.py cuda) > $S/kernel_check.log 2>&1 \
    < /dev/null &
  ;;
qwen)
  export LLM_FP4_CACHE=$S/cache
  (cd $R && PYTHONPATH=/tmp/site:$R python3 -c "from pathlib import Path; from utils.data.models import gguf_to_folder
print(gguf_to_folder(Path('$S/qwen.gguf')))")
  background Qwen2.5-Coder-1.5B 7
  ;;
wait)
  deadline=$(( $(date +%s) + ${LIMIT_S:-540} ))
  until [ -f $S/Qwen2.5-Coder-1.5B.done ] || [ "$(date +%s)" -ge $deadline ]; do sleep 10; done
  tail -n 4 $S/*.log
  tar -czf $OUT/r19.tar.gz -C $S r19 rows6 rows7 kernel_check.log SmolLM2-135M.log $(cd $S && ls Qwen*.log 2>/dev/null)
  ;;
esac
