"""Search steps of two source trees on the same problems: are the codes, block scales and losses bit for bit equal?

For a change of a step that must not move results (5b1cf4b: GPTQStep's selection and encoding in row slices; then
BlockScaleStep dropping its [C, out, blocks] tensors before the descent): each tree runs GPTQStep, GPTQOutputStep and
BlockScaleStep in its own process on seeded random Linear problems (E2M1 weights with E4M3 inputs, NVFP4, MXFP4, INT4
with E4M3 inputs; budgets of 1 MiB, which slices the 700 rows, and 256 MiB) and the results are compared. (Until
BlockScaleStep joined, this script was bench/gptq_step_equivalence.py and ran the two GPTQ steps only.)

    git worktree add /tmp/before b884719 && python bench/step_equivalence.py /tmp/before
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (1 << 20, 256 << 20)


def run(tree: str, output: str) -> None:
    """The steps on every problem with the modules of `tree`; [(codes, block scale, mse)] pickled to output."""
    sys.path.insert(0, tree)
    import dataclasses

    import torch

    from quant_layers.formats import BLOCK_ALIASES, fp_format, int_format
    from utils.search.block_scales import BlockScaleStep
    from utils.search.gptq import GPTQOutputStep, GPTQStep
    from utils.search.problem import Budget, LinearProblem
    from utils.search.space import SearchSpace
    from utils.search.steps import minmax_state

    e4m3 = fp_format(4, 3)
    pairs = [(fp_format(2, 1), e4m3), (BLOCK_ALIASES["NVFP4"],) * 2, (BLOCK_ALIASES["MXFP4"],) * 2,
             (int_format(4), e4m3)]
    generator = torch.Generator().manual_seed(0)
    results = []
    for weight_format, act_format in pairs:
        x = torch.randn(512, 16, generator=generator) @ torch.randn(16, 256, generator=generator)
        x += 0.05 * torch.randn(512, 256, generator=generator)
        w = torch.randn(700, 256, generator=generator) * 0.1
        for budget in BUDGETS:
            for step in (GPTQStep(block_size=32), GPTQOutputStep.from_space(SearchSpace((0.01, 1.2, 4))),
                         BlockScaleStep()):
                problem = LinearProblem(x, w, Budget(budget))
                start = minmax_state(problem, weight_format, act_format)
                result = step(problem, dataclasses.replace(start, mse=float("inf")))
                results.append((result.weight_codes, result.weight_block_scale, result.mse))
    Path(output).write_bytes(pickle.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other_tree", help="a checkout of the code to compare with (e.g. a git worktree)")
    parser.add_argument("--run", metavar="OUTPUT", help=argparse.SUPPRESS)  # one tree's half, in its own process
    args = parser.parse_args()
    if args.run:
        run(args.other_tree, args.run)
        return
    import torch

    outputs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, tree in (("other", args.other_tree), ("this", str(ROOT))):
            outputs[name] = str(Path(folder) / f"{name}.pkl")
            subprocess.run([sys.executable, __file__, tree, "--run", outputs[name]], check=True, cwd=tree)
        other, this = (pickle.loads(Path(outputs[n]).read_bytes()) for n in ("other", "this"))
    equal = [((a[0] is None and b[0] is None) or torch.equal(a[0], b[0])) and ((a[1] is None and b[1] is None) or torch.equal(a[1], b[1])) and a[2] == b[2]
             for a, b in zip(other, this)]
    print(f"{sum(equal)} of {len(equal)} results bit for bit equal")
    raise SystemExit(0 if all(equal) else 1)


if __name__ == "__main__":
    main()
