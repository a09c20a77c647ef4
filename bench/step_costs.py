"""Cost and effect of each search step, Linear by Linear, steps run in order from MinMax (round to nearest), each timed
(synchronized on a GPU) with its output MSE over round to nearest.

Default (the CPU figure of configs/recipes.py's `tensor` component: why NVFP4's tensor-scale range search is its own
component): NVFP4 W4A4, one random Linear, x [2048, 576] with per-channel scales, W [1536, 576]; the tensor-scale
range search, then the activation block clip, the weight block scales and GPTQ; writes
bench/results/step_costs_cpu.json.

--shape llama7b (a GPU: where a LLaMA-7B block's calibration by the best recipe goes, issue 20's
calib_7b_best_recipe_minutes): x [--tokens (32 x 1024), in] and q_proj [4096, 4096], gate_proj [11008, 4096],
down_proj [4096, 11008] with random weights, --format NVFP4_4OVER6 by default, the steps of the recipe's `search` and
`gptq` (no tensor-scale search); per step the seconds of one block (4 x q_proj's, the o/k/v Linears have its shape,
2 x gate_proj's, 1 x down_proj's); writes bench/results/step_costs_<device>_llama7b.json.

    python bench/step_costs.py [--shape llama7b --device cuda] [--format NVFP4_4OVER6] [--tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import environment, results_folder, synchronize
from quant_layers.formats import parse_format
from utils.quant_calib import default_budget
from utils.search.act_blocks import ActBlockClipStep
from utils.search.block_scales import BlockScaleStep
from utils.search.gptq import GPTQStep
from utils.search.problem import Budget, LinearProblem
from utils.search.space import SearchSpace
from utils.search.steps import fpq_steps, minmax_state

LLAMA_7B_LINEARS = {"q_proj": ((4096, 4096), 4), "gate_proj": ((11008, 4096), 2), "down_proj": ((4096, 11008), 1)}


def step_rows(problem: LinearProblem, fmt, steps: list) -> list[dict]:
    """[{step, seconds, mse_over_round_to_nearest}] of `steps` ([(name, [Step])]) run in order from MinMax."""
    state = minmax_state(problem, fmt, fmt, True)
    rows = [{"step": "round to nearest", "seconds": 0.0, "mse_over_round_to_nearest": 1.0}]
    for name, parts in steps:
        synchronize()
        start = time.perf_counter()
        for step in parts:
            state = step(problem, state)
        synchronize()
        rows.append({"step": name, "seconds": time.perf_counter() - start,
                     "mse_over_round_to_nearest": state.mse / state.mse_minmax})
        print(f"  {name}: {rows[-1]['seconds']:.2f} s, output MSE / round to nearest "
              f"{rows[-1]['mse_over_round_to_nearest']:.4f}", flush=True)
    return rows


def block_steps(space: SearchSpace) -> list:
    return [("activation block clip", [ActBlockClipStep.from_space(space)]),
            ("weight block scales", [BlockScaleStep.from_space(space)]),
            ("GPTQ", [GPTQStep.from_space(space)])]


def random_linear_cpu() -> dict:
    """The default: one random 1536 x 576 Linear in NVFP4, the tensor-scale search first."""
    torch.manual_seed(0)
    fmt = parse_format("NVFP4")
    x = torch.randn(2048, 576) * torch.rand(576) * 3
    problem = LinearProblem(x, torch.randn(1536, 576) * 0.05, Budget(2**30))
    space = SearchSpace()
    steps = [("tensor-scale range search (3 rounds x 101 candidates)", list(fpq_steps(fmt, fmt, space, False, True)))]
    return {"rows": step_rows(problem, fmt, steps + block_steps(space)), "torch_threads": torch.get_num_threads()}


def llama_7b_problem(name: str, device: str, tokens: int, generator: torch.Generator) -> LinearProblem:
    """LLaMA-7B's Linear `name` (LLAMA_7B_LINEARS) as a search problem: x [tokens, in] bfloat16 with per-channel
    scales, a random bfloat16 weight, the device's default budget."""
    out_features, in_features = LLAMA_7B_LINEARS[name][0]
    channel = torch.rand(in_features, device=device, generator=generator) * 3
    x = (torch.randn(tokens, in_features, device=device, generator=generator) * channel).to(torch.bfloat16)
    weight = (torch.randn(out_features, in_features, device=device, generator=generator) * 0.02).to(torch.bfloat16)
    return LinearProblem(x, weight, default_budget(device))


def llama_7b_block(device: str, format_name: str, tokens: int) -> dict:
    """Each step's seconds on LLaMA-7B's three Linear shapes, and per block (weighted by how many Linears share the
    shape)."""
    generator = torch.Generator(device=device).manual_seed(0)
    fmt, space = parse_format(format_name), SearchSpace()
    linears, per_block = {}, {}
    for name, ((out_features, in_features), count) in LLAMA_7B_LINEARS.items():
        print(f"{name} [{out_features}, {in_features}] x {count} a block, {tokens} tokens", flush=True)
        problem = llama_7b_problem(name, device, tokens, generator)
        step_rows(problem, fmt, block_steps(space))  # untimed: kernels compiled and autotuned
        linears[name] = step_rows(problem, fmt, block_steps(space))
        for row in linears[name]:
            per_block[row["step"]] = per_block.get(row["step"], 0.0) + count * row["seconds"]
        del problem
    print("one block: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in per_block.items()))
    return {"linears": linears, "block_seconds": per_block, "format": fmt.name, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["random", "llama7b"], default="random")
    parser.add_argument("--device", default="cpu", help="llama7b: where it runs (cuda on the GPU machine)")
    parser.add_argument("--format", default="NVFP4_4OVER6", help="llama7b: the block format (parse_format's names)")
    parser.add_argument("--tokens", type=int, default=32 * 1024, help="llama7b: calibration tokens (calib_7b's)")
    args = parser.parse_args()
    if args.shape == "random":
        result, name = random_linear_cpu(), "step_costs_cpu.json"
    else:
        result = llama_7b_block(args.device, args.format, args.tokens)
        name = f"step_costs_{torch.device(args.device).type}_llama7b.json"
    path = results_folder() / name
    path.write_text(json.dumps({**result, **environment()}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
