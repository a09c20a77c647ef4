"""QuantLinear / QuantEmbedding and the module swap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant_layers.modules as modules
from conftest import make_llama
from quant_layers.formats import fp_format, int_format
from quant_layers.modules import QuantEmbedding, QuantLinear, QuantParams, swap_modules
from quant_layers.quantize import quantize


def _linear(seed=0, out=24, inp=16):
    torch.manual_seed(seed)
    return nn.Linear(inp, out)


def test_unquantized_module_is_identity_of_linear():
    linear = _linear()
    x = torch.randn(5, 16)
    assert torch.equal(QuantLinear(linear)(x), linear(x))


def test_eq8_folding_equals_explicit_per_channel_quantization():
    """Q_a(x * 2^k; m) @ (Q_w(W) * 2^-k)^T == Q_a(x; m * 2^-k) @ Q_w(W)^T (the pre-shifted exponent bias)."""
    torch.manual_seed(1)
    linear = _linear()
    channel_scale = torch.exp2(torch.randint(-4, 3, (16,)).float())
    x = torch.randn(64, 16) * channel_scale  # strong inter-channel variance
    fmt = fp_format(2, 1)
    weight_max = linear.weight.abs().amax(dim=1) * 0.9
    act_max = x.abs().amax() * 0.8
    shift = torch.randint(0, 4, (16,))
    module = QuantLinear(linear)
    module.set_quant_params(QuantParams(fmt, weight_max, fmt, act_max, shift))
    explicit = F.linear(quantize(x, fmt, act_max * torch.exp2(-shift.float())),
                        quantize(linear.weight, fmt, weight_max.view(-1, 1)), linear.bias)
    torch.testing.assert_close(module(x), explicit, rtol=1e-6, atol=1e-6)
    # The shifts matter: without them the result differs.
    plain = F.linear(quantize(x, fmt, act_max), quantize(linear.weight, fmt, weight_max.view(-1, 1)), linear.bias)
    assert not torch.allclose(module(x), plain, atol=1e-3)


def test_weight_quantized_once_not_per_forward(monkeypatch):
    linear = _linear()
    module = QuantLinear(linear)
    fmt = fp_format(2, 1)
    module.set_quant_params(QuantParams(fmt, linear.weight.abs().amax(1), fmt, torch.tensor(3.0)))
    grid = {0, 0.5, 1, 1.5, 2, 3, 4, 6}
    scaled = (module.weight / (linear.weight.abs().amax(1, keepdim=True) / 6)).abs()
    assert all(min(abs(v - g) for g in grid) < 1e-4 for v in scaled.flatten().tolist())
    calls = []
    for name in ("quantize", "quantize_activation"):
        real = getattr(modules, name)
        monkeypatch.setattr(modules, name, lambda x, *a, real=real, name=name, **k: calls.append((name, tuple(x.shape)))
                            or real(x, *a, **k))
    module(torch.randn(7, 16))
    assert calls == [("quantize_activation", (7, 16))]  # the activation only
    with pytest.raises(RuntimeError):
        module.set_quant_params(QuantParams(fmt, linear.weight.abs().amax(1), fmt, torch.tensor(3.0)))


def test_embedding_quantized_per_row():
    embedding = nn.Embedding(10, 8)
    module = QuantEmbedding(embedding)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(module(ids), embedding(ids))
    absmax = embedding.weight.abs().amax(1)
    module.set_quant_params(QuantParams(int_format(4), absmax, kind="embedding"))
    expected = quantize(embedding.weight.detach(), int_format(4), absmax.view(-1, 1))[ids]
    assert torch.equal(module(ids), expected)


def test_swap_replaces_every_linear_and_unties_head():
    model = make_llama(100, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    swapped = swap_modules(model)
    names = set(swapped)
    assert "lm_head" in names and "model.embed_tokens" in names
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.1.{'self_attn' if suffix[0] in 'qkvo' else 'mlp'}.{suffix}" in names
    assert not any(type(m) is nn.Linear for m in model.modules())
    fmt = fp_format(2, 1)
    embedding_before = model.model.embed_tokens.weight.detach().clone()
    model.lm_head.set_quant_params(QuantParams(fmt, model.lm_head.weight.abs().amax(1)))
    # Quantizing the head leaves the (formerly tied) embedding alone, also after tie_weights().
    model.tie_weights()
    assert torch.equal(model.model.embed_tokens.weight, embedding_before)
    assert not torch.equal(model.lm_head.weight, embedding_before)


def test_swap_respects_config_flags():
    model = make_llama(100, tied=False)
    swapped = swap_modules(model, linear=False, lm_head=True, embedding=False)
    assert set(swapped) == {"lm_head"}
