"""How calibration cost grows: one LLaMA-7B-shaped block on a GPU, a tiny Llama block on the CPU (its 7 Linears,
one capture pass + FPQ search, 3 rounds), timed over calibration sizes (x 1024 tokens) and candidate counts.
Writes calib_scaling.json (a table for docs/performance.md's plot; no target).

    python bench/calib_scaling.py
"""

from __future__ import annotations

import argparse
import time

import torch

from common import TINY_SHAPE, first_block, llama_7b_shape, synchronize, warm_up_model, write_result
from quant_layers.formats import fp_format
from utils.quant_calib import capture_inputs, default_budget
from utils.search.problem import LinearProblem
from utils.search.space import SearchSpace
from utils.search.steps import fpq_search


def block_seconds(model, calib_size: int, seqlen: int, candidates: int, rounds: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (calib_size, seqlen), generator=torch.Generator().manual_seed(0))
    block, linears, hidden, kwargs = first_block(model, ids)
    budget = default_budget(hidden.device)
    synchronize()
    start = time.perf_counter()
    _, inputs = capture_inputs(block, hidden, kwargs, linears)
    for name, module in linears.items():
        problem = LinearProblem(inputs[name], module.weight.detach(), budget)
        fpq_search(problem, fp_format(2, 1), fp_format(2, 1), SearchSpace((0.01, 1.2, candidates),
                                                                         search_round=rounds), True)
    synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--candidates", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = llama_7b_shape(1, device, **({} if device == "cuda" else TINY_SHAPE))
    warm_up_model(model, args.seqlen, default_budget(device))  # no timed run pays Triton's autotuning
    by_size = {size: block_seconds(model, size, args.seqlen, 100, args.rounds) for size in args.sizes}
    print("by calib size (x seqlen tokens), 100 candidates:", by_size, flush=True)
    by_candidates = {count: block_seconds(model, 32, args.seqlen, count, args.rounds) for count in args.candidates}
    print("by candidates, 32 sequences:", by_candidates, flush=True)
    block = "LLaMA-7B shape" if device == "cuda" else f"tiny Llama shape on the CPU {TINY_SHAPE}"
    write_result("calib_scaling", by_size.get(32, next(iter(by_size.values()))), "seconds per block",
                 "none (how the cost grows)", True,
                 {"block": f"{block}, 7 Linears", "seqlen": args.seqlen, "rounds": args.rounds},
                 {"seconds_by_calib_size_at_100_candidates": by_size,
                  "seconds_by_candidates_at_32_sequences": by_candidates})


if __name__ == "__main__":
    main()
