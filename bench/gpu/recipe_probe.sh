#!/usr/bin/env bash
# GPU machine, after bench/gpu/session.sh PART=setup and PART=smol (SmolLM2 joined, wheels installed): early
# held-out perplexity of recipes on SmolLM2-135M (16 x 1024 tokens of the Wikipedia excerpt; piqa's first document
# rides along and is not read), the paper's calibration settings, RECIPES run at once (one process each, so their
# calibration seconds are upper bounds), each stopped after LIMIT_S seconds. Results in $OUT/<recipe>.json and .log.
#   RECIPES="NVFP4_gptq NVFP4_search_gptq_rot" LIMIT_S=250 bash bench/gpu/recipe_probe.sh
# JOBS: how many run at once (default all; the rest start as ones finish).
# FLAGS: further main.py flags for every recipe, TAG: a suffix of their output names, e.g. a damping probe:
#   RECIPES="NVFP4_4over6_search_gptq_smooth" FLAGS="--gptq_damping 0.1" TAG=_damping0.1 bash bench/gpu/recipe_probe.sh
# (bench/gpu/queue.sh's step `probes` runs it with PROBE_RECIPES, PROBE_FLAGS and PROBE_TAG.)
# (NVFP4 alone is configs/NVFP4_config_llama.py, the round-to-nearest row: name it NVFP4.)
source bench/gpu/join_smollm2.sh >/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for name in ${RECIPES:?name the recipes, e.g. NVFP4 NVFP4_gptq}; do
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-999}" ]; do wait -n; done
  (timeout "${LIMIT_S:-250}" python3 main.py --model_args use_accelerate=True --tasks piqa --limit 1 --device cuda \
     --batch_size 8 --no_cache --num_fewshot 0 --quant_config "${name}_config_llama" --qbits 4 4 4 2 2 2 \
     --heldout_ppl 16 ${FLAGS:-} --search_result_dir "/tmp/scratch/probe/$name${TAG:-}" \
     --output_path "$OUT/$name${TAG:-}.json" > "$OUT/$name${TAG:-}.log" 2>&1; echo "$name${TAG:-} exit $?") &
done
wait
grep -h "held-out perplexity\|calibration finished\|Error" "$OUT"/*.log | cut -c1-160
