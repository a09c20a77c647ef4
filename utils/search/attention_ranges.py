"""The paper's range search applied to the KV cache: static K and V ranges chosen against the attention output.

Objective: the squared error of the attention output (before o_proj) with K, V (and Q, P as configured) quantized,
against the full-precision attention, summed over the calibration calls recorded for one attention module. The
candidates are the SearchSpace's (`candidates`: multipliers of the MinMax range, or of its exponent bias), one
multiplier for the whole range tensor (per head / per channel ranges keep their MinMax proportions). K first, then V
with K's choice; the current range (MinMax, multiplier 1) is always a candidate, so the error never ends above
MinMax's.
"""

from __future__ import annotations

import torch
from torch import nn

from quant_layers.attention import AttentionInputs, AttentionQuant, TensorQuant
from utils.search.space import SearchSpace


def attention_error(module: nn.Module, state: AttentionQuant, records: list[AttentionInputs],
                    references: list[torch.Tensor]) -> float:
    """Sum over records of the squared error of state's attention output against the reference (float64 sum)."""
    total = 0.0
    for record, reference in zip(records, references):
        output = state(module, record.query, record.key, record.value, record.attention_mask, **record.kwargs)[0]
        total += float((output.float() - reference).square().sum(dtype=torch.float64))
    return total


def reference_outputs(module: nn.Module, base: AttentionQuant, records: list[AttentionInputs]) -> list[torch.Tensor]:
    """The full-precision attention outputs (float32) of the recorded calls."""
    full = AttentionQuant(base.base)
    return [full(module, r.query, r.key, r.value, r.attention_mask, **r.kwargs)[0].float() for r in records]


def search_kv_ranges(module: nn.Module, state: AttentionQuant, records: list[AttentionInputs],
                     space: SearchSpace) -> tuple[AttentionQuant, float, float]:
    """(state with searched static K and V ranges, error at the start, error at the end)."""
    references = reference_outputs(module, state, records)
    best_error = start_error = attention_error(module, state, records, references)
    for part in ("key", "value"):
        spec: TensorQuant | None = getattr(state, part)
        if spec is None or not spec.static:
            continue
        for candidate in space.candidates(spec.fmt, spec.max_value):
            trial = state.replace(**{part: TensorQuant(spec.fmt, spec.granularity, candidate)})
            error = attention_error(module, trial, records, references)
            if error < best_error:
                best_error, state = error, trial
    return state, start_error, best_error
