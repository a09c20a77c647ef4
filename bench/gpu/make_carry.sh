#!/usr/bin/env bash
# Here (not on the GPU machine): build the git-ignored folders the GPU calls carry, each under the 64 MiB a call
# may take with the working tree. Needs the registries (PyPI); run from the project checkout.
#   .whl/      lm-eval, datasets, gguf and their small dependencies as cp312 wheels (../shared/tools/gpu-wheels.sh),
#              pytest and compressed-tensors with theirs
#   .gpu_a/    the first 48,234,496 bytes of the SmolLM2 GGUF
#   .gpu_b/    the rest of it and its sha256
#   .gpu_t/    the 8 tasks' data (tasks.tar.xz) and the exllamav2 wheel (C4 excerpt); each its own call since the
#              tracked tree (9 MB) plus .whl and .gpu_a, or .gpu_a and .gpu_t, passes 64 MiB
#   .gpu_tf/   transformers 5.24.0 and regex, for Gemma3-270M's rows only (carried with .whl in queue.sh's start call):
#              the machine's transformers 5.17 converts Gemma3's GGUF tokenizer without its BOS and into wrong
#              pieces (held-out perplexity 12,523, 2026-12-07); 5.24 is the newest >= 5.23 whose dependencies the
#              machine's image meets (huggingface_hub 1.33, tokenizers 0.23.2); SmolLM2's and Qwen's rows keep 5.17
#   .gpu_qNN/  Qwen2.5-Coder-1.5B's GGUF (23 pieces) and .gpu_gNN/ Gemma3-270M's (6 pieces), 48 MiB each, with a
#              manifest (bench/gpu/model_transfer.sh, one piece per call)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
cache=${LLM_FP4_CACHE:-$HOME/.cache/llm_fp4}
bash ../shared/tools/gpu-wheels.sh
# pytest for the CUDA tests, compressed-tensors (and what it needs beyond the machine's packages) for the real-client
# check (bench/gpu/queue.sh); pydantic's compiled core is the one cp312 wheel
python3 -m pip download -q --no-deps -d .whl --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  pytest pluggy iniconfig pygments "compressed-tensors==0.20.1" loguru psutil pydantic pydantic_core \
  typing_inspection annotated_types typing_extensions
mkdir -p .gpu_tf
python3 -m pip download -q --no-deps -d .gpu_tf --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  transformers==5.24.0 regex==2026.5.9
smollm2=$(python3 -c "from utils.data.models import smollm2_gguf_path; from utils.data.task_data import build_task_data
build_task_data(); print(smollm2_gguf_path())" | tail -1)
mkdir -p .gpu_a .gpu_b .gpu_t
head -c 48234496 "$smollm2" > .gpu_a/gguf.part1
tail -c +48234497 "$smollm2" > .gpu_b/gguf.part2
sha256sum "$smollm2" | cut -d' ' -f1 > .gpu_b/gguf.sha256
tar -C "$cache" -cJf .gpu_t/tasks.tar.xz tasks
python3 -m pip download -q --no-deps exllamav2==0.3.2 -d .gpu_t
split_model() {  # $1 the GGUF, $2 its name on the machine, $3 the folders' prefix
  local pieces manifest
  pieces=$(mktemp -d)
  split -b 48M -d -a 2 "$1" "$pieces/$2.part"
  manifest="$(ls "$pieces" | wc -l) $(sha256sum "$1" | cut -d' ' -f1)"
  for piece in "$pieces"/$2.part*; do
    folder=.gpu_$3${piece##*part}
    rm -rf "$folder" && mkdir -p "$folder" && mv "$piece" "$folder/" && echo "$manifest" > "$folder/$2.manifest"
  done
  rmdir "$pieces"
}
qwen=$cache/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
bash complete_scripts/Qwen2.5-Coder-1.5B/fetch_model.sh "$qwen"
split_model "$qwen" qwen q
gemma=$cache/models/gemma-3-270m-q4_k_m.gguf
bash complete_scripts/Gemma3-270M/fetch_model.sh "$gemma"
split_model "$gemma" gemma3 g
du -sh .whl .gpu_a .gpu_b .gpu_t .gpu_tf .gpu_q00 .gpu_g00
