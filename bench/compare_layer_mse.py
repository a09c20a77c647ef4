"""Each Linear's searched output MSE in two parameter files (B against A), from the MSEs that calibration stores:
L = |Q_a(X) Q_w(W)^T - X W^T|^2 / (N * out) on the calibration inputs, as in utils/search/problem.py.

    python bench/compare_layer_mse.py A.pt B.pt [--output ratios.json]

A and B may be folders holding one parameter file each (a --search_result_dir). Prints and writes the ratio B/A per
Linear and its summary: mean, geometric mean, share of Linears where B is not above A, the extremes, and the
Linears whose formats differ.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.params import load_params  # noqa: E402


def param_file(path: Path) -> Path:
    """path itself, or the one .pt parameter file under the folder path."""
    if path.is_file():
        return path
    found = sorted(p for p in path.rglob("*.pt") if not p.name.endswith(".partial.pt"))
    if len(found) != 1:
        raise SystemExit(f"error: {path}: expected one parameter file (.pt), found {len(found)}")
    return found[0]


def compare(a: dict, b: dict) -> dict:
    """Summary of mse(B) / mse(A) over the Linears searched in both ({name: QuantParams} of two parameter files)."""
    names = [n for n in a if n in b and a[n].kind == "linear" and a[n].mse and b[n].mse]
    if not names:
        raise SystemExit("error: the two files share no searched Linear")
    ratios = {n: b[n].mse / a[n].mse for n in names}
    values = list(ratios.values())
    changed = [n for n in names if (a[n].weight_format, a[n].act_format) != (b[n].weight_format, b[n].act_format)]
    return {"linears": len(names), "mean_ratio": sum(values) / len(values),
            "geometric_mean_ratio": math.exp(sum(math.log(v) for v in values) / len(values)),
            "share_not_above": sum(v <= 1 for v in values) / len(values),
            "lowest": min(ratios.items(), key=lambda kv: kv[1]), "highest": max(ratios.items(), key=lambda kv: kv[1]),
            "format_changed": changed, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    files = [param_file(args.a), param_file(args.b)]
    (a, _), (b, _) = load_params(files[0]), load_params(files[1])
    summary = {"a": files[0].as_posix(), "b": files[1].as_posix(), **compare(a, b)}
    print({k: v for k, v in summary.items() if k != "ratios"})
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
