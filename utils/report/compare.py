"""Side-by-side table of several results JSON files written by main.py.

    python -m utils.report.compare results/a.json results/b.json

Rows are tasks (accuracy in %, lambada also perplexity), columns are runs, last row the mean accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE = "python -m utils.report.compare RESULTS.json [RESULTS.json ...]"


def run_label(results: dict) -> str:
    quant = results.get("quantization", {})
    config = quant.get("quant_config")
    if not config:
        return "full precision"
    name = config["name"] if isinstance(config, dict) else str(config)
    label = f"{name.removesuffix('_config_llama')} W{quant['qbits'][0]}A{quant['qbits'][1]}E{quant['qbits'][2]}"
    return label + (" sequential" if quant.get("search", {}).get("sequential") else "")


def metrics(results: dict) -> dict[str, float]:
    """{'piqa': 71.2, ..., 'lambada_openai ppl': 21.3}: accuracy in %, perplexity as is."""
    out = {}
    for task, values in sorted(results["results"].items()):
        if "acc,none" in values:
            out[task] = 100 * values["acc,none"]
        if "perplexity,none" in values:
            out[f"{task} ppl"] = values["perplexity,none"]
    return out


def comparison_table(paths: list[Path]) -> str:
    """A markdown table, one column per results file."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    columns = [metrics(r) for r in runs]
    rows = sorted({k for c in columns for k in c}, key=lambda k: (k.endswith(" ppl"), k))
    header = "| task | " + " | ".join(run_label(r) for r in runs) + " |"
    lines = [header, "|---" * (len(runs) + 1) + "|"]
    for row in rows:
        cells = [f"{c[row]:.2f}" if row in c else "-" for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    means = [sum(v for k, v in c.items() if not k.endswith(" ppl")) / max(1, sum(not k.endswith(" ppl") for k in c))
             for c in columns]
    lines.append("| mean accuracy | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    return "\n".join(lines)


def _not_results(path: Path) -> str | None:
    """Why `path` cannot be read as main.py's results; None if it can."""
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return str(error)
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        return "no 'results' table"
    return None


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and the error on two lines; we print one
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m utils.report.compare", usage=USAGE,
                     description=__doc__.splitlines()[0] + "\n\n" + __doc__.split("\n\n", 2)[2].strip(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", metavar="RESULTS.json",
                        help="results files written by main.py (--output_path, default results/*.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as error:
        print(f"error: {error}; usage: {USAGE}", file=sys.stderr)
        return 2
    missing = [p for p in args.results if not Path(p).is_file()]
    if missing:
        print(f"error: no such results file: {missing[0]}", file=sys.stderr)
        return 2
    for path in args.results:
        if reason := _not_results(Path(path)):
            print(f"error: {path} is not a results JSON written by main.py ({reason})", file=sys.stderr)
            return 2
    print(comparison_table([Path(p) for p in args.results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
