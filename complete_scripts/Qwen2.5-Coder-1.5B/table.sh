#!/usr/bin/env bash
# The whole table of Qwen2.5-Coder-1.5B-Instruct: every row script of this folder in order (ROWS selects some),
# each writing $OUT/<row>.json; then the side-by-side table of the main rows.
set -euo pipefail
here="$(dirname "$0")"
ROWS=${ROWS:-full_precision MinMax_INT MinMax_FP SmoothQuant FPQ_baseline FPQ FPQ_only_eval NVFP4 MXFP4}
for row in $ROWS; do echo "== $row $(date +%T)"; bash "$here/$row.sh"; done
source "$here/env.sh"
python3 -m utils.compare $(for row in $ROWS; do [ -f "$OUT/$row.json" ] && echo "$OUT/$row.json"; done)
