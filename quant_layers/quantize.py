"""The one quantizer: fake-quantize a tensor to any `QuantFormat` with a clipping range `max_value`.

Semantics (every format, every caller):
- The clipping range is `max_value` (> 0), a tensor broadcastable to x: per tensor (shape []),
  per output channel ([out, 1]) or per input channel ([in]). For FP formats it is the exponent bias in
  other units: b = log2(grid_max / max_value) (see formats.py), so a real-valued bias is a real scale.
- x is scaled onto the format's standard grid, y = x * grid_max / max_value, saturated to
  +-grid_max, rounded to the nearest grid point with ties to even, and scaled back.
- FP grid (LLM-FP4 eq. 2-4 with bias 0): e = max(floor(log2|y|), 1), step = 2^(e - M), so exponent
  code 0 holds the subnormals and every code is a number (no inf / NaN codes).
- INT grid: step 1, saturating at +-(2^(bits-1) - 1).
- Computed in float32; the result has x's dtype. NaN stays NaN.
"""

from __future__ import annotations

import torch

from quant_layers.formats import QuantFormat


def _round_to_standard_grid(y: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Nearest point (ties to even) of fmt's standard grid, y float32 already inside +-grid_max."""
    if fmt.kind == "int":
        return torch.round(y)
    _, exponent = torch.frexp(y)  # |y| = m * 2^exponent with m in [0.5, 1): floor(log2|y|) = exponent - 1
    step_log2 = (exponent - 1).clamp(min=1) - fmt.mantissa_bits
    step = torch.exp2(step_log2.to(torch.float32))  # exact: integer powers of two
    return torch.round(y / step) * step


def quantize(x: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float) -> torch.Tensor:
    """Fake-quantize x (any shape, float dtype) to fmt with clipping range max_value (broadcastable, > 0).

    Returns q(x) = Q(x * s) / s with s = grid_max / max_value and Q the format's standard grid;
    same shape and dtype as x.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    x32 = x.to(torch.float32)
    to_grid = fmt.grid_max / torch.as_tensor(max_value, dtype=torch.float32, device=x.device)
    y = (x32 * to_grid).clamp(-fmt.grid_max, fmt.grid_max)
    return (_round_to_standard_grid(y, fmt) / to_grid).to(x.dtype)
