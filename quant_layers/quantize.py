"""The one quantizer: fake-quantize a tensor to any `QuantFormat` with a clipping range `max_value`.

Semantics (every format, every caller):
- The clipping range is `max_value` (> 0), a tensor broadcastable to x: per tensor (shape []),
  per output channel ([out, 1]) or per input channel ([in]). For FP formats it is the exponent bias in
  other units: b = log2(grid_max / max_value) (see formats.py), so a real-valued bias is a real scale.
- x is scaled onto the format's standard grid, y = x * grid_max / max_value, saturated to
  +-grid_max, rounded to the nearest grid point with ties to even, and scaled back.
- FP grid (LLM-FP4 eq. 2-4 with bias 0): e = max(floor(log2|y|), 1), step = 2^(e - M), so exponent
  code 0 holds the subnormals and every code is a number (no inf / NaN codes). Exponent bits up to 7
  fit float32 arithmetic.
- INT grid: step 1, saturating at +-(2^(bits-1) - 1).
- Computed in float32; the result has x's dtype. NaN stays NaN.
"""

from __future__ import annotations

import torch

from quant_layers.formats import QuantFormat


_EXPONENT_FIELD = 0x7F800000  # float32 bits of the biased exponent
_EXPONENT_ONE = 128 << 23  # biased exponent field of 2^1


def _round_to_standard_grid_(y: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round y (float32, already inside +-grid_max) in place to fmt's standard grid, ties to even.

    FP: step = 2^(max(floor(log2|y|), 1) - M), built directly as float32 bits from y's exponent field
    (exact; zero and float32 subnormals fall in the clamp at exponent 1).
    """
    if fmt.kind == "int":
        return y.round_()
    step_bits = y.view(torch.int32).bitwise_and(_EXPONENT_FIELD)
    step_bits.clamp_(min=_EXPONENT_ONE).sub_(fmt.mantissa_bits << 23)
    step = step_bits.view(torch.float32)
    return y.div_(step).round_().mul_(step)


def quantize(x: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float) -> torch.Tensor:
    """Fake-quantize x (any shape, float dtype) to fmt with clipping range max_value (broadcastable, > 0).

    Returns q(x) = Q(x * s) / s with s = grid_max / max_value and Q the format's standard grid;
    same shape and dtype as x. x is never modified.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    to_grid = fmt.grid_max / torch.as_tensor(max_value, dtype=torch.float32, device=x.device)
    y = x.to(torch.float32) * to_grid
    y.clamp_(-fmt.grid_max, fmt.grid_max)
    return _round_to_standard_grid_(y, fmt).div_(to_grid).to(x.dtype)
