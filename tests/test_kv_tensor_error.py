"""bench/kv_tensor_error.py's two pieces: the capture records one (query, key, value) per layer and window, its
recording attention leaves the logits as they are, and the model's implementation comes back; its causal GQA
attention equals a plain loop over heads and queries."""

import torch

from bench.kv_tensor_error import CAPTURE, attention, capture
from conftest import make_tiny

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))


def test_capture_keeps_logits_and_records_each_layer():
    model = make_tiny("qwen2")
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(IDS).logits
    calls = capture(model, IDS)
    assert len(calls) == IDS.shape[0] * model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation(CAPTURE)  # the recording function itself, as capture runs it
    with torch.no_grad():
        captured = model(IDS).logits
    torch.testing.assert_close(captured, reference, rtol=0, atol=0)
    query, key, value = calls[0]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert query.shape == (1, model.config.num_attention_heads, IDS.shape[1], head_dim)
    assert key.shape == value.shape == (1, model.config.num_key_value_heads, IDS.shape[1], head_dim)


def test_attention_equals_a_loop():
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(1, heads, 7, 8, generator=generator) for heads in (4, 2, 2))
    expected = torch.empty_like(query)
    for head in range(4):
        for i in range(7):
            scores = torch.stack([query[0, head, i] @ key[0, head // 2, j] for j in range(i + 1)]) / 8 ** 0.5
            weights = scores.softmax(0)
            expected[0, head, i] = sum(weights[j] * value[0, head // 2, j] for j in range(i + 1))
    torch.testing.assert_close(attention(query, key, value), expected, rtol=1e-5, atol=1e-6)
