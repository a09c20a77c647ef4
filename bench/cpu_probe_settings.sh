# Sourced by the CPU probes (bench/cpu_variants.sh, bench/cpu_recipes.sh): the embedded SmolLM2-135M at small scale,
# judged on held-out perplexity (8 x 512 tokens of exllamav2's Wikipedia excerpt; piqa's first 20 documents ride
# along). Calibration 4 x 512 tokens, 1 round, candidates 0.3 1.2 9: not comparable with the GPU rows.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
common=(--tasks piqa --limit 20 --device cpu --batch_size 8 --heldout_ppl 8 --calib_size 4 --calib_seqlen 512
        --search_round 1 --search_intervals 0.3 1.2 9)
