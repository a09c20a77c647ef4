# Shared settings of this folder's row scripts (sourced, not run). Environment you may set:
#   MODEL_ADDR  model path or hub id (default: the embedded SmolLM2-135M-Instruct)
#   TASKS       lm-eval tasks (default: the paper's 6 + openbookqa + lambada_openai)
#   BATCH_SIZE  lm-eval batch size (default auto, as the paper; a number makes rows comparable run to run)
#   DEVICE      cuda (default) or cpu;  OUT  results folder (default docs/results/SmolLM2-135M)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODEL_ARGS=${MODEL_ADDR:+pretrained=$MODEL_ADDR,}use_accelerate=True
TASKS=${TASKS:-arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande,lambada_openai}
DEVICE=${DEVICE:-cuda}
BATCH_SIZE=${BATCH_SIZE:-auto}
OUT=${OUT:-docs/results/SmolLM2-135M}
