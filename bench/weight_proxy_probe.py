"""Probe for a faster weight step: does a diagonal proxy of the weight loss rank candidates well enough?

The weight step scores C candidate ranges per output row exactly, L = u^T G u + 2 u.v + c with u = q(w) - w,
at C x out x in^2 multiply-adds (the bulk of a 7B block's search). The proxy drops G's off-diagonal terms,
P = sum_i G_ii u_i^2 + 2 u.v + c, at C x out x in. If the exact best candidate is nearly always among the k best
by P, the step could score all candidates by P and only k exactly (as the activation step does with its token
subset). On real SmolLM2-135M inputs (CPU, float32), per Linear of a few blocks, for the MinMax activation
state and each 4-bit weight format: the share of rows whose exact best candidate is in P's top k, and the summed
exact loss of the best of P's top k over the exact optimum. Writes weight_proxy_probe.json (no target).

    python bench/weight_proxy_probe.py
"""

from __future__ import annotations

import argparse

import torch

from common import write_result  # first: puts the project root on sys.path
from quant_layers.formats import formats_of_width, fp_format
from quant_layers.quantize import weight_residuals
from utils.calib_data import load_calib_set
from utils.models import decoder_layers, load_model
from utils.quant_calib import _capture, _first_block_inputs, _run_block
from utils.search import Budget, LinearProblem, SearchSpace, minmax_state


def proxy_losses(problem: LinearProblem, fmt, candidates: torch.Tensor, state) -> torch.Tensor:
    """P [C, out] for candidate ranges [C, out], with the same G, V, c as the exact weight losses."""
    gram, v, const = problem._weight_stats(problem._stats_acts(state))
    u = weight_residuals(problem.weight, fmt, candidates, torch.float32)  # [C, out, in]
    return (u.square() * gram.float().diagonal() + 2 * u * v).sum(-1) + const


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--calib_size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--top", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    model, tokenizer, _ = load_model(None, device="cpu", dtype=torch.float32)
    ids = load_calib_set(tokenizer, calib_size=args.calib_size, seqlen=args.seqlen).tokens
    blocks = decoder_layers(model)
    hidden, kwargs = _first_block_inputs(model, blocks, ids, None)
    space, act_format = SearchSpace(0.01, 1.2, args.candidates), fp_format(2, 1)
    rows = []
    for index in range(max(args.blocks) + 1):
        if index in args.blocks:
            linears = {n: m for n, m in blocks[index].named_modules() if isinstance(m, torch.nn.Linear)}
            _, inputs = _capture(blocks[index], hidden, kwargs[index], linears)
            for name, module in linears.items():
                problem = LinearProblem(inputs[name], module.weight.detach(), Budget(1 << 28))
                state = minmax_state(problem, fp_format(2, 1), act_format)
                for fmt in formats_of_width(4):
                    candidates = space.candidates(fmt, problem.weight_absmax)
                    exact = problem.weight_losses(fmt, candidates, state)
                    proxy = proxy_losses(problem, fmt, candidates, state)
                    best = exact.min(dim=0).values
                    row = {"block": index, "linear": name.rsplit(".", 1)[-1], "format": fmt.name}
                    for k in args.top:
                        top = proxy.topk(k, dim=0, largest=False).indices
                        picked = exact.gather(0, top).min(dim=0).values
                        row[f"best_in_top{k}"] = float((exact.argmin(0) == top).any(0).float().mean())
                        row[f"loss_ratio_top{k}"] = float(picked.sum() / best.sum())
                    rows.append(row)
        with torch.no_grad():
            hidden = _run_block(blocks[index], hidden, kwargs[index])
    summary = {}
    for k in args.top:
        shares, ratios = [r[f"best_in_top{k}"] for r in rows], [r[f"loss_ratio_top{k}"] for r in rows]
        summary.update({f"best_in_top{k}_mean": sum(shares) / len(shares), f"best_in_top{k}_worst": min(shares),
                        f"loss_ratio_top{k}_mean": sum(ratios) / len(ratios), f"loss_ratio_top{k}_worst": max(ratios)})
    for key, value in summary.items():
        print(f"{key}: {value:.6f}")
    shapes = {"model": "SmolLM2-135M-Instruct (embedded, float32, CPU)", "blocks": args.blocks,
              "calib_tokens": [args.calib_size, args.seqlen], "candidates": args.candidates,
              "activation_state": "MinMax E2M1 per tensor"}
    k = args.top[len(args.top) // 2]
    write_result("weight_proxy_probe", summary[f"loss_ratio_top{k}_worst"],
                 f"exact loss of the best of the proxy's top {k} / exact optimum (worst Linear and format)",
                 "none (a probe)", True, shapes, {"summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
