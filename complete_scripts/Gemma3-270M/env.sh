# Shared settings of this folder's row scripts (sourced, not run). Environment you may set:
#   MODEL_ADDR  model path or hub id (default: the GGUF that fetch_model.sh assembles from PyPI)
#   TASKS       lm-eval tasks (default: the paper's 6 + openbookqa + lambada_openai)
#   BATCH_SIZE  lm-eval batch size (default auto, as the paper; a number makes rows comparable run to run)
#   DEVICE      cuda (default) or cpu;  OUT  results folder (default docs/results/Gemma3-270M)
# Parameter files go under search_result/Gemma3-270M/ (--search_result_dir), apart from the other models'.
# No ablation rows and no residual rotation (refused on Gemma3): complete_scripts/table.sh Gemma3-270M needs ROWS
# (e.g. "full_precision MinMax_INT MinMax_FP SmoothQuant FPQ_baseline FPQ FPQ_only_eval NVFP4 MXFP4"; see the folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODEL_ADDR=${MODEL_ADDR:-${LLM_FP4_CACHE:-$HOME/.cache/llm_fp4}/models/gemma-3-270m-q4_k_m.gguf}
[ -f "$MODEL_ADDR" ] || [ -d "$MODEL_ADDR" ] || bash complete_scripts/Gemma3-270M/fetch_model.sh
MODEL_ARGS=pretrained=$MODEL_ADDR,use_accelerate=True
TASKS=${TASKS:-arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande,lambada_openai}
DEVICE=${DEVICE:-cuda}
BATCH_SIZE=${BATCH_SIZE:-auto}
OUT=${OUT:-docs/results/Gemma3-270M}
