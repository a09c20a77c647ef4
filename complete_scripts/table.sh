#!/usr/bin/env bash
# A model's whole table: every row script of complete_scripts/<model>/ in the table's order (ROWS selects
# some), each writing $OUT/<row>.json (env.sh); then the side-by-side table of the rows that ran.
#   bash complete_scripts/table.sh SmolLM2-135M      (or Qwen2.5-Coder-1.5B)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)/${1:?usage: table.sh <model folder of complete_scripts>}"
[ -f "$here/env.sh" ] || { echo "error: no model folder $here" >&2; exit 2; }
ROWS=${ROWS:-full_precision MinMax_INT MinMax_FP SmoothQuant FPQ_baseline FPQ FPQ_only_eval NVFP4 MXFP4
ablation_sequential ablation_bias_space ablation_calib128 ablation_candidates400 ablation_W4A8 ablation_W8A8_E4M3
ablation_W4A4E8}
for row in $ROWS; do echo "== $row $(date +%T)"; bash "$here/$row.sh"; done
source "$here/env.sh"
python3 -m utils.report.compare $(for row in $ROWS; do [ -f "$OUT/$row.json" ] && echo "$OUT/$row.json"; done)
