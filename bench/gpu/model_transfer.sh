#!/usr/bin/env bash
# GPU machine: receive the pieces of a large GGUF (Qwen2.5-Coder-1.5B, Gemma3-270M), one piece per call (the machine
# keeps /tmp while warm), and join each model once all its pieces are there. Here, once (bench/gpu/make_carry.sh): the
# file split into 48 MiB pieces (a call's tracked tree of about 13 MB plus one piece fits 64 MiB), piece NN of model M
# in the ignored folder .gpu_<prefix>NN/ as M.partNN beside M.manifest ("<pieces> <sha256>"). Each call carries one
# folder and runs this script; the last piece of a model joins /tmp/scratch/M.gguf, checks its sha256 and touches
# /tmp/scratch/M.ok (what bench/gpu/queue.sh and table_rows.sh wait for).
set -euo pipefail
S=/tmp/scratch
mkdir -p $S
for manifest in .gpu_*/*.manifest; do
  [ -f "$manifest" ] || continue
  name=$(basename "$manifest" .manifest)
  # once joined and checked, never again: a folder carried earlier can stay in the tree there, and a later call
  # must not rewrite the file while a job reads it
  [ -f $S/$name.ok ] && { echo "$name's GGUF is joined and checked"; continue; }
  read -r pieces sha < "$manifest"
  mkdir -p $S/$name.pieces
  cp "$(dirname "$manifest")"/$name.part* $S/$name.pieces/
  here=$(ls $S/$name.pieces | wc -l)
  echo "$name pieces here: $here/$pieces"
  if [ "$here" = "$pieces" ]; then
    cat $S/$name.pieces/$name.part* > $S/$name.gguf
    echo "$sha  $S/$name.gguf" | sha256sum -c -
    touch $S/$name.ok
  fi
done
