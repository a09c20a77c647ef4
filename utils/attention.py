"""Attention quantization on a model: prepare it, record calibration inputs, calibrate static ranges, replay them.

The state of each attention module is a quant_layers/attention.py `AttentionQuant`, set as the module's attribute
`llmfp4_attention`; the model runs the registered attention function (`quant_layers.attention.enable`). `prepare`
installs full-precision states (nothing quantized until calibrated or loaded); calibration (utils/quant_calib.py)
records each block's attention inputs during its capture pass (`recording`), then `calibrate_attention` sets MinMax
ranges and, with a SearchSpace, searches them (utils/search/attention_ranges.py); `apply_attention` replays a saved
entry. The policy is configs/attention.py's `AttentionPolicy`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from configs.attention import AttentionPolicy
from quant_layers.attention import (ATTRIBUTE, AttentionQuant, AttentionQuantError, TensorQuant, base_attention,
                                    enable, minmax_range, model_implementation)
from utils.data.architecture import architecture_of, decoder_layers
from utils.search.attention_ranges import search_kv_ranges
from utils.search.space import SearchSpace


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: attention module} of every decoder block; ArchitectureError (one line) for an architecture without
    support (utils/data/architecture.py)."""
    arch = architecture_of(model)
    names = {m: n for n, m in model.named_modules()}
    return {f"{names[block]}.{arch.attention}": block.get_submodule(arch.attention) for block in decoder_layers(model)}


def prepare(model: nn.Module, policy: AttentionPolicy) -> dict[str, nn.Module]:
    """Install full-precision AttentionQuant states on every attention module and switch the model to the llmfp4
    attention function (eager when P is quantized); returns the modules. AttentionQuantError for a policy the
    model cannot take (a block size that does not tile the head dimension, a model on another implementation)."""
    modules = attention_modules(model)
    implementation = model_implementation(model)
    states = {}
    for name, module in modules.items():
        policy.check_head_dim(module.head_dim)
        states[name] = AttentionQuant(base_attention(module, implementation))
    enable(model, states, need_eager=policy.p_format is not None)
    return modules


@contextmanager
def recording(modules: dict[str, nn.Module]):
    """While inside, every call of these modules' attention appends its inputs to records[name]."""
    records = {name: [] for name in modules}
    for name, module in modules.items():
        getattr(module, ATTRIBUTE).recorder = records[name]
    try:
        yield records
    finally:
        for module in modules.values():
            getattr(module, ATTRIBUTE).recorder = None


def _state(module: nn.Module) -> AttentionQuant:
    state = getattr(module, ATTRIBUTE, None)
    if state is None:
        raise AttentionQuantError(f"{type(module).__name__} is not prepared for attention quantization "
                                  "(utils.attention.prepare)")
    return state


def _quantized(state: AttentionQuant, policy: AttentionPolicy, ranges: dict) -> AttentionQuant:
    """state with the policy's specs, static parts at `ranges` ({"key" | "value": max value})."""
    specs = {part: TensorQuant(spec.fmt, spec.granularity, ranges.get(part) if spec.static else None)
             for part, spec in policy.specs().items()}
    return state.replace(**specs)


def calibrate_attention(module: nn.Module, records: list, policy: AttentionPolicy, space: SearchSpace | None):
    """Set the module's quantized state: MinMax static ranges over the recorded calls, searched against the
    attention output with `space`. Returns the parameter-file entry (utils.params.AttentionParams)."""
    from utils.params import AttentionParams

    state = _state(module)
    ranges = {}
    for part, spec in policy.specs().items():
        if part in ("key", "value") and spec.static:
            tensors = [getattr(r, part) for r in records]
            ranges[part] = torch.stack([minmax_range(t, spec.granularity) for t in tensors]).amax(dim=0)
    quantized = _quantized(state, policy, ranges)
    if space is not None and records:
        with torch.no_grad():
            quantized, _, _ = search_kv_ranges(module, quantized, records, space)
    setattr(module, ATTRIBUTE, quantized)
    return AttentionParams(policy.to_dict(), *(None if s is None or not s.static else s.max_value
                                               for s in (quantized.key, quantized.value)))


def apply_attention(module: nn.Module, settings: dict, key_max_value: torch.Tensor | None,
                    value_max_value: torch.Tensor | None) -> None:
    """Replay a saved entry on a prepared module; AttentionQuantError if the ranges do not fit the policy."""
    policy = AttentionPolicy.from_dict(settings)
    state = _state(module)
    ranges = {"key": key_max_value, "value": value_max_value}
    for part, spec in policy.specs().items():
        if part in ranges and spec.static != (ranges[part] is not None):
            raise AttentionQuantError(f"{part} ranges {'missing' if spec.static else 'not expected'} for "
                                      f"{spec.fmt.name} {spec.granularity}")
    device = next(module.parameters()).device
    setattr(module, ATTRIBUTE, _quantized(state, policy, {k: v.to(device) for k, v in ranges.items()
                                                          if v is not None}))
