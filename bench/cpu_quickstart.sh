#!/usr/bin/env bash
# README command one's job (complete_scripts/quickstart.sh) timed on this machine's CPU; writes
# bench/results/cpu_quickstart_minutes.json (target <= 10 min on 2 cores) and keeps the run's files in
# docs/results/SmolLM2-135M/quickstart_cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf results/quickstart
bash complete_scripts/quickstart.sh
mkdir -p docs/results/SmolLM2-135M/quickstart_cpu
cp results/quickstart/*.json docs/results/SmolLM2-135M/quickstart_cpu/
python3 - <<'PY'
import json, os, sys
sys.path.insert(0, "bench")
from common import environment, write_result
seconds = json.load(open("results/quickstart/time.json"))["quickstart_seconds"]
minutes = seconds / 60
write_result("cpu_quickstart_minutes", minutes, "minutes", "<= 10 on 2 cores", minutes <= 10 and os.cpu_count() <= 2,
             {"calib_tokens": [2, 512], "search": "1 round, 0.3 1.2 9", "tasks": "piqa,arc_easy,hellaswag,lambada_openai",
              "limit": 50}, {"cores": os.cpu_count()},
             env={**environment(), "command": "bash bench/cpu_quickstart.sh"})
PY
