"""Side-by-side table of several results JSON files written by main.py.

    python -m utils.report.compare results/a.json results/b.json

Rows are tasks (accuracy in %, lambada also perplexity), columns are runs, last row the mean accuracy.
A column is titled by its config and qbits ("FPQ W4A4E4"); runs that share that title also get the settings in
which they differ (model, search and calibration settings, config definition, lm-eval --limit), and where even
those agree, the results file's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE = "python -m utils.report.compare RESULTS.json [RESULTS.json ...]"


def run_label(results: dict) -> str:
    """'full precision', or the config name without '_config_llama' and the qbits tag: 'FPQ W4A4E4 sequential'."""
    quant = results.get("quantization", {})
    config = quant.get("quant_config")
    if not config:
        return "full precision"
    name = config["name"] if isinstance(config, dict) else str(config)
    label = f"{name.removesuffix('_config_llama')} W{quant['qbits'][0]}A{quant['qbits'][1]}E{quant['qbits'][2]}"
    return label + (" sequential" if quant.get("search", {}).get("sequential") else "")


def _legacy_search_values() -> dict:
    """Search settings that results of older code lack, with the value that code used (utils/search/space.py)."""
    from utils.search.space import SearchSpace

    return {f.name: f.metadata["legacy"] for f in SearchSpace.flags() if f.metadata["legacy"] is not None}


def run_settings(results: dict, legacy: dict | None = None) -> dict[str, object]:
    """What may tell two runs of one config apart: {'model': 'Llama-2-7b', 'calib_size': 32, ...,
    'limit': None}. Search settings missing from an older file take their `legacy` value."""
    quant = results.get("quantization", {})
    source = (quant.get("model") or {}).get("source")
    settings: dict[str, object] = {"model": Path(str(source)).name if source else None}
    search = {**(legacy or {}), **quant.get("search", {})} if quant.get("quant_config") else {}
    settings.update((k, v) for k, v in search.items() if k != "sequential")  # sequential is in run_label
    config = quant.get("quant_config")
    if isinstance(config, dict):
        settings.update((k, v) for k, v in config.items() if k != "name")
    settings["limit"] = results.get("config", {}).get("limit")
    return settings


def _words(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_words(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def column_titles(runs: list[dict], paths: list[Path]) -> list[str]:
    """One distinct title per run: run_label; where several runs share it, 'key=value' for each setting in which
    they differ (left out for a run holding the value most of them share, and for settings a file does not
    record); then the file's stem (or path) where two titles are still alike."""
    labels = [run_label(r) for r in runs]
    titles = list(labels)
    legacy = _legacy_search_values() if any(r.get("quantization", {}).get("quant_config") for r in runs) else {}
    for label in set(labels):
        group = [i for i, t in enumerate(labels) if t == label]
        if len(group) < 2:
            continue
        settings = {i: run_settings(runs[i], legacy) for i in group}
        notes: dict[int, list[str]] = {i: [] for i in group}
        for key in dict.fromkeys(k for i in group for k in settings[i]):
            values = {i: json.dumps(settings[i][key], default=str) for i in group if key in settings[i]}
            counts = sorted(((list(values.values()).count(v), v) for v in set(values.values())), reverse=True)
            if len(counts) < 2:
                continue  # every run that records it agrees
            usual = counts[0][1] if counts[0][0] > counts[1][0] else None  # a value most runs share, if any
            for i, value in values.items():
                if value != usual:
                    notes[i].append(f"{key}={_words(settings[i][key])}")
        for i in group:
            titles[i] = " ".join([titles[i], *notes[i]])
    for title in set(titles):
        group = [i for i, t in enumerate(titles) if t == title]
        if len(group) > 1:
            stems = [Path(paths[i]).stem for i in group]
            names = stems if len(set(stems)) == len(stems) else [str(paths[i]) for i in group]
            for i, name in zip(group, names):
                titles[i] += f" ({name})"
    return titles


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
    header = "| task | " + " | ".join(column_titles(runs, paths)) + " |"
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
