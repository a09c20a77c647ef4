"""Cost and effect of each search step on one random Linear on the CPU (why the NVFP4 tensor-scale range search is its
own recipe component, `tensor`, configs/recipes.py): NVFP4 W4A4, x [2048, 576] with per-channel scales, W [1536, 576],
steps run in order from MinMax (round to nearest), each timed; writes bench/results/step_costs_cpu.json.

    python bench/step_costs.py
"""

from __future__ import annotations

import json
import time

import torch

from common import RESULTS, environment
from quant_layers.formats import BLOCK_ALIASES
from utils.search.act_blocks import ActBlockClipStep
from utils.search.block_scales import BlockScaleStep
from utils.search.gptq import GPTQStep
from utils.search.problem import Budget, LinearProblem
from utils.search.space import SearchSpace
from utils.search.steps import fpq_steps, minmax_state


def main() -> None:
    torch.manual_seed(0)
    fmt = BLOCK_ALIASES["NVFP4"]
    x = torch.randn(2048, 576) * torch.rand(576) * 3
    problem = LinearProblem(x, torch.randn(1536, 576) * 0.05, Budget(2**30))
    state = minmax_state(problem, fmt, fmt, True)
    space = SearchSpace()
    rows = [{"step": "round to nearest", "seconds": 0.0, "mse_over_round_to_nearest": 1.0}]
    tensor_search = fpq_steps(fmt, fmt, space, False, True)
    for name, steps in [("tensor-scale range search (3 rounds x 101 candidates)", tensor_search),
                        ("activation block clip", (ActBlockClipStep.from_space(space),)),
                        ("weight block scales", (BlockScaleStep.from_space(space),)),
                        ("GPTQ", (GPTQStep.from_space(space),))]:
        start = time.perf_counter()
        for step in steps:
            state = step(problem, state)
        rows.append({"step": name, "seconds": time.perf_counter() - start,
                     "mse_over_round_to_nearest": state.mse / state.mse_minmax})
        print(f"{name}: {rows[-1]['seconds']:.1f} s, output MSE / round to nearest "
              f"{rows[-1]['mse_over_round_to_nearest']:.4f}")
    (RESULTS / "step_costs_cpu.json").write_text(json.dumps({"rows": rows, **environment(), "torch_threads":
                                                               torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
