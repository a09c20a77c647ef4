#!/usr/bin/env bash
# GPU machine: receive one piece of Qwen2.5-Coder-1.5B's GGUF per call (the machine keeps /tmp while warm).
# Here, once (bench/gpu/make_carry.sh): split -b 52M -d -a 2 model.gguf qwen.part and put piece NN in the ignored
# folder .gpu_qNN/ (echo '/.gpu_q*/' >> .git/info/exclude). Each call carries one folder and runs this script; when
# all 21 pieces are there (52 MiB each, so a call's tree of 9 MB plus one fits 64 MiB) it joins them into
# /tmp/scratch/qwen.gguf and checks the sha256.
set -euo pipefail
S=/tmp/scratch/qwen
# once joined and checked, never again: a folder carried earlier can stay in the tree there, and a later call must
# not rewrite the file while a job reads it
[ -f /tmp/scratch/qwen.ok ] && { echo "Qwen's GGUF is joined and checked"; exit 0; }
mkdir -p $S
for folder in .gpu_q*; do [ -d "$folder" ] && cp "$folder"/qwen.part* $S/; done
PIECES=21  # 1,117,320,768 bytes in 52 MiB pieces
echo "pieces here: $(ls $S | grep -c part)/$PIECES"
if [ "$(ls $S | grep -c part)" = $PIECES ]; then
  cat $S/qwen.part* > /tmp/scratch/qwen.gguf
  echo "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046  /tmp/scratch/qwen.gguf" | sha256sum -c -
  touch /tmp/scratch/qwen.ok  # what bench/gpu/queue.sh waits for: the joined file is whole and checked
fi
