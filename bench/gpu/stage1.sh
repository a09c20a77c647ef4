#!/usr/bin/env bash
# GPU machine, call 1 of 2 (files over 64 MiB travel in pieces): install the carried lm-eval/gguf wheels into
# /tmp/site and keep the first piece of the SmolLM2 GGUF in /tmp/scratch (both stay while the machine is warm),
# then a smoke test: calibrate and evaluate a tiny random Llama on CUDA.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/scratch && cp .gpu_a/gguf.part1 /tmp/scratch/
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, lm_eval; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__)"
python3 - <<'PY'
import sys, time, torch
sys.path.insert(0, "tests")
from conftest import make_llama
from configs import QBits, get_config
from quant_layers.modules import swap_modules
from utils.quant_calib import CalibSettings, calibrate
from utils.search import SearchSpace
model = make_llama(300).cuda()
swap_modules(model)
ids = torch.randint(0, 300, (4, 64))
start = time.time()
calibrate(model, ids, CalibSettings(get_config("FPQ_config_llama"), QBits.parse([4, 4, 4, 2, 2, 2]), SearchSpace(0.01, 1.2, 100), 3))
print("tiny FPQ calibration on cuda", round(time.time() - start, 2), "s; logits", model(ids.cuda()).logits.float().abs().mean().item())
PY
