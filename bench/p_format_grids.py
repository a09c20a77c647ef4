"""The grids an unsigned 4-bit format gives the softmax probabilities P at range 1 (`--attn_p_format`).

For each format, `quant_layers.quantize.quantize(x, fmt, 1.0)` on a log-spaced sweep of x in [1e-6, 1]: the values
it takes, the smallest positive one, and the largest input that still becomes 0 (every probability below it is
dropped). Writes docs/results/p_format_grids.json (note 12 reads it).

    python bench/p_format_grids.py UE3M1 UE4M0 UE2M2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import ROOT, environment
from quant_layers.formats import parse_format
from quant_layers.quantize import quantize

SWEEP = torch.logspace(-6, 0, 20001, dtype=torch.float64).float()  # inputs in [1e-6, 1]


def grid(name: str) -> dict:
    """{values, smallest_positive, zero_below} of format `name` at range 1 on SWEEP."""
    quantized = quantize(SWEEP, parse_format(name), 1.0)
    values = sorted(set(quantized.tolist()))
    return {"values": values, "smallest_positive": min(v for v in values if v > 0),
            "zero_below": SWEEP[quantized == 0].max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("formats", nargs="+", help="unsigned formats, e.g. UE3M1 UE4M0 UE2M2")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "p_format_grids.json")
    args = parser.parse_args()
    grids = {name: grid(name) for name in args.formats}
    print("| P format (range 1) | values | smallest positive | inputs that become 0 |")
    print("|---|---:|---:|---:|")
    for name, g in grids.items():
        print(f"| {name} | {len(g['values'])} | 1/{1 / g['smallest_positive']:.0f} | below {g['zero_below']:.2g} |")
    args.output.write_text(json.dumps({"grids": grids, "sweep": "logspace(-6, 0, 20001)", **environment()},
                                      indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
