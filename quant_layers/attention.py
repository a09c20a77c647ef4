"""Quantized attention: the KV cache and the two activation-by-activation matmuls, through transformers' attention
interface (no module is patched).

`attention_forward` is registered with `transformers.AttentionInterface` under two names, "llmfp4_sdpa" and
"llmfp4_eager" (with the matching mask functions in `AttentionMaskInterface`); `enable` sets one on a model
(`set_attn_implementation`) and puts an `AttentionQuant` on every attention module as the attribute `llmfp4_attention`.
transformers calls the function with query / key / value after RoPE (and after `cache.update`: the keys as cached),
shaped [batch, heads, tokens, head_dim]; the function quantize-dequantizes, as the module's state says:

    key, value   as cached (KV heads, before GQA's repeat), granularity per tensor / per head / per channel (K only),
                 static ranges (calibrated), or per token with dynamic ranges (each token's head vector its own max)
    query        the input of Q K^T, per token, dynamic
    probs        P = softmax(Q K^T * scaling + mask), the input of P V: range fixed at 1 (P lies in [0, 1]), any format;
                 an unsigned ExMy fits it best (formats.py: signed=False, e.g. UE3M1)

then runs the model's own attention (its module's `eager_attention_forward`, or transformers' SDPA). With `probs` it
computes attention eagerly itself (`eager_attention`: SDPA computes the softmax internally), under the eager mask.

Dynamic ranges exist per token only: a range over a sequence's tokens (per tensor, per head, per channel) would make
a token's cached key depend on later tokens, which a cache cannot do and which leaks the future into a one-pass
evaluation. Re-quantizing cached tokens at every decoding step is idempotent for every granularity here (grid points
map to themselves; a per-token range is its token's maximum, a grid point).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from quant_layers.formats import QuantFormat
from quant_layers.quantize import quantize

ATTRIBUTE = "llmfp4_attention"  # the AttentionQuant of an attention module
IMPLEMENTATIONS = ("eager", "sdpa")  # the model's attention implementations this wraps
GRANULARITIES = ("per_tensor", "per_head", "per_token", "per_channel")
DYNAMIC = "per_token"  # the one granularity whose ranges come from the data at run time
PROBS_MAX = 1.0  # P's range: softmax probabilities lie in [0, 1]


class AttentionQuantError(ValueError):
    """Attention quantization that a model or format cannot take (one line)."""


@dataclass(frozen=True)
class TensorQuant:
    """How one attention tensor [batch, heads, tokens, head_dim] is quantized.

    granularity: one of GRANULARITIES. max_value: the static range, shaped per granularity ([] per tensor,
    [1, heads, 1, 1] per head, [1, heads, 1, head_dim] per channel; float32), None for per token (dynamic) and for
    formats without a range (MX)."""

    fmt: QuantFormat
    granularity: str
    max_value: torch.Tensor | None = None

    @property
    def static(self) -> bool:
        """Whether the range is calibrated (not per token, and the format has a range)."""
        return self.granularity != DYNAMIC and self.fmt.has_range


def range_dims(granularity: str) -> tuple[int, ...]:
    """The dimensions of [batch, heads, tokens, head_dim] a range is the maximum over."""
    return {"per_tensor": (0, 1, 2, 3), "per_head": (0, 2, 3), "per_channel": (0, 2), "per_token": (3,)}[granularity]


def minmax_range(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """max |x| at granularity (float32, keepdim; [] per tensor), floored at 1e-30."""
    amax = x.detach().abs().float().amax(dim=range_dims(granularity), keepdim=granularity != "per_tensor")
    return amax.clamp(min=1e-30)


def quantize_heads(x: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    """x [batch, heads, tokens, head_dim] quantize-dequantized per spec (blocks run along head_dim)."""
    if spec.static:
        return quantize(x, spec.fmt, spec.max_value.to(x.device))
    return quantize(x, spec.fmt, minmax_range(x, DYNAMIC) if spec.fmt.has_range else 1.0)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, tokens, d] -> [batch, kv_heads * groups, tokens, d], each KV head repeated for its queries."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None, probs: TensorQuant | None,
                    dropout: float = 0.0, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with P quantize-dequantized before P V: (output [batch, tokens, heads, d], P).

    attention_mask: additive (float) [batch, 1, q, >= kv], or None."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if probs is not None:
        weights = quantize(weights, probs.fmt, PROBS_MAX)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@dataclass
class AttentionInputs:
    """One call's inputs, as the attention function received them (recorded for calibration)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    kwargs: dict


@dataclass
class AttentionQuant:
    """The quantization state of one attention module. key / value / query / probs: None = full precision.
    base: the model's own attention function (eager or SDPA); recorder: while a list, every call's inputs are
    appended to it (calibration)."""

    base: Callable
    key: TensorQuant | None = None
    value: TensorQuant | None = None
    query: TensorQuant | None = None
    probs: TensorQuant | None = None
    recorder: list | None = field(default=None, repr=False)

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.key is not None:
            key = quantize_heads(key, self.key)
        if self.value is not None:
            value = quantize_heads(value, self.value)
        if self.query is not None:
            query = quantize_heads(query, self.query)
        if self.probs is None:
            return self.base(module, query, key, value, attention_mask, **kwargs)
        return eager_attention(module, query, key, value, attention_mask, kwargs.get("scaling"), self.probs,
                               kwargs.get("dropout", 0.0), kwargs.get("softcap"))

    def replace(self, **changes) -> "AttentionQuant":
        return dataclasses.replace(self, **changes)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: the module's AttentionQuant, recording its inputs when asked."""
    state = getattr(module, ATTRIBUTE, None)
    if state is None:
        raise AttentionQuantError(f"{type(module).__name__} runs the llmfp4 attention function without its state: "
                                  "enable it with quant_layers.attention.enable")
    if state.recorder is not None:
        state.recorder.append(AttentionInputs(query, key, value, attention_mask, dict(kwargs)))
    return state(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for base, mask in (("eager", eager_mask), ("sdpa", sdpa_mask)):
        AttentionInterface.register(f"llmfp4_{base}", attention_forward)
        AttentionMaskInterface.register(f"llmfp4_{base}", mask)


def base_attention(module: nn.Module, implementation: str) -> Callable:
    """The function the unmodified model runs for `implementation` ("eager": its modeling file's
    `eager_attention_forward`; "sdpa": transformers' SDPA)."""
    if implementation == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise AttentionQuantError(f"{type(module).__name__} has no eager_attention_forward to wrap")
    return eager


def model_implementation(model: nn.Module) -> str:
    """The model's own attention implementation ("eager" or "sdpa"), also when it already runs ours."""
    name = model.config._attn_implementation
    return name.removeprefix("llmfp4_")


def enable(model: nn.Module, states: dict[str, AttentionQuant], need_eager: bool = False) -> None:
    """Put states[name] on each named attention module and switch the model to the llmfp4 attention function (its
    eager variant, with eager masks, when `need_eager` or any state quantizes P, which needs the softmax; else the
    model's own implementation)."""
    implementation = model_implementation(model)
    if implementation not in IMPLEMENTATIONS:
        raise AttentionQuantError(f"attention quantization wraps eager or SDPA attention, the model runs "
                                  f"{implementation!r}: load it with attn_implementation='sdpa' or 'eager'")
    _register()
    for name, state in states.items():
        setattr(model.get_submodule(name), ATTRIBUTE, state)
    eager = implementation == "eager" or need_eager or any(state.probs is not None for state in states.values())
    model.set_attn_implementation(f"llmfp4_{'eager' if eager else 'sdpa'}")
