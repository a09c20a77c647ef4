"""Where one LLaMA-7B-shaped block's FPQ search spends its time: torch.profiler over the search of each
Linear (after one capture pass), the top operators by device time, the wall time per Linear, and (in a second,
unprofiled pass) the wall time per search stage (each stage synchronized at its end).

    python bench/profile_block.py [--linears q_proj down_proj] [--weight_refine 8 --coarse_tokens 1024 --act_refine 2]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

from common import TINY_SHAPE, first_block, llama_7b_shape, synchronize, warm_up_search
from quant_layers.formats import fp_format
from utils.quant_calib import capture_inputs, default_budget
from utils.search.problem import LinearProblem
from utils.search.space import SearchSpace
from utils.search.steps import ActRangeStep, WeightRangeStep, fpq_search

STAGES = {LinearProblem: ["_weight_stats", "weight_losses", "weight_proxy_losses", "act_losses", "loss"],
          WeightRangeStep: ["__call__"], ActRangeStep: ["__call__"]}


@contextmanager
def stage_timers(seconds: dict):
    """Wrap the search's stages so that each call adds its synchronized wall time to seconds[stage] (nested
    stages count in both)."""
    originals = {(owner, name): getattr(owner, name) for owner, names in STAGES.items() for name in names}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            synchronize()
            start = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize()
            seconds[name] += time.perf_counter() - start
            return result
        return wrapper

    for (owner, name), function in originals.items():
        setattr(owner, name, timed(owner.__name__ if name == "__call__" else name, function))
    try:
        yield
    finally:
        for (owner, name), function in originals.items():
            setattr(owner, name, function)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--linears", nargs="+", default=["q_proj", "gate_proj", "down_proj"])
    parser.add_argument("--calib_size", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    parser.add_argument("--weight_refine", type=int, default=0)
    parser.add_argument("--coarse_tokens", type=int, default=4096)
    parser.add_argument("--act_refine", type=int, default=8)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = llama_7b_shape(1, device, **({} if device == "cuda" else TINY_SHAPE))
    ids = torch.randint(0, model.config.vocab_size, (args.calib_size, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    block, linears, hidden, kwargs = first_block(model, ids)
    _, inputs = capture_inputs(block, hidden, kwargs, linears)
    budget = default_budget(device)
    space = SearchSpace((0.01, 1.2, 100), act_coarse_tokens=args.coarse_tokens, act_refine=args.act_refine,
                        weight_refine=args.weight_refine, search_round=3)
    chosen = [n for n in linears if n.rsplit(".", 1)[-1] in args.linears]
    warm_up_search({name: linears[name] for name in chosen}, inputs, budget)  # down_proj has its own channel count
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for name in chosen:
            synchronize()
            start = time.perf_counter()
            problem = LinearProblem(inputs[name], linears[name].weight.detach(), budget)
            fpq_search(problem, fp_format(2, 1), fp_format(2, 1), space, True)
            synchronize()
            print(f"{name}: {time.perf_counter() - start:.2f} s", flush=True)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows), flush=True)
    for name in chosen:
        seconds = defaultdict(float)
        problem = LinearProblem(inputs[name], linears[name].weight.detach(), budget)
        with stage_timers(seconds):
            fpq_search(problem, fp_format(2, 1), fp_format(2, 1), space, True)
        print(f"{name} stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()), flush=True)


if __name__ == "__main__":
    main()
