"""One tensor range for the Linears that share an input (q/k/v, gate/up): what fused serving kernels require, one
float32 tensor scale for the fused weight and one quantizer for the shared input (NVFP4's tensor scale t is
max_value / (6 * 448), quant_layers/formats.py). Calibration calls it for configs with share_input_ranges
(utils/quant_calib.py `_calibrate_group`), between the range search and the further steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from quant_layers.modules import QuantParams


def share_tensor_ranges(states: Sequence[QuantParams]) -> list[QuantParams]:
    """The states of Linears sharing an input, set to one range per side: every weight row and the input take the
    largest range chosen among them, and a block-scaled input the largest block clip (the least clipping; None
    counts as 1, and stays None where every state has None). mse becomes NaN (no longer measured: recompute it with
    each Linear's problem); the other fields are kept.

    ValueError where one range cannot serve them: formats or channel shifts that differ, per-row weight ranges, or
    explicit block scales (BlockScaleStep's, chosen under their own tensor scale).
    """
    if not states:
        return []
    first = states[0]
    if any((s.weight_format, s.act_format) != (first.weight_format, first.act_format) for s in states):
        raise ValueError("Linears sharing a tensor range need the same weight and activation formats")
    if any(s.weight_block_scale is not None for s in states):
        raise ValueError("explicit block scales were chosen under their own tensor scale: share ranges before "
                         "searching block scales")
    shifts = [s.act_channel_shift for s in states]
    if any((a is None) != (shifts[0] is None) or (a is not None and not torch.equal(a, shifts[0])) for a in shifts):
        raise ValueError("Linears sharing an input quantizer need the same channel shifts")
    weight_max = act_max = clip = None
    if first.weight_format is not None:
        if any(not bool((s.weight_max_value == s.weight_max_value.reshape(-1)[0]).all()) for s in states):
            raise ValueError("sharing a tensor range needs per-tensor weight ranges (every row's equal)")
        weight_max = max(float(s.weight_max_value.reshape(-1)[0]) for s in states)
    if first.act_format is not None:
        act_max = max(float(s.act_max_value) for s in states)
        if any(s.act_block_clip is not None for s in states):
            clip = max(1.0 if s.act_block_clip is None else float(s.act_block_clip) for s in states)
    shared = []
    for s in states:
        changes = {"mse": float("nan")}
        if weight_max is not None:
            changes["weight_max_value"] = torch.full_like(s.weight_max_value, weight_max)
        if act_max is not None:
            changes["act_max_value"] = torch.full_like(s.act_max_value, act_max)
            changes["act_block_clip"] = None if clip is None else torch.tensor(clip, dtype=torch.float32,
                                                                                 device=s.act_max_value.device)
        shared.append(dataclasses.replace(s, **changes))
    return shared
