"""Which part of a quantized model costs the most? Apply a saved parameter file to the embedded SmolLM2 with
parts switched off and score it, one JSON line per variant: lambada_openai (first N documents, lm-eval) or
perplexity on held-out text (--metric heldout: N windows of 512 tokens of exllamav2's Wikipedia excerpt,
which is neither calibration nor evaluation data).

    python bench/ablate_parts.py PARAMS.pt --limit 200 --out docs/results/SmolLM2-135M/ablation.jsonl
    python bench/ablate_parts.py PARAMS.pt --metric heldout --limit 8 --out ....jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_layers.modules import swap_modules  # noqa: E402
from utils.data.calib_data import heldout_text  # noqa: E402
from utils.report.evaluation import evaluate, heldout_perplexity  # noqa: E402
from utils.data.models import load_model  # noqa: E402
from quant_layers.modules import QuantParams  # noqa: E402
from utils.params import load_params  # noqa: E402
from utils.data.task_data import get_task_specs  # noqa: E402


def _no_act(p: QuantParams) -> QuantParams:
    return dataclasses.replace(p, act_format=None, act_max_value=None, act_channel_shift=None)


VARIANTS = {
    "full_precision": lambda n, p: None,
    "all_quantized": lambda n, p: p,
    "embedding_fp": lambda n, p: None if p.kind == "embedding" else p,
    "lm_head_fp": lambda n, p: None if n == "lm_head" else p,
    "embedding_and_lm_head_fp": lambda n, p: None if n == "lm_head" or p.kind == "embedding" else p,
    "weights_only": lambda n, p: _no_act(p) if p.kind == "linear" else p,
    "activations_only": lambda n, p: None if p.kind == "embedding" else dataclasses.replace(
        p, weight_format=None, weight_max_value=None),
    "down_proj_input_fp": lambda n, p: _no_act(p) if n.endswith("down_proj") else p,
    "down_proj_fp": lambda n, p: None if n.endswith("down_proj") else p,
    "activations_fp_except_down_proj": lambda n, p: p if n.endswith("down_proj") or p.kind == "embedding"
    else _no_act(p),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params")
    parser.add_argument("--limit", type=int, default=200, help="lambada documents, or held-out windows")
    parser.add_argument("--metric", choices=("lambada", "heldout"), default="lambada")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    layers, _ = load_params(args.params)
    specs = get_task_specs(["lambada_openai"]) if args.metric == "lambada" else None
    text = heldout_text()[0] if args.metric == "heldout" else None
    for name, keep in VARIANTS.items():
        model, tokenizer, _ = load_model(None, device="cpu")
        swap_modules(model)
        for module_name, p in layers.items():
            if (kept := keep(module_name, p)) is not None:
                kept.apply(model.get_submodule(module_name))
        if args.metric == "heldout":
            line = {"variant": name, "heldout_perplexity": heldout_perplexity(model, tokenizer, text,
                                                                           windows=args.limit, seqlen=512)}
        else:
            result = evaluate(model, tokenizer, specs, batch_size="16", num_fewshot=0, limit=args.limit, seed=0)
            scores = result["results"]["lambada_openai"]
            line = {"variant": name, "acc": scores["acc,none"], "perplexity": scores["perplexity,none"]}
        line.update({"metric": args.metric, "limit": args.limit, "params": args.params, "machine": "cpu"})
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
