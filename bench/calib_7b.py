"""FPQ calibration of a LLaMA-7B-shaped model (random bf16 weights): wall time and peak GPU memory.

The paper's search (3 rounds x 100 candidates, every 4-bit format, W4A4E4 FPQ with channel shifts) on
calib_size x seqlen random tokens, blocks offloaded to CPU memory (one block on the GPU at a time).
Each run writes calib_7b_L<layers>.json; from all run files in the results folder the script then writes
calib_7b_minutes (the 32-layer run's, LLaMA-7B's depth; not written without one) and
calib_peak_mem_over_block_budget (the worst ratio over the layer counts; the budget is one block's weights + its
calibration activations + 2 GiB).
With --quant_config RECIPE (configs/recipes.py, e.g. NVFP4_search_gptq_rot_config_llama) the same for a recipe:
run files calib_7b_<RECIPE>_L<layers>.json, targets calib_7b_best_recipe_minutes (<= 15) and
calib_best_recipe_peak_mem_over_block_budget.

    python bench/calib_7b.py --layers 8 32      (or runs in separate calls, then --summarize)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import LLAMA_7B, TINY_SHAPE, environment, llama_7b_shape, results_folder, synchronize, write_result
from configs import QBits, get_config
from quant_layers.modules import QuantParams, swap_modules
from utils.data.architecture import decoder_layers
from utils.quant_calib import CalibSettings, calibrate
from utils.search.problem import compute_dtype
from utils.search.space import SearchSpace

GIB = 1 << 30
LLAMA_7B_LAYERS = 32  # the minutes targets are on the whole model
PAPER_CONFIG = "FPQ_config_llama"
RUN_KEYS = ("layers", "seconds", "peak_bytes", "block_weights", "calib_activations", "budget", "mean_mse_over_minmax",
            "search_dtype")


def block_budget_bytes(model, tokens: int) -> dict:
    """One block's weights, the activations its calibration keeps (captured Linear inputs in the model dtype:
    attention input, o_proj input, MLP input, down_proj input; the block's input and output hidden states)."""
    block = decoder_layers(model)[0]
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    activations = tokens * (3 * hidden + inter + 2 * hidden) * 2
    return {"block_weights": weights, "calib_activations": activations,
            "budget": weights + activations + 2 * GIB}


