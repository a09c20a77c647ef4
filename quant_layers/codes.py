"""Codes and scales: the bits a quantized tensor is stored as, and back to exactly what `quantize` computes.

`encode(x, fmt, max_value)` returns an `Encoded`: one code per element and the scales; `decode(encoded)` gives
`quantize(x, fmt, max_value)` bit for bit, in x's dtype, except that a zero is always +0.0 (below). Every format of
the project: ExMy with a real-valued exponent bias, INT, and block-scaled formats (NVFP4, MX).

Codes (uint8 for formats of up to 8 bits; int32 for 9..16 bits), one per element, in x's shape:
- FP (ExMy): sign-magnitude, [sign bit][E exponent bits][M mantissa bits], sign first (unsigned formats: no sign
  bit). The value of a code on the standard grid (exponent bias 0, formats.py) is m * 2^(1-M) for exponent field 0
  (subnormals) and 2^e * (1 + m / 2^M) otherwise, negated by the sign bit: `code_table`. The magnitude code orders
  the magnitudes. The bias-0 grid is 2^b times the grid of bias b, so a code means the same bits under every bias:
  E2M1 codes are the OCP FP4 codes (OCP's bias 1: values half the table's), E4M3 codes the FP8 E4M3 bytes.
- INT: two's complement in the format's bits (INT4: 0..7 -> 0b0000..0b0111, -7..-1 -> 0b1001..0b1111). The
  restricted range never writes -2^(bits-1) (INT4: 0b1000).
- One zero: -0.0, and negative values that round to zero, get the +0 code (the FP code 0b1000 for -0 is never
  written). `quantize` returns -0.0 there, so decode(encode(x)) and quantize(x) are equal as numbers
  (torch.equal) and as bits up to the sign of zero. A 4-bit tensor thus holds at most 15 distinct codes per scale
  group.

Scales, named by what they are (float32 unless said), and the value of an element:
- ExMy / INT: `grid_inverse` u = max_value / grid_max (quantize.grid_inverse), max_value's shape (per tensor [],
  per row [rows, 1], per column [in]); value = fl32(table[code] * u).
- FP8-scaled blocks (NVFP4): `block_scale` [..., n / size] as torch.float8_e4m3fn (the E4M3 byte of the block
  scale), `tensor_scale` t = max(max_value, 1e-30) / (standard_max * S), max_value's shape, S =
  `BlockScaling.scale_max` (448; 256 for 4/6, whose per-block choice of 6 or 4 is in the block scale byte, so
  decoding needs nothing more); the block's range is R = fl32(fl32(standard_max * block_scale) * t) and value =
  fl32(table[code] * fl32(R / grid_max)), 0 where R = 0.
- E8M0-scaled blocks (MX): `block_exponent` [..., n / size] uint8, the E8M0 byte: scale 2^(byte - 127), byte 255
  = NaN (a block holding NaN or Inf decodes to NaN, as in quantize); value = fl32(table[code] * standard_max /
  grid_max) * 2^(byte - 127), exact.
These mirror quantize.py's `quantize` and `_quantize_blocks` operation by operation, with its own block-scale
helpers (`block_scales`, `block_scale_codes`, `block_range`).

Codes under frozen scales (a rounding that is not round to nearest, e.g. GPTQ's, quant_layers/gptq.py):
`encode_frozen(values, fmt, max_value, block_scale)` gives the codes of values already on the grid of the given
scales (quantize's max_value, and its block_scale encoding for block formats: int exponents k for power-of-two
scale formats, float32 block ranges R otherwise); `decode_frozen` gives back, bit for bit, what `quantize(x, fmt,
max_value, block_scale)` returns for an x that rounds to those values (the same operations as above, the
scales given instead of derived from x).

FPQ weights (LLM-FP4's per-column exponent shifts k, Eq. 8): `encode_fpq_weight` stores the codes of Q_w(W)
unfolded, the per-row `grid_inverse` and `channel_shift` k as int8; `decode_fpq_weight` returns
W_fold = Q_w(W) * 2^-k exactly as QuantLinear.set_quant_params computes it (docs/deployment.md).

4-bit codes pack two per byte: `pack_nibbles`, low nibble first.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from quant_layers.formats import E4M3FN, E8M0, QuantFormat
from quant_layers.quantize import (block_range, block_scale_codes, block_scales, block_tensor_scale, check_format,
                                   grid_inverse, grid_scale, round_to_grid, scale_code)

E8M0_NAN = 255  # the E8M0 byte of a NaN scale (OCP MX)
_FLOAT32_MANTISSA_BITS = 23


@dataclass(frozen=True, eq=False)
class Encoded:
    """A quantized tensor as codes and scales (see the module docstring for the layouts).

    fmt: the format; codes: one code per element (uint8, int32 above 8 bits), the tensor's shape; dtype: what
    `decode` returns (the encoded tensor's dtype). Scales, set by format: grid_inverse (ExMy, INT), block_scale and
    tensor_scale (FP8-scaled blocks), block_exponent (E8M0-scaled blocks). channel_shift: FPQ's int8 per-column
    shifts k of an `encode_fpq_weight` weight, else None.
    """

    fmt: QuantFormat
    codes: torch.Tensor
    dtype: torch.dtype
    grid_inverse: torch.Tensor | None = None
    block_scale: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None
    block_exponent: torch.Tensor | None = None
    channel_shift: torch.Tensor | None = None

    def __post_init__(self) -> None:
        block = self.fmt.block
        expected = ({"grid_inverse"} if block is None else {"block_exponent"} if block.power_of_two
                    else {"block_scale", "tensor_scale"})
        present = {name for name in ("grid_inverse", "block_scale", "tensor_scale", "block_exponent")
                   if getattr(self, name) is not None}
        if present != expected:
            raise ValueError(f"{self.fmt.name} is encoded with {sorted(expected)}, got {sorted(present)}")
        if self.codes.dtype != code_dtype(self.fmt):
            raise ValueError(f"{self.fmt.name} codes are {code_dtype(self.fmt)}, got {self.codes.dtype}")

    def to(self, device: torch.device | str) -> Encoded:
        """The same codes and scales with every tensor on device."""
        return dataclasses.replace(self, **{field.name: getattr(self, field.name).to(device)
                                            for field in dataclasses.fields(self)
                                            if isinstance(getattr(self, field.name), torch.Tensor)})


def code_dtype(fmt: QuantFormat) -> torch.dtype:
    """The dtype of fmt's codes: uint8 up to 8 bits, int32 above."""
    return torch.uint8 if fmt.bits <= 8 else torch.int32


@functools.lru_cache(maxsize=None)
def _code_table(fmt: QuantFormat) -> torch.Tensor:
    codes = torch.arange(2**fmt.bits, dtype=torch.int64)
    if fmt.kind == "int":  # two's complement
        return torch.where(codes < 2 ** (fmt.bits - 1), codes, codes - 2**fmt.bits).to(torch.float32)
    magnitude_bits = fmt.bits - fmt.signed
    magnitude = codes % 2**magnitude_bits
    exponent, mantissa = magnitude // 2**fmt.mantissa_bits, magnitude % 2**fmt.mantissa_bits
    subnormal = torch.ldexp(mantissa.double(), torch.tensor(1 - fmt.mantissa_bits))
    normal = torch.ldexp((mantissa + 2**fmt.mantissa_bits).double(), exponent - fmt.mantissa_bits)
    values = torch.where(exponent == 0, subnormal, normal)  # float64: exact, few significant bits
    values = torch.where(codes >= 2**magnitude_bits, -values, values)
    values[magnitude >= 2**magnitude_bits - fmt.nan_codes] = float("nan")
    return values.to(torch.float32)  # exact for E <= 7 (largest 2^127 (2 - 2^-M))


def code_table(fmt: QuantFormat) -> torch.Tensor:
    """The standard-grid value (exponent bias 0) of every code of fmt's element format: float32 [2^bits], indexed by
    code; NaN codes are NaN. quantize's values are table[code] * u (module docstring)."""
    element = fmt.element
    check_format(element)
    return _code_table(element).clone()


def _element_codes(grid: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Codes of standard-grid values (float32, on fmt's grid, as `round_to_grid` returns them); zeros of either sign
    get code 0. FP: from the float32 bits, |g| = 2^e (1 + f) with e >= 1 is exponent field e and the top M bits of
    f; |g| < 2 is the subnormal m * 2^(1-M), m = |g| 2^(M-1)."""
    if fmt.kind == "int":
        return grid.to(torch.int32).bitwise_and_(2**fmt.bits - 1).to(code_dtype(fmt))
    mantissa_bits = fmt.mantissa_bits
    magnitude = grid.abs()
    bits = magnitude.view(torch.int32)
    exponent = (bits >> _FLOAT32_MANTISSA_BITS) - 127
    normal = (exponent << mantissa_bits) | ((bits & (2**_FLOAT32_MANTISSA_BITS - 1))
                                            >> (_FLOAT32_MANTISSA_BITS - mantissa_bits))
    subnormal = torch.ldexp(magnitude, torch.tensor(mantissa_bits - 1, device=magnitude.device)).to(torch.int32)
    codes = torch.where(exponent >= 1, normal, subnormal)
    if fmt.signed:
        codes |= (grid < 0).to(torch.int32) << (fmt.bits - 1)
    return codes.to(code_dtype(fmt))


def _range_shape(max_value: torch.Tensor, x: torch.Tensor, blocks: bool, name: str = "max_value") -> torch.Tensor:
    """max_value (or a block clip, `name`) as quantize broadcasts it. One tensor is stored, so the range may not
    broadcast x to a larger shape (the search's candidates); for blocks it is per tensor [] or per row [..., 1],
    which becomes [..., 1, 1]."""
    if (torch.broadcast_shapes(x.shape, max_value.shape) != x.shape
            or blocks and max_value.dim() > 0 and max_value.shape[-1] != 1):
        raise ValueError(f"{name} {tuple(max_value.shape)} must broadcast to x {tuple(x.shape)} without enlarging "
                         f"it{' and be per tensor or per row [..., 1]' if blocks else ''}")
    return max_value.unsqueeze(-1) if blocks and max_value.dim() > 0 else max_value


def encode(x: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float,
           block_scale: torch.Tensor | None = None, clip: torch.Tensor | float | None = None) -> Encoded:
    """Codes and scales of quantize(x, fmt, max_value, block_scale, clip) (any fmt, layouts in the module docstring).

    x: floating point, any shape (block formats: last dimension a multiple of the block size), no NaN except in
    MX blocks (which become NaN blocks); max_value > 0, broadcastable to x without enlarging it (per tensor, per
    row [..., 1], per column [n]); unused by MX formats. block_scale (block formats only): explicit block scales
    [..., n / size] in quantize's encoding (MX: integer exponents k; NVFP4: float32 block ranges top * code * t,
    which must be exactly that for an E4M3 code and the t of max_value); None: each block's from its maximum.
    clip: block formats' multiplier of the block maxima, per tensor or per row like max_value (None: 1; not with
    block_scale). Returns codes in x's shape and float32 scales in max_value's shape (block scales [..., n / size]);
    decode returns x's dtype.
    """
    if not x.is_floating_point():
        raise TypeError(f"encode expects a floating-point tensor, got {x.dtype}")
    check_format(fmt)
    if fmt.block is not None and fmt.block.scale_format not in (E4M3FN, E8M0):
        raise ValueError(f"block scales in {fmt.block.scale_format.name} have no byte layout here (E4M3FN, E8M0)")
    max_value = torch.as_tensor(max_value, dtype=torch.float32, device=x.device)
    mx = fmt.block is not None and fmt.block.power_of_two
    if not mx and torch.isnan(x).any():
        raise ValueError(f"x holds NaN, which has no {fmt.element.name} code")
    range_value = _range_shape(max_value, x, fmt.block is not None)
    if clip is not None:
        if fmt.block is None:
            raise ValueError(f"clip needs a block-scaled format, got {fmt.name}")
        if block_scale is not None:
            raise ValueError("clip multiplies the data's block maxima: it does not combine with explicit block_scale")
        clip = _range_shape(torch.as_tensor(clip, dtype=torch.float32, device=x.device), x, True, "clip")
    if fmt.block is None:
        if block_scale is not None:
            raise ValueError(f"block_scale needs a block-scaled format, got {fmt.name}")
        grid = round_to_grid(x, fmt, grid_scale(fmt, range_value, x.device))
        return Encoded(fmt, _element_codes(grid, fmt), x.dtype, grid_inverse=grid_inverse(fmt, max_value, x.device))
    size, element = fmt.block.size, fmt.element
    if x.shape[-1] % size:
        raise ValueError(f"{fmt.name} needs the last dimension ({x.shape[-1]}) to be a multiple of {size}")
    blocks = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // size, size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if block_scale is not None and tuple(block_scale.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"block_scale {tuple(block_scale.shape)} must have x's blocks' shape "
                         f"{tuple(blocks.shape[:-1])}")
    if mx:  # the int32 exponents k; block values x 2^-k on the element's grid of range standard_max
        scales = (block_scales(amax, fmt, range_value, clip=clip) if block_scale is None
                  else block_scale.to(device=x.device, dtype=torch.int32).unsqueeze(-1))
        shifted = torch.ldexp(blocks, -scales)
        grid = round_to_grid(shifted, element, grid_scale(element, element.standard_max, x.device))
        finite = torch.isfinite(amax)
        codes = _element_codes(grid.masked_fill_(~finite, 0.0), element)
        byte = torch.where(finite, scales + fmt.block.scale_format.standard_bias, E8M0_NAN).to(torch.uint8)
        return Encoded(fmt, codes.reshape(x.shape), x.dtype, block_exponent=byte.squeeze(-1))
    if block_scale is None:
        scale_code, tensor_scale = block_scale_codes(amax, fmt, range_value, blocks, clip)
    else:
        scale_code, tensor_scale = _scale_codes_of_ranges(block_scale.to(x.device).unsqueeze(-1), fmt, range_value)
    scales = block_range(fmt, scale_code, tensor_scale)
    grid = round_to_grid(blocks, element, grid_scale(element, scales, x.device)).masked_fill_(scales == 0, 0.0)
    return Encoded(fmt, _element_codes(grid, element).reshape(x.shape), x.dtype,
                   block_scale=scale_code.squeeze(-1).to(torch.float8_e4m3fn),
                   tensor_scale=tensor_scale.squeeze(-1) if tensor_scale.dim() > 0 else tensor_scale)


def _range_scale_code(ranges: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(code, t) with code = Q_s(R / (top t)): the scale byte of a block whose range should be R [..., blocks, 1],
    rounded as block_scale_codes rounds a block maximum for the target top, whatever the format's other maxima (Four
    Over Six's choice between 6 and 4 is made when the range is chosen, not here)."""
    tensor_scale = block_tensor_scale(fmt, max_value, ranges.device)
    return scale_code(ranges, fmt, fmt.standard_max, tensor_scale), tensor_scale


def _scale_codes_of_ranges(ranges: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(code, t) of explicit NVFP4 block ranges R = top * code * t [..., blocks, 1]: the code is R / (top t) rounded
    in the scale format, as block_scale_codes rounds a block maximum; ValueError unless it gives back R exactly."""
    ranges = ranges.to(torch.float32)
    scale_code, tensor_scale = _range_scale_code(ranges, fmt, max_value)
    if not torch.equal(block_range(fmt, scale_code, tensor_scale), ranges):
        raise ValueError(f"block_scale is not top * code * t for {fmt.block.scale_format.name} codes under "
                         "max_value's tensor scale t")
    return scale_code, tensor_scale


def encode_quantized(q: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float,
                     block_scale: torch.Tensor | None = None) -> Encoded:
    """Codes and scales of q = quantize(x, fmt, max_value, block_scale) when only q is at hand (a weight after
    QuantLinear.set_quant_params): decode of the result equals q (NaN where q is NaN, a zero as +0.0).

    Element formats, explicit block scales and power-of-two block scales: encode(q, ...), since every value
    of q is a grid point its own scale maps to itself, and an MX block's quantized maximum lies in [4, 6] 2^k
    (E2M1), giving back its exponent k. NVFP4 block scales taken from the data need not come back: a block whose
    E4M3 scale is a subnormal can quantize to a smaller maximum (amax / (6 t) = 0.55 2^-9 gets scale 2^-9 and
    maximum 3 2^-9, whose own scale rounds to 0). Such a block takes the first byte, trying each positive
    element value g from the largest as its maximum (R = amax_q grid_max / g), that gives it back.
    ValueError if no byte does (q is not such a quantization).
    """
    encoded = encode(q, fmt, max_value, block_scale)
    if fmt.block is not None and not fmt.block.power_of_two and block_scale is None:
        encoded = _repair_block_scales(q, encoded, max_value)
    wrong = ~_same_values(decode(encoded), q)
    if wrong.any():
        index = tuple(int(i) for i in wrong.nonzero()[0])
        raise ValueError(f"{fmt.name}: the tensor is not a quantization to this format and range (element {index}: "
                         f"{float(q[index])!r} has no code)")
    return encoded


def _same_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise a == b, NaN equal to NaN."""
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


def _repair_block_scales(q: torch.Tensor, encoded: Encoded, max_value: torch.Tensor | float) -> Encoded:
    """encode_quantized's NVFP4 case: blocks that do not decode to q take the first candidate byte that does."""
    fmt, size = encoded.fmt, encoded.fmt.block.size
    blocks_shape = (*q.shape[:-1], q.shape[-1] // size, size)
    wrong = ~_same_values(decode(encoded), q).reshape(blocks_shape).all(-1)
    if not wrong.any():
        return encoded
    codes = encoded.codes.reshape(blocks_shape).clone()
    scale_bytes = encoded.block_scale.view(torch.uint8).clone()  # float8 has no masked writes
    max_value = torch.as_tensor(max_value, dtype=torch.float32, device=q.device)
    range_value = max_value.unsqueeze(-1) if max_value.dim() > 0 else max_value
    amax = q.to(torch.float32).reshape(blocks_shape).abs().amax(-1, keepdim=True)
    element = fmt.element
    table = _code_table(element)
    for g in table[table > 0].unique().flip(0).tolist():
        code, tensor_scale = _range_scale_code(amax * (element.grid_max / g), fmt, range_value)
        candidate = encode(q, fmt, max_value, block_range(fmt, code, tensor_scale).squeeze(-1))
        fits = wrong & _same_values(decode(candidate), q).reshape(blocks_shape).all(-1)
        codes[fits] = candidate.codes.reshape(blocks_shape)[fits]
        scale_bytes[fits] = candidate.block_scale.view(torch.uint8)[fits]
        wrong &= ~fits
        if not wrong.any():
            break
    return dataclasses.replace(encoded, codes=codes.reshape(q.shape), block_scale=scale_bytes.view(torch.float8_e4m3fn))


def decode(encoded: Encoded) -> torch.Tensor:
    """The values of the codes: quantize(x, fmt, max_value) of the encoded x, in its dtype (a zero is +0.0).

    An FPQ weight (`channel_shift` set) decodes to Q_w(W), unfolded; `decode_fpq_weight` folds the shifts in.
    """
    fmt, codes = encoded.fmt, encoded.codes
    table = _code_table(fmt.element).to(codes.device)
    grid = table[codes.long()]
    if fmt.block is None:
        return grid.mul_(encoded.grid_inverse).to(encoded.dtype)
    size, element = fmt.block.size, fmt.element
    grid = grid.reshape(*codes.shape[:-1], codes.shape[-1] // size, size)
    if fmt.block.power_of_two:
        byte = encoded.block_exponent.unsqueeze(-1)
        exponent = byte.to(torch.int32) - fmt.block.scale_format.standard_bias
        values = torch.ldexp(grid.mul_(grid_inverse(element, element.standard_max, codes.device)), exponent)
        values.masked_fill_(byte == E8M0_NAN, float("nan"))
    else:
        tensor_scale = encoded.tensor_scale
        tensor_scale = tensor_scale.unsqueeze(-1) if tensor_scale.dim() > 0 else tensor_scale
        ranges = block_range(fmt, encoded.block_scale.unsqueeze(-1).to(torch.float32), tensor_scale)
        values = grid.mul_(grid_inverse(element, ranges, codes.device)).masked_fill_(ranges == 0, 0.0)
    return values.reshape(codes.shape).to(encoded.dtype)


def _frozen_blocks(x: torch.Tensor, fmt: QuantFormat, block_scale: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as blocks [..., n / size, size], block_scale as [..., n / size, 1]: int32 exponents k for power-of-two scale
    formats, float32 ranges R otherwise), as quantize's `_quantize_blocks` uses an explicit block_scale."""
    size = fmt.block.size
    if block_scale is None:
        raise ValueError(f"{fmt.name} codes under frozen scales need the block_scale they were rounded with")
    if x.shape[-1] % size or tuple(block_scale.shape) != (*x.shape[:-1], x.shape[-1] // size):
        raise ValueError(f"{fmt.name}: block_scale {tuple(block_scale.shape)} does not fit {tuple(x.shape)} in blocks "
                         f"of {size}")
    scale_dtype = torch.int32 if fmt.block.power_of_two else torch.float32
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
    return blocks, block_scale.to(device=x.device, dtype=scale_dtype).unsqueeze(-1)


def encode_frozen(values: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float,
                  block_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [values' shape] (uint8, int32 above 8 bits) of values on the grid of frozen scales (module docstring).

    values: quantized values [..., n] (any float dtype), e.g. GPTQ's; max_value: quantize's range, broadcastable to
    values (ExMy, INT: per row [..., 1]); block_scale [..., n / size]: the block formats' frozen scales (required
    there; max_value is then unused). The standard-grid value of an element is recovered by rounding it once more,
    g = round_to_grid(v * s) (v = fl32(g u) and s u = 1 within 2 ulp, far below a grid step). ValueError where the
    values are not exactly `decode_frozen` of their codes (not on the grid of these scales).
    """
    check_format(fmt)
    x = values.to(torch.float32)
    if fmt.block is None:
        if block_scale is not None:
            raise ValueError(f"block_scale needs a block-scaled format, got {fmt.name}")
        grid = round_to_grid(x, fmt, grid_scale(fmt, max_value, x.device))
        codes = _element_codes(grid, fmt)
    else:
        element = fmt.element
        blocks, scales = _frozen_blocks(x, fmt, block_scale)
        if fmt.block.power_of_two:  # x 2^-k is exact
            grid = round_to_grid(torch.ldexp(blocks, -scales), element,
                                 grid_scale(element, element.standard_max, x.device))
        else:
            grid = round_to_grid(blocks, element, grid_scale(element, scales, x.device)).masked_fill_(scales == 0, 0.0)
        codes = _element_codes(grid, element).reshape(x.shape)
    if not torch.equal(decode_frozen(codes, fmt, max_value, block_scale), x):
        raise ValueError(f"values are not on the {fmt.name} grid of the given scales")
    return codes


def decode_frozen(codes: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float,
                  block_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of codes [..., n] under frozen scales, in dtype: quantize's operations with the scales given.

    ExMy, INT: fl32(table[code] * u), u = max_value / grid_max; block ranges R (NVFP4): fl32(table[code] * fl32(R /
    grid_max)), 0 where R = 0; exponents k (MX): fl32(table[code] * standard_max / grid_max) * 2^k. Equal (torch.equal)
    to quantize(x, fmt, max_value, block_scale) for every x that rounds to these codes; a zero is +0.0.
    """
    check_format(fmt)
    table = _code_table(fmt.element).to(codes.device)
    grid = table[codes.long()]
    if fmt.block is None:
        if block_scale is not None:
            raise ValueError(f"block_scale needs a block-scaled format, got {fmt.name}")
        return grid.mul_(grid_inverse(fmt, max_value, codes.device)).to(dtype)
    element = fmt.element
    blocks, scales = _frozen_blocks(grid, fmt, block_scale)
    if fmt.block.power_of_two:
        values = torch.ldexp(blocks.mul_(grid_inverse(element, element.standard_max, codes.device)), scales)
    else:
        values = blocks.mul_(grid_inverse(element, scales, codes.device)).masked_fill_(scales == 0, 0.0)
    return values.reshape(codes.shape).to(dtype)


def encode_fpq_weight(weight: torch.Tensor, fmt: QuantFormat, row_max_value: torch.Tensor,
                      channel_shift: torch.Tensor) -> Encoded:
    """An FPQ weight [out, in]: the codes of Q_w(W) with per-row ranges row_max_value [out] (unfolded, so no value
    leaves the row's grid), its grid_inverse [out, 1] and the per-column shifts k [in] (integers, stored as int8)."""
    if weight.dim() != 2 or row_max_value.shape != weight.shape[:1] or channel_shift.shape != weight.shape[1:]:
        raise ValueError(f"weight [out, in], row_max_value [out], channel_shift [in]; got {tuple(weight.shape)}, "
                         f"{tuple(row_max_value.shape)}, {tuple(channel_shift.shape)}")
    shift_int8 = channel_shift.to(torch.int8)
    if not torch.equal(shift_int8.to(channel_shift.dtype), channel_shift):
        raise ValueError("channel_shift must hold integers in -128..127")
    encoded = encode(weight, fmt, row_max_value.to(weight.device).view(-1, 1))
    return dataclasses.replace(encoded, channel_shift=shift_int8.to(weight.device))


def decode_fpq_weight(encoded: Encoded) -> torch.Tensor:
    """W_fold = Q_w(W) * 2^-k [out, in] in the weight's dtype, the operations of QuantLinear.set_quant_params."""
    if encoded.channel_shift is None:
        raise ValueError("decode_fpq_weight needs an encode_fpq_weight result (channel_shift is None)")
    weight = decode(encoded)
    shift = encoded.channel_shift.to(device=weight.device, dtype=torch.float32)
    return (weight.float() * torch.exp2(-shift)).to(weight.dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dimension (even length): byte i = codes[2i] | codes[2i+1] << 4,
    low nibble first. uint8 [..., n] -> uint8 [..., n / 2]."""
    if codes.dtype != torch.uint8 or codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles takes uint8 codes with an even last dimension, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_nibbles takes 4-bit codes (0..15), got {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [..., n / 2] -> uint8 [..., n]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_nibbles takes uint8, got {packed.dtype}")
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def stored_bits(encoded: Encoded) -> int:
    """Bits an Encoded takes as stored: codes (4-bit codes packed two per byte, others as their dtype) plus every
    scale and shift tensor."""
    code_bits = 4 if encoded.fmt.bits == 4 else encoded.codes.element_size() * 8
    total = code_bits * encoded.codes.numel()
    for name in ("grid_inverse", "block_scale", "tensor_scale", "block_exponent", "channel_shift"):
        tensor = getattr(encoded, name)
        if tensor is not None:
            total += tensor.numel() * tensor.element_size() * 8
    return total


__all__ = ["E8M0_NAN", "Encoded", "code_dtype", "code_table", "decode", "decode_fpq_weight", "decode_frozen",
           "encode", "encode_fpq_weight", "encode_frozen", "encode_quantized", "pack_nibbles", "stored_bits",
           "unpack_nibbles"]
