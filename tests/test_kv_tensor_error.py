"""bench/kv_tensor_error.py's layer errors against a hand computation: K quantized per channel (each channel's
maximum over the calls) and V per token with quant_layers.quantize.quantize, attention as a plain causal loop."""

import torch

from bench.kv_tensor_error import layer_errors, record_windows
from conftest import make_tiny
from quant_layers.formats import parse_format
from quant_layers.quantize import quantize

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))


def loop_attention(query, key, value, scaling):
    """[1, heads, tokens, d] causal softmax(Q K^T * scaling) V, one head and one query at a time (GQA by index)."""
    groups = query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    for head in range(query.shape[1]):
        for i in range(query.shape[2]):
            scores = torch.stack([query[0, head, i] @ key[0, head // groups, j] for j in range(i + 1)]) * scaling
            weights = scores.softmax(0)
            out[0, head, i] = sum(weights[j] * value[0, head // groups, j] for j in range(i + 1))
    return out


def relative(approx, exact):
    return float((approx - exact).pow(2).sum() / exact.pow(2).sum())


def test_layer_errors_match_a_hand_computation():
    model = make_tiny("qwen2")
    model.set_attn_implementation("sdpa")
    recorded = record_windows(model, IDS)
    assert len(recorded) == model.config.num_hidden_layers
    fmt = parse_format("E2M1")
    for module, records in recorded.values():
        assert len(records) == IDS.shape[0]
        errors = layer_errors(module, records, fmt)
        key_max = torch.cat([r.key for r in records]).abs().amax(dim=(0, 2), keepdim=True)
        for w, r in enumerate(records):
            key_q = quantize(r.key, fmt, key_max)
            value_q = quantize(r.value, fmt, r.value.abs().amax(dim=-1, keepdim=True))
            exact = loop_attention(r.query, r.key, r.value, module.scaling)
            expected = {"key": relative(key_q, r.key), "value": relative(value_q, r.value),
                        "key_output": relative(loop_attention(r.query, key_q, r.value, module.scaling), exact),
                        "value_output": relative(loop_attention(r.query, r.key, value_q, module.scaling), exact)}
            for metric, value in expected.items():
                assert value > 0
                assert abs(errors[metric][w] - value) <= 1e-4 * value, (metric, errors[metric][w], value)
