"""Which cached tensor an 8-bit cache hurts, and in which format: K and V alone, E4M3 against INT8.

For every attention layer of a full-precision model (CPU), query / key / value after RoPE are captured on held-out
windows of the Wikipedia excerpt (the text of --heldout_ppl), through a function registered with transformers'
AttentionInterface that records them and runs SDPA. Each is quantize-dequantized as the cache rows store it (K per
channel, V per token, `quant_layers.quantize.quantize`; K's range here is each channel's maximum over the windows, no
clipping search; ranges floored at 1e-30 as `quant_layers.attention.minmax_range` floors them), alone, and the layer's
attention output O = softmax(Q K^T / sqrt(d) + causal mask) V is recomputed. Reported per format and tensor, over
layers and windows: the relative squared error |Kq - K|^2 / |K|^2 (V alike) and that of the output |Oq - O|^2 / |O|^2
(mean, worst and the worst one's layer), and per layer K's largest channel offset |mean_t k| / std_t(k) (a
near-constant channel: a float grid rounds it at its magnitude, 2^-4 relative for E4M3, where INT8's per-channel step
is range / 127). The recomputed attention is plain causal softmax with scale 1 / sqrt(head_dim): exact for the three
models at --seqlen up to 512 (Gemma3-270M: query_pre_attn_scalar = head_dim = 256, sliding window 512, no
soft-capping).

    python bench/kv_tensor_error.py --model Qwen2.5-Coder-1.5B \
        --output docs/results/Qwen2.5-Coder-1.5B/kv_heldout_cpu/tensor_error.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, git_commit  # noqa: E402
from quant_layers.attention import minmax_range  # noqa: E402
from quant_layers.formats import parse_format  # noqa: E402
from quant_layers.quantize import quantize  # noqa: E402
from utils.data.cache import cache_dir  # noqa: E402
from utils.data.calib_data import heldout_text  # noqa: E402
from utils.data.models import load_model  # noqa: E402
from utils.report.evaluation import heldout_windows  # noqa: E402
from utils.run.fileio import write_bytes_atomic  # noqa: E402

MODELS = {"SmolLM2-135M": None,  # the embedded default; the others' GGUFs as complete_scripts/<model>/env.sh fetch them
          "Qwen2.5-Coder-1.5B": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "Gemma3-270M": "gemma-3-270m-q4_k_m.gguf"}
CAPTURE = "kv_tensor_error_capture"


def capture(model, windows: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(query, key, value) of every attention call, [1, heads, tokens, head_dim] after RoPE, one window at a time;
    the model's attention implementation is restored afterwards (CAPTURE stays registered: it runs SDPA)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = []

    def record(module, query, key, value, attention_mask, **kwargs):
        captured.append((query.float(), key.float(), value.float()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, record)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None])
    finally:
        model.set_attn_implementation(previous)
    return captured


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Causal softmax(Q K^T / sqrt(d)) V with K and V repeated over the query heads of their group (GQA)."""
    groups = query.shape[1] // key.shape[1]
    return F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
                                          is_causal=True)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).pow(2).sum() / exact.pow(2).sum())


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
    calls = capture(model, windows)
    layers = len(calls) // args.windows
    per_layer = [[calls[w * layers + i] for w in range(args.windows)] for i in range(layers)]
    table = {}
    for name, fmt in formats.items():
        rows = {"key": [], "value": [], "key_output": [], "value_output": []}
        for layer in per_layer:
            key_max = minmax_range(torch.cat([k for _, k, _ in layer]), "per_channel")  # [1, heads, 1, head_dim]
            for query, key, value in layer:
                key_q = quantize(key, fmt, key_max)
                value_q = quantize(value, fmt, minmax_range(value, "per_token"))
                exact = attention(query, key, value)
                rows["key"].append(relative_error(key_q, key))
                rows["value"].append(relative_error(value_q, value))
                rows["key_output"].append(relative_error(attention(query, key_q, value), exact))
                rows["value_output"].append(relative_error(attention(query, key, value_q), exact))
        table[name] = {metric: {"mean": sum(v) / len(v), "worst": max(v),
                                "worst_layer": v.index(max(v)) // args.windows} for metric, v in rows.items()}
        print(f"{name}: " + ", ".join(f"{metric} mean {v['mean']:.2e} worst {v['worst']:.2e} (layer {v['worst_layer']})"
                                      for metric, v in table[name].items()))
    offsets = []
    for layer in per_layer:
        keys = torch.cat([k for _, k, _ in layer], dim=2)  # [1, heads, tokens, head_dim]
        offsets.append(float((keys.mean(dim=2).abs() / keys.std(dim=2).clamp_min(1e-12)).max()))
    print(f"key channel offset |mean| / std: largest per layer, median {sorted(offsets)[len(offsets) // 2]:.1f}, "
          f"max {max(offsets):.1f}")
    results = {"model": args.model, "windows": args.windows, "seqlen": args.seqlen, "text": description,
               "layers": layers, "formats": table, "key_channel_offset_over_std": offsets,
               "commit": git_commit(),
               **environment()}
    write_bytes_atomic(args.output, (json.dumps(results, indent=1) + "\n").encode())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
