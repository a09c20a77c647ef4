"""Does a Linear's calibrated rounding generalise? Output error on calibration inputs and on held-out inputs.

For a few Linears of the full-precision embedded SmolLM2-135M (CPU), the inputs are captured twice: on the
calibration windows (`get_calib_data`, C4 excerpt) and on held-out windows of the Wikipedia excerpt (the text of
--heldout_ppl). From the W4A4 MinMax state of a block-scaled format (round to nearest), each GPTQ variant is fit on the
calibration inputs only; its output error L = |Q_a(X) Q_w(W)^T - X W^T|^2 (utils/search/problem.py) is reported
on both input sets, relative to round to nearest's on the same set. A variant whose held-out ratio rises above its
calibration ratio is fitting the calibration tokens rather than the layer.

    python bench/heldout_layer_error.py --calib_size 64 --variants gptq gptqout gptqout:0.1 gptq:0.1 \
        --output docs/results/SmolLM2-135M/layer_heldout_cpu/aims_64x512.json

A variant is `gptq` (GPTQStep, aimed at W) or `gptqout` (aimed at the exact loss's minimiser, GPTQOutputStep),
with `:D` for a --gptq_damping D other than the default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import captured_inputs, environment, git_commit  # noqa: E402
from quant_layers.formats import BLOCK_ALIASES  # noqa: E402
from utils.data.calib_data import get_calib_data, heldout_text  # noqa: E402
from utils.data.models import load_model  # noqa: E402
from utils.report.evaluation import heldout_windows  # noqa: E402
from utils.run.fileio import write_bytes_atomic  # noqa: E402
from utils.search.gptq import AIMS, GPTQStep  # noqa: E402
from utils.search.problem import Budget, LinearProblem  # noqa: E402
from utils.search.space import SearchSpace  # noqa: E402
from utils.search.steps import minmax_state  # noqa: E402

LINEARS = ("model.layers.5.self_attn.q_proj", "model.layers.5.mlp.down_proj", "model.layers.20.self_attn.o_proj",
           "model.layers.20.mlp.down_proj")
VARIANT_AIMS = {"gptq": "weight", "gptqout": "output"}
assert set(VARIANT_AIMS.values()) == set(AIMS)


def variant_step(name: str) -> GPTQStep:
    """`gptq`, `gptqout`, optionally `:damping`; SystemExit (one line) otherwise."""
    kind, _, damping = name.partition(":")
    if kind not in VARIANT_AIMS:
        raise SystemExit(f"error: unknown variant {name!r}: gptq or gptqout, optionally :damping")
    try:
        value = float(damping) if damping else SearchSpace().gptq_damping
    except ValueError:
        raise SystemExit(f"error: variant {name!r}: the damping after ':' must be a number") from None
    return GPTQStep(damping=value, aim=VARIANT_AIMS[kind])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib_size", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--heldout_windows", type=int, default=8, help="held-out windows (default 8)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--format", default="NVFP4", choices=sorted(BLOCK_ALIASES), help="weight and input format")
    parser.add_argument("--linears", nargs="+", default=list(LINEARS))
    parser.add_argument("--variants", nargs="+", default=["gptq", "gptqout"])
    parser.add_argument("--output", type=Path, required=True, help="results JSON (refused if it exists)")
    args = parser.parse_args()
    steps = {name: variant_step(name) for name in args.variants}
    if args.output.exists():
        raise SystemExit(f"error: {args.output} exists; name a new file")
    fmt = BLOCK_ALIASES[args.format]
    model, tokenizer, _ = load_model(None)
    calib = get_calib_data(tokenizer, calib_size=args.calib_size, seqlen=args.seqlen)
    text, description = heldout_text()
    heldout = heldout_windows(tokenizer, text, windows=args.heldout_windows, seqlen=args.seqlen)
    modules = dict(model.named_modules())
    calib_x = captured_inputs(model, modules, args.linears, calib)
    heldout_x = captured_inputs(model, modules, args.linears, heldout)
    budget = Budget(1 << 28)
    table = {}
    for name in args.linears:
        weight = modules[name].weight.detach().float()
        fit, check = LinearProblem(calib_x[name], weight, budget), LinearProblem(heldout_x[name], weight, budget)
        nearest = minmax_state(fit, fmt, fmt)
        base = fit.loss(nearest), check.loss(nearest)
        table[name] = {}
        for variant, step in steps.items():
            state = step(fit, nearest)
            table[name][variant] = {"calibration": fit.loss(state) / base[0], "heldout": check.loss(state) / base[1]}
        print(name + "".join(f" | {v} {r['calibration']:.3f}/{r['heldout']:.3f}" for v, r in table[name].items()),
              flush=True)
    means = {variant: {side: sum(table[n][variant][side] for n in table) / len(table)
                       for side in ("calibration", "heldout")} for variant in steps}
    print("mean" + "".join(f" | {v} {r['calibration']:.3f}/{r['heldout']:.3f}" for v, r in means.items()))
    record = {"what": "output error relative to round to nearest on the same inputs (calibration / held-out)",
              "format": fmt.name, "calibration_tokens": args.calib_size * args.seqlen, "calibration_data": "C4 excerpt",
              "heldout_tokens": args.heldout_windows * args.seqlen, "heldout_text": description,
              "variants": {name: {"aim": step.aim, "damping": step.damping} for name, step in steps.items()},
              "linears": table, "mean": means, **environment(), "commit": git_commit()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.output, (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