def run(layers: int, args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = llama_7b_shape(layers, device, **({} if device == "cuda" else TINY_SHAPE))
    if args.offload and device == "cuda":
        for block in decoder_layers(model):
            block.to("cpu")
    swap_modules(model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.calib_size, args.seqlen), generator=torch.Generator().manual_seed(0))
    settings = CalibSettings(get_config(args.quant_config), QBits.parse([4, 4, 4, 2, 2, 2]),
                             SearchSpace((0.01, 1.2, args.candidates), act_coarse_tokens=args.coarse_tokens,
                                         act_refine=args.act_refine, weight_refine=args.weight_refine,
                                         search_round=args.rounds),
                             offload_device=device if args.offload else None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    params = calibrate(model, ids, settings)
    synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    ratios = [p.mse / p.mse_minmax for p in params.values()  # transforms (smooth, rotations) carry no MSE
              if isinstance(p, QuantParams) and p.kind == "linear" and p.mse_minmax]
    budget = block_budget_bytes(model, args.calib_size * args.seqlen)
    result = {"layers": layers, "seconds": seconds, "peak_bytes": peak, **budget,
              "mean_mse_over_minmax": sum(ratios) / len(ratios),
              "search_dtype": str(compute_dtype(torch.zeros(1, dtype=torch.bfloat16, device=device)))}
    print(result, flush=True)
    del model, params
    return result


def run_prefix(config: str) -> str:
    """calib_7b for the paper's FPQ, calib_7b_<config> for another config."""
    return "calib_7b" if config == PAPER_CONFIG else f"calib_7b_{config}"


def summarize(folder: Path, config: str = "FPQ_config_llama") -> None:
    """The two target files from every <run_prefix>_L<layers>.json run file in folder."""
    prefix = run_prefix(config)
    runs = sorted((json.loads(p.read_text()) for p in folder.glob(f"{prefix}_L*.json")), key=lambda r: r["layers"])
    if not runs:
        raise SystemExit(f"error: no {prefix}_L*.json run files in {folder}")
    devices = {r["device"] for r in runs}
    if len(devices) != 1:
        raise SystemExit(f"error: run files from different devices {sorted(devices)}: rerun on one machine")
    largest = runs[-1]
    shapes = {key: largest[key] for key in ("config", "calib_tokens", "rounds", "candidates", "formats",
                                              "act_coarse_tokens", "offload")}
    shapes["weight_refine"] = largest.get("weight_refine", 0)  # run files from before the options: 0 and 8
    shapes["act_refine"] = largest.get("act_refine", 8)
    shapes["runs"] = [{k: r.get(k) for k in RUN_KEYS} for r in runs]
    env = {"device": largest["device"], "torch": largest["torch"], "triton": largest["triton"],
           "command": largest["command"]}
    minutes = largest["seconds"] / 60
    paper = config == PAPER_CONFIG
    limit = 10 if paper else 15
    if largest["layers"] != LLAMA_7B_LAYERS:  # the minutes target is LLaMA-7B's whole depth, never an extrapolation
        print(f"minutes target not written: the largest run has {largest['layers']} layers, the target is on "
              f"{LLAMA_7B_LAYERS} ({largest['seconds'] / 60:.2f} min at {largest['layers']})")
    else:
        write_result("calib_7b_minutes" if paper else "calib_7b_best_recipe_minutes", minutes, "minutes",
                     f"<= {limit}", minutes <= limit, shapes, {"layers": largest["layers"], "quant_config": config},
                     folder=folder, env=env)
    worst = max(r["peak_bytes"] / r["budget"] for r in runs)
    write_result("calib_peak_mem_over_block_budget" if paper else "calib_best_recipe_peak_mem_over_block_budget",
                 worst, "ratio", "<= 1.0 at every layer count",
                 worst <= 1.0 and len(runs) > 1 and all(r["peak_bytes"] > 0 for r in runs), shapes,
                 {"peak_gib": {r["layers"]: r["peak_bytes"] / GIB for r in runs},
                  "budget_gib": {r["layers"]: r["budget"] / GIB for r in runs}}, folder=folder, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--calib_size", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--coarse_tokens", type=int, default=4096)
    parser.add_argument("--weight_refine", type=int, default=0, help="main.py's --weight_refine (0: exact weight step)")
    parser.add_argument("--act_refine", type=int, default=8, help="main.py's --act_refine")
    parser.add_argument("--quant_config", default=PAPER_CONFIG, help="a config or recipe (default: the paper's FPQ)")
    parser.add_argument("--no_offload", dest="offload", action="store_false")
    parser.add_argument("--summarize", action="store_true",
                        help="only (re)write the target files from the run files already in the results folder")
    args = parser.parse_args()
    folder = results_folder()
    for layers in [] if args.summarize else args.layers:
        result = run(layers, args)
        record = {**result, "config": {**LLAMA_7B}, "calib_tokens": [args.calib_size, args.seqlen],
                  "rounds": args.rounds, "candidates": args.candidates,
                  "formats": "E3M0/E2M1/E1M2 weights and activations, W4A4E4 FPQ" if args.quant_config == PAPER_CONFIG
                  else f"W4A4E4 {args.quant_config}", "quant_config": args.quant_config,
                  "act_coarse_tokens": args.coarse_tokens, "act_refine": args.act_refine,
                  "weight_refine": args.weight_refine, "offload": args.offload, **environment()}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{run_prefix(args.quant_config)}_L{layers}.json").write_text(json.dumps(record, indent=2) + "\n")
    summarize(folder, args.quant_config)


if __name__ == "__main__":
    main()
