"""Number formats as data.

A format is a frozen `QuantFormat`: a kind ("fp" or "int"), bit counts, whether it has a sign bit, how many of
its top codes are NaN, and optionally a `BlockScaling`. Nothing else about a format is written as code: its
standard grid, its largest magnitude and its exponent bias all follow from the fields.

FP (optional sign + E exponent bits + M mantissa bits), LLM-FP4's convention: exponent code 0 holds the
subnormals, the other codes are normal numbers, and the top `nan_codes` magnitude codes are NaN (0 for the
element formats of this project: every code is a number; 1 for OCP FP8 E4M3 and E8M0). A real-valued exponent
bias b sets the range:

    max_value = grid_max * 2^-b            b = log2(grid_max) - log2(max_value)

where grid_max, the largest value at b = 0, is (2 - 2^-M) * 2^(2^E - 1) without NaN codes. The standard
(OCP / IEEE) bias is 2^(E-1) - 1: E2M1 reaches 6, FP8 E4M3 with its NaN code 448, E8M0 2^127 (`standard_max`).
INT (symmetric, restricted): integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1] times max_value / grid_max.

Block-scaled formats (microscaling) are an element format plus `BlockScaling(size, scale_format, tensor_scale)`:
`size` consecutive values along the last dimension share one scale from their absolute maximum amax, computed
at run time (quant_layers/quantize.py):
- power-of-two scale formats (no mantissa bits: E8M0, OCP MX v1.0): scale = 2^(floor(log2 amax) - emax), emax =
  floor(log2 standard_max) of the element (2 for E2M1), clamped to the scale format's exponents [-bias, emax_s];
  the block's range is standard_max * scale. MXFP4 = E2M1 in blocks of 32.
- other scale formats (FP8 E4M3, NVIDIA NVFP4): the block scale is amax / (standard_max * t) rounded to nearest
  in the scale format (saturating), under one float32 tensor scale t = tensor max / (standard_max *
  scale standard_max); the block's range is standard_max * scale * t. NVFP4 = E2M1 in blocks of 16.
  With `maxima` (Four Over Six, "4/6": (6, 4)), each block's amax is scaled to whichever listed element value m
  gives the block the lower squared error (scale = amax / (m t)), and t = tensor max / (standard_max * scale_max)
  with `BlockScaling.scale_max` (256 for 4/6) so that the largest scale, amax / (4 t), stays within E4M3's 448.
Element grids keep this project's convention (no NaN codes), so MXFP8's E4M3 elements reach 480, not 448.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

FLOAT32_MAX_EXPONENT_BITS = 7  # E <= 7: every grid value, scale and step of the quantizer is a float32 number


@dataclass(frozen=True)
class BlockScaling:
    """`size` consecutive values along the last dimension share a scale in `scale_format`; with `tensor_scale`
    the block scales sit under one float32 scale per tensor (NVFP4).

    maxima: the element values a block's absolute maximum may be scaled to, each block taking the one with the
    lowest squared error (ties: the first listed); () = the element format's largest value only (OCP MX, NVFP4).
    Four Over Six is (6.0, 4.0). Scale formats with mantissa bits only (not E8M0's powers of two).
    """

    size: int
    scale_format: "QuantFormat"
    tensor_scale: bool = False
    maxima: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a block needs at least one element, got size {self.size}")
        if self.scale_format.kind != "fp" or self.scale_format.block is not None:
            raise ValueError(f"block scales need an FP format without blocks, got {self.scale_format.name}")
        maxima = tuple(float(m) for m in self.maxima)
        if any(not (math.isfinite(m) and m > 0) for m in maxima) or len(set(maxima)) != len(maxima):
            raise ValueError(f"block maxima must be distinct positive numbers, got {self.maxima}")
        if maxima and self.power_of_two:
            raise ValueError("block maxima need a scale format with mantissa bits (power-of-two scales follow the OCP "
                             "MX rule)")
        object.__setattr__(self, "maxima", maxima)

    def targets(self, element_max: float) -> tuple[float, ...]:
        """The element values a block's maximum may be scaled to: `maxima`, or (element_max,)."""
        return self.maxima or (element_max,)

    def scale_max(self, element_max: float) -> float:
        """S, the block scale of a block holding the tensor's maximum scaled to element_max: the tensor scale is
        t = tensor max / (element_max * S). The scale format's largest value (E4M3: 448) when every target is
        element_max; otherwise the largest power of two whose largest block scale, S * element_max / min(targets),
        stays within it: 4/6 with E4M3, 2^floor(log2(448 * 4 / 6)) = 256, so the block scaled to 4 reaches 384."""
        top = self.scale_format.standard_max
        headroom = element_max / min(self.targets(element_max))
        if headroom <= 1:
            return top
        return math.ldexp(1.0, math.frexp(top / headroom)[1] - 1)

    @property
    def maxima_name(self) -> str:
        """'' or '/max6,4', the suffix of a format name with maxima."""
        return "/max" + ",".join(_number_name(m) for m in self.maxima) if self.maxima else ""

    @property
    def power_of_two(self) -> bool:
        """Scales are powers of two (no mantissa bits): the OCP MX rule applies."""
        return self.scale_format.mantissa_bits == 0

    @property
    def scale_name(self) -> str:
        """'e8m0', 'e4m3' (with its tensor scale), as in format names like 'E4M3/b32/e8m0'."""
        for name, known in SCALE_FORMATS.items():
            if known == (self.scale_format, self.tensor_scale):
                return name
        return self.scale_format.name.lower() + ("+tensor" if self.tensor_scale else "")


@dataclass(frozen=True)
class QuantFormat:
    """A number format.

    kind: "fp" (optional sign, `exponent_bits`, mantissa = the rest) or "int" (symmetric signed integer).
    signed: a sign bit (unsigned FP formats hold magnitudes, e.g. E8M0 block scales).
    nan_codes: how many of the top magnitude codes are NaN (FP8 E4M3: 1, so its largest value is 448, not 480).
    block: block scaling (NVFP4, MX), or None.
    """

    kind: str
    bits: int
    exponent_bits: int = 0
    signed: bool = True
    nan_codes: int = 0
    block: BlockScaling | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fp", "int"):
            raise ValueError(f"format kind must be 'fp' or 'int', got {self.kind!r}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"format bits must be in 2..16, got {self.bits}")
        magnitude_bits = self.bits - self.signed
        if self.kind == "fp" and not 1 <= self.exponent_bits <= min(magnitude_bits, 8):
            raise ValueError(f"FP{self.bits} needs 1..{min(magnitude_bits, 8)} exponent bits, got {self.exponent_bits}")
        if self.kind == "int" and (self.exponent_bits != 0 or not self.signed or self.nan_codes):
            raise ValueError("INT formats are signed and have no exponent bits or NaN codes")
        if not 0 <= self.nan_codes < 2**magnitude_bits - 1:
            raise ValueError(f"nan_codes must leave numbers besides zero, got {self.nan_codes}")
        if self.block is not None and self.block.maxima:
            if max(self.block.maxima) > self.standard_max:
                raise ValueError(f"block maxima {self.block.maxima} exceed the element's largest value "
                                 f"{self.standard_max:g}")
            if self.block.maxima == (self.standard_max,):  # one spelling of the standard rule: equal formats, names
                object.__setattr__(self, "block", dataclasses.replace(self.block, maxima=()))

    @property
    def element(self) -> "QuantFormat":
        """The format of one element (no block scaling)."""
        return dataclasses.replace(self, block=None)

    @property
    def mantissa_bits(self) -> int:
        """Stored fraction bits (sign and implicit leading 1 not counted); 0 for INT."""
        return self.bits - self.signed - self.exponent_bits if self.kind == "fp" else 0

    @property
    def grid_max(self) -> float:
        """Largest magnitude of the standard grid: the top non-NaN code with exponent bias 0, or the largest INT."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        top_code = 2 ** (self.exponent_bits + self.mantissa_bits) - 1 - self.nan_codes
        exponent, mantissa = divmod(top_code, 2**self.mantissa_bits)
        fraction = mantissa / 2**self.mantissa_bits
        return math.ldexp(1 + fraction, exponent) if exponent else math.ldexp(fraction, 1)

    @property
    def standard_bias(self) -> int:
        """The OCP / IEEE exponent bias 2^(E-1) - 1 (0 for INT)."""
        return 2 ** (self.exponent_bits - 1) - 1 if self.kind == "fp" else 0

    @property
    def standard_max(self) -> float:
        """Largest value under the standard bias: 6 for E2M1, 448 for E4M3 with its NaN code; INT: grid_max."""
        return math.ldexp(self.grid_max, -self.standard_bias)

    @property
    def max_exponent(self) -> int:
        """floor(log2(standard_max)): OCP MX's emax of an element format (2 for E2M1)."""
        return math.frexp(self.standard_max)[1] - 1

    @property
    def has_range(self) -> bool:
        """Whether `quantize` uses max_value: every format but power-of-two block scales (MX), whose scales come
        from the data alone."""
        return self.block is None or not self.block.power_of_two

    @property
    def float32_error(self) -> str | None:
        """Why the quantizer cannot compute this format in float32 arithmetic, or None."""
        if self.kind == "fp" and self.exponent_bits > FLOAT32_MAX_EXPONENT_BITS:
            return (f"{self.name} has {self.exponent_bits} exponent bits: its grid does not fit float32 arithmetic "
                    f"(at most {FLOAT32_MAX_EXPONENT_BITS})")
        return None

    @property
    def name(self) -> str:
        """'E2M1', 'INT4', 'NVFP4', 'MXFP4', element/b<block>/<scale> for other block formats; 'E4M3FN' (NaN code),
        'UE8M0FN' (unsigned)."""
        if self.kind == "int":
            element = f"INT{self.bits}"
        else:
            element = (f"{'' if self.signed else 'U'}E{self.exponent_bits}M{self.mantissa_bits}"
                       f"{'FN' if self.nan_codes else ''}")
        if self.block is None:
            return element
        for alias, fmt in BLOCK_ALIASES.items():
            if fmt == self:
                return alias
        return f"{element}/b{self.block.size}/{self.block.scale_name}{self.block.maxima_name}"

    def __str__(self) -> str:
        return self.name


def fp_format(exponent_bits: int, mantissa_bits: int) -> QuantFormat:
    """Signed ExMy float format with 1 + exponent_bits + mantissa_bits bits, every code a number."""
    return QuantFormat("fp", 1 + exponent_bits + mantissa_bits, exponent_bits)


def int_format(bits: int) -> QuantFormat:
    """Symmetric signed integer format."""
    return QuantFormat("int", bits)


E4M3FN = QuantFormat("fp", 8, 4, nan_codes=1)  # OCP FP8 E4M3: S.1111.111 is NaN, largest 448
E8M0 = QuantFormat("fp", 8, 8, signed=False, nan_codes=1)  # OCP MX scale: 2^-127 .. 2^127, 0xFF is NaN
SCALE_FORMATS = {"e8m0": (E8M0, False), "e4m3": (E4M3FN, True)}  # name in format strings: (format, tensor scale)
NVFP4_BLOCKS = BlockScaling(16, E4M3FN, tensor_scale=True)  # NVIDIA NVFP4's block scaling
MX_BLOCKS = BlockScaling(32, E8M0)  # OCP MX v1.0's block scaling
NVFP4_4OVER6_BLOCKS = BlockScaling(16, E4M3FN, tensor_scale=True, maxima=(6.0, 4.0))  # Four Over Six (4/6)


def _number_name(value: float) -> str:
    """A float as short text that reads back to the same float: '6', '0.75'."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


def with_blocks(fmt: QuantFormat, size: int, scale: str, maxima: tuple[float, ...] = ()) -> QuantFormat:
    """fmt's elements in blocks of `size` along the last dimension, scales named as in SCALE_FORMATS, blocks scaled
    to `maxima` (BlockScaling)."""
    if scale not in SCALE_FORMATS:
        raise ValueError(f"unknown block scale {scale!r}: expected one of {', '.join(SCALE_FORMATS)}")
    scale_format, tensor_scale = SCALE_FORMATS[scale]
    return dataclasses.replace(fmt, block=BlockScaling(size, scale_format, tensor_scale, maxima))


BLOCK_ALIASES = {
    "NVFP4": dataclasses.replace(fp_format(2, 1), block=NVFP4_BLOCKS),
    "NVFP4_4OVER6": dataclasses.replace(fp_format(2, 1), block=NVFP4_4OVER6_BLOCKS),
    "MXFP4": dataclasses.replace(fp_format(2, 1), block=MX_BLOCKS),
    "MXFP8": dataclasses.replace(fp_format(4, 3), block=MX_BLOCKS),
}


def parse_format(name: str) -> QuantFormat:
    """Inverse of `QuantFormat.name` for element and block formats: 'E2M1' -> fp_format(2, 1), 'INT4', 'NVFP4',
    'NVFP4_4OVER6', 'MXFP4', 'E4M3/b32/e8m0', 'E2M1/b16/e4m3/max6,3', 'UE3M1' (unsigned)."""
    text = name.strip()
    if text.upper() in BLOCK_ALIASES:
        return BLOCK_ALIASES[text.upper()]
    element, _, block = text.partition("/")
    match = re.fullmatch(r"(U?)E(\d+)M(\d+)|INT(\d+)", element.upper())
    number = r"[0-9.eE+-]+"
    block_match = (re.fullmatch(rf"b(\d+)/({'|'.join(SCALE_FORMATS)})(?:/max({number}(?:,{number})*))?", block)
                   if block else None)
    if match is None or (block and block_match is None):
        raise ValueError(f"unknown format name {name!r}: expected ExMy (e.g. E2M1), INTn (e.g. INT4), NVFP4, MXFP4 "
                         f"or element/b<block size>/<{'|'.join(SCALE_FORMATS)}>[/max<m1,m2,...>]")
    if match.group(4) is not None:
        fmt = int_format(int(match.group(4)))
    elif match.group(1):  # unsigned ExMy: magnitudes only (e.g. UE3M1 for softmax probabilities)
        fmt = QuantFormat("fp", int(match.group(2)) + int(match.group(3)), int(match.group(2)), signed=False)
    else:
        fmt = fp_format(int(match.group(2)), int(match.group(3)))
    if block_match is None:
        return fmt
    try:
        maxima = tuple(float(m) for m in block_match.group(3).split(",")) if block_match.group(3) else ()
    except ValueError:
        raise ValueError(f"unknown format name {name!r}: block maxima must be numbers") from None
    return with_blocks(fmt, int(block_match.group(1)), block_match.group(2), maxima)


def formats_of_width(bits: int, kind: str = "fp") -> list[QuantFormat]:
    """Every signed format of one bit width: for FP4, [E3M0, E2M1, E1M2] (most exponent bits first); INT: [INTn]."""
    if kind == "int":
        return [int_format(bits)]
    return [QuantFormat("fp", bits, e) for e in range(bits - 1, 0, -1)]


def exponent_bias_from_max(fmt: QuantFormat, max_value: torch.Tensor | float) -> torch.Tensor:
    """b = log2(grid_max) - log2(max_value); max_value > 0, any shape (float32 result)."""
    max_value = torch.as_tensor(max_value, dtype=torch.float32)
    return math.log2(fmt.grid_max) - torch.log2(max_value)


def max_from_exponent_bias(fmt: QuantFormat, exponent_bias: torch.Tensor | float) -> torch.Tensor:
    """max_value = grid_max * 2^-b, any shape (float32 result)."""
    exponent_bias = torch.as_tensor(exponent_bias, dtype=torch.float32)
    return fmt.grid_max * torch.exp2(-exponent_bias)
