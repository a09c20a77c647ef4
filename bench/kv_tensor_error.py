"""Which cached tensor an 8-bit cache hurts, and in which format: K and V alone, E4M3 against INT8.

For every attention layer of a full-precision model (CPU), query / key / value after RoPE are recorded on held-out
windows of the Wikipedia excerpt (the text of --heldout_ppl) by the calibration's own recording (utils.attention:
`prepare` with nothing quantized, `recording`). K and V are each quantize-dequantized alone as the cache rows store
them (`quant_layers.attention.quantize_heads`: K per channel, static, its range each channel's maximum over the
windows with no clipping search; V per token), and the layer's attention output is recomputed by the module's own
attention function (`AttentionQuant`, as the range search scores it). Reported per format and tensor, over layers and
windows: the relative squared error |Kq - K|^2 / |K|^2 (V alike) and that of the output |Oq - O|^2 / |O|^2 (mean,
worst and the worst one's layer), and per layer K's largest channel offset |mean_t k| / std_t(k) (a near-constant
channel: a float grid rounds it at its magnitude, 2^-4 relative for E4M3, where INT8's per-channel step is
range / 127).

    python bench/kv_tensor_error.py --model Qwen2.5-Coder-1.5B \
        --output docs/results/Qwen2.5-Coder-1.5B/kv_heldout_cpu/tensor_error.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, git_commit  # noqa: E402
from configs.attention import AttentionPolicy  # noqa: E402
from quant_layers.attention import ATTRIBUTE, AttentionInputs, TensorQuant, minmax_range, quantize_heads  # noqa: E402
from quant_layers.formats import QuantFormat, parse_format  # noqa: E402
from utils.attention import prepare, recording  # noqa: E402
from utils.data.cache import cache_dir  # noqa: E402
from utils.data.calib_data import heldout_text  # noqa: E402
from utils.data.models import load_model  # noqa: E402
from utils.report.evaluation import heldout_windows  # noqa: E402
from utils.run.fileio import write_bytes_atomic  # noqa: E402
from utils.search.attention_ranges import reference_outputs  # noqa: E402

MODELS = {"SmolLM2-135M": None,  # the embedded default; the others' GGUFs as complete_scripts/<model>/env.sh fetch them
          "Qwen2.5-Coder-1.5B": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "Gemma3-270M": "gemma-3-270m-q4_k_m.gguf"}
PARTS = {"key": "per_channel", "value": "per_token"}  # the cache rows' granularities (the --kv_granularity default)


def record_windows(model, windows: torch.Tensor) -> dict[str, tuple[nn.Module, list[AttentionInputs]]]:
    """{name: (attention module, its recorded calls, one per window)}: the calibration's own recording
    (utils.attention.prepare with nothing quantized, then `recording`), one window at a time."""
    modules = prepare(model, AttentionPolicy())
    with recording(modules) as records, torch.no_grad():
        for window in windows:
            model(window[None])
    return {name: (module, records[name]) for name, module in modules.items()}


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact).pow(2).sum() / exact.float().pow(2).sum())


def layer_errors(module: nn.Module, records: list[AttentionInputs], fmt: QuantFormat) -> dict[str, list[float]]:
    """Per recorded call: K's and V's relative squared error quantized alone in fmt, as the cache stores them (K per
    channel, static, its range each channel's maximum over the calls; V per token), and the attention output's
    (`key_output`, `value_output`) against full precision, by the module's own attention function."""
    state = getattr(module, ATTRIBUTE)
    keys = torch.cat([record.key for record in records])
    specs = {"key": TensorQuant(fmt, PARTS["key"], minmax_range(keys, PARTS["key"])),
             "value": TensorQuant(fmt, PARTS["value"])}
    errors = {metric: [] for part in PARTS for metric in (part, f"{part}_output")}
    for record, exact in zip(records, reference_outputs(module, state, records)):
        for part, spec in specs.items():
            tensor = getattr(record, part)
            errors[part].append(relative_error(quantize_heads(tensor, spec), tensor))
            output = state.replace(**{part: spec})(module, record.query, record.key, record.value,
                                                   record.attention_mask, **record.kwargs)[0]
            errors[f"{part}_output"].append(relative_error(output, exact))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="SmolLM2-135M")
    parser.add_argument("--windows", type=int, default=2, help="held-out windows (default 2)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--formats", nargs="+", default=["E4M3", "INT8"])
    parser.add_argument("--output", type=Path, required=True, help="results JSON (refused if it exists)")
    args = parser.parse_args()
    if args.output.exists():
        raise SystemExit(f"error: {args.output} exists; name a new file")
    formats = {name: parse_format(name) for name in args.formats}
    model, tokenizer, _ = load_model(MODELS[args.model] and cache_dir() / "models" / MODELS[args.model])
    text, description = heldout_text()
    windows = heldout_windows(tokenizer, text, windows=args.windows, seqlen=args.seqlen)
    recorded = record_windows(model, windows)
    table = {}
    for name, fmt in formats.items():
        rows = {}
        for module, records in recorded.values():
            for metric, values in layer_errors(module, records, fmt).items():
                rows.setdefault(metric, []).append(values)  # [layers][windows]
        table[name] = {}
        for metric, per_layer in rows.items():
            flat = [value for values in per_layer for value in values]
            worst = max(flat)
            table[name][metric] = {"mean": sum(flat) / len(flat), "worst": worst,
                                   "worst_layer": flat.index(worst) // args.windows}
        print(f"{name}: " + ", ".join(f"{metric} mean {v['mean']:.2e} worst {v['worst']:.2e} (layer {v['worst_layer']})"
                                      for metric, v in table[name].items()))
    offsets = []
    for _, records in recorded.values():
        keys = torch.cat([record.key.float() for record in records], dim=2)  # [1, heads, tokens, head_dim]
        offsets.append(float((keys.mean(dim=2).abs() / keys.std(dim=2).clamp_min(1e-12)).max()))
    print(f"key channel offset |mean| / std: largest per layer, median {sorted(offsets)[len(offsets) // 2]:.1f}, "
          f"max {max(offsets):.1f}")
    results = {"model": args.model, "windows": args.windows, "seqlen": args.seqlen, "text": description,
               "layers": len(recorded), "formats": table, "key_channel_offset_over_std": offsets,
               "commit": git_commit(), **environment()}
    write_bytes_atomic(args.output, (json.dumps(results, indent=1) + "\n").encode())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
