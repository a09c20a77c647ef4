"""Probe for a faster weight step: does a cheap proxy of the weight loss rank candidates well enough?

The weight step scores C candidate ranges per output row exactly, L = u^T G u + 2 u.v + c with u = q(w) - w,
at C x out x in^2 multiply-adds (the bulk of a 7B block's search). The proxy keeps only G's diagonal and its
leading eigenvectors (`LinearProblem.weight_proxy_losses`, what `--weight_refine` ranks with), at
C x out x in x (rank + 1). If the exact best candidate is nearly always among the proxy's k best, the step can
score all candidates by the proxy and only k exactly (as the activation step does with its token subset).
On real SmolLM2-135M inputs (CPU, float32), per Linear of a few blocks, for the MinMax activation state and each
4-bit weight format: the share of rows whose exact best candidate is in the proxy's top k, and the summed exact
loss of the best of that top k over the exact optimum; then, end to end, each Linear's whole search (2 rounds,
every format) with --weight_refine against the exact one: final loss ratio and CPU seconds (CPU times say nothing
about the GPU). Writes weight_proxy_probe.json (no target).

    python bench/weight_proxy_probe.py
"""

from __future__ import annotations

import argparse
import time

import torch

from common import write_result  # first: puts the project root on sys.path
from quant_layers.formats import formats_of_width, fp_format
from utils.data.calib_data import load_calib_set
from utils.data.architecture import decoder_layers
from utils.data.models import load_model
from utils.quant_calib import capture_inputs, first_block_inputs, run_block
from utils.search.problem import Budget, LinearProblem
from utils.search.space import SearchSpace
from utils.search.steps import fpq_search, minmax_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--calib_size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--top", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 8, 32],
                        help="leading eigenvectors of G kept beside its diagonal, one proxy each")
    parser.add_argument("--refine", type=int, default=8,
                        help="end to end: the whole search (2 rounds) with --weight_refine REFINE against exact")
    args = parser.parse_args()
    model, tokenizer, _ = load_model(None, device="cpu", dtype=torch.float32)
    ids = load_calib_set(tokenizer, calib_size=args.calib_size, seqlen=args.seqlen).tokens
    blocks = decoder_layers(model)
    hidden, kwargs = first_block_inputs(model, blocks, ids, None)
    space, act_format = SearchSpace((0.01, 1.2, args.candidates)), fp_format(2, 1)
    rows, searches, seconds = [], [], {"exact": 0.0, "refined": 0.0}
    for index in range(max(args.blocks) + 1):
        if index in args.blocks:
            linears = {n: m for n, m in blocks[index].named_modules() if isinstance(m, torch.nn.Linear)}
            _, inputs = capture_inputs(blocks[index], hidden, kwargs[index], linears)
            for name, module in linears.items():
                problem = LinearProblem(inputs[name], module.weight.detach(), Budget(1 << 28))
                state = minmax_state(problem, fp_format(2, 1), act_format)
                for fmt in formats_of_width(4):
                    candidates = space.candidates(fmt, problem.weight_absmax)
                    exact = problem.weight_losses(fmt, candidates, state)
                    best = exact.min(dim=0).values
                    row = {"block": index, "linear": name.rsplit(".", 1)[-1], "format": fmt.name}
                    for rank in args.ranks:
                        proxy = problem.weight_proxy_losses(fmt, candidates, state, rank)
                        for k in args.top:
                            top = proxy.topk(k, dim=0, largest=False).indices
                            picked = exact.gather(0, top).min(dim=0).values
                            row[f"rank{rank}_best_in_top{k}"] = float((exact.argmin(0) == top).any(0).float().mean())
                            row[f"rank{rank}_loss_ratio_top{k}"] = float(picked.sum() / best.sum())
                    rows.append(row)
                found = {}
                for label, refine in (("exact", 0), ("refined", args.refine)):
                    start = time.perf_counter()
                    found[label], _ = fpq_search(
                        LinearProblem(inputs[name], module.weight.detach(), Budget(1 << 28)), fp_format(2, 1),
                        act_format, SearchSpace((0.01, 1.2, args.candidates), weight_refine=refine, search_round=2),
                        True)
                    seconds[label] += time.perf_counter() - start
                searches.append({"block": index, "linear": name.rsplit(".", 1)[-1], "exact": found["exact"].mse,
                                 "refined": found["refined"].mse})
        with torch.no_grad():
            hidden = run_block(blocks[index], hidden, kwargs[index])
    summary = {}
    for rank in args.ranks:
        for k in args.top:
            shares = [r[f"rank{rank}_best_in_top{k}"] for r in rows]
            ratios = [r[f"rank{rank}_loss_ratio_top{k}"] for r in rows]
            summary.update({f"rank{rank}_best_in_top{k}_mean": sum(shares) / len(shares),
                            f"rank{rank}_best_in_top{k}_worst": min(shares),
                            f"rank{rank}_loss_ratio_top{k}_mean": sum(ratios) / len(ratios),
                            f"rank{rank}_loss_ratio_top{k}_worst": max(ratios)})
    ratios = [r["refined"] / r["exact"] for r in searches]
    summary.update({"search_loss_ratio_mean": sum(ratios) / len(ratios), "search_loss_ratio_worst": max(ratios),
                    "search_loss_equal_share": sum(r == 1.0 for r in ratios) / len(ratios),
                    "search_seconds_exact_cpu": seconds["exact"], "search_seconds_refined_cpu": seconds["refined"]})
    for key, value in summary.items():
        print(f"{key}: {value:.6f}")
    shapes = {"model": "SmolLM2-135M-Instruct (embedded, float32, CPU)", "blocks": args.blocks, "ranks": args.ranks,
              "calib_tokens": [args.calib_size, args.seqlen], "candidates": args.candidates,
              "activation_state": "MinMax E2M1 per tensor"}
    k, rank = args.top[len(args.top) // 2], args.ranks[-1]
    write_result("weight_proxy_probe", summary[f"rank{rank}_loss_ratio_top{k}_worst"],
                 f"exact loss of the best of the rank-{rank} proxy's top {k} / exact optimum (worst Linear and format)",
                 "none (a probe)", True, shapes, {"summary": summary, "rows": rows, "searches": searches})


if __name__ == "__main__":
    main()
