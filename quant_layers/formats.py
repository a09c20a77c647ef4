"""Number formats as data.

A format is a frozen `QuantFormat`: a kind ("fp" or "int") and bit counts. Nothing else about a format
is written as code: its standard grid, its largest magnitude and its exponent bias all follow from the
fields.

FP (sign + E exponent bits + M mantissa bits, E + M = bits - 1), LLM-FP4's convention: every exponent
code is a number (no inf/NaN codes), code 0 holds the subnormals, and a real-valued exponent bias b
sets the range:

    max_value = (2 - 2^-M) * 2^(2^E - 1 - b)            b = log2(grid_max) - log2(max_value)

where grid_max = (2 - 2^-M) * 2^(2^E - 1) is the largest value of the same format with b = 0.
INT (symmetric, restricted): integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1] times max_value / grid_max.

Block-scaled formats (microscaling) are the same element formats with two more fields: `block_size`
consecutive values along the last dimension share a scale computed from their absolute maximum at run
time (round to nearest), stored as `block_scale`:
- "e8m0": a power of two (OCP MX): block max = top * 2^(floor(log2 amax) - floor(log2 top)), where top is
  the element format's largest value with the OCP bias 2^(E-1) - 1 (6 for E2M1). MXFP4 = E2M1, blocks of 32.
- "e4m3": an FP8 E4M3 number times one float32 scale per tensor (NVIDIA NVFP4): block max =
  top * e4m3(amax / (top * g)) * g with g = tensor max / (top * 448). NVFP4 = E2M1, blocks of 16.
Element grids keep this project's convention (no NaN codes), so MXFP8's E4M3 reaches 480, not 448.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantFormat:
    """A signed number format.

    kind: "fp" (sign, `exponent_bits`, mantissa = bits - 1 - exponent_bits) or "int" (symmetric integer).
    """

    kind: str
    bits: int
    exponent_bits: int = 0
    block_size: int = 0
    block_scale: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("fp", "int"):
            raise ValueError(f"format kind must be 'fp' or 'int', got {self.kind!r}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"format bits must be in 2..16, got {self.bits}")
        if self.kind == "fp" and not 1 <= self.exponent_bits <= self.bits - 1:
            raise ValueError(f"FP{self.bits} needs 1..{self.bits - 1} exponent bits, got {self.exponent_bits}")
        if self.kind == "int" and self.exponent_bits != 0:
            raise ValueError("INT formats have no exponent bits")
        if (self.block_size > 0) != (self.block_scale in BLOCK_SCALES) or self.block_size < 0:
            raise ValueError(f"a block-scaled format needs block_size > 0 and block_scale in {BLOCK_SCALES}, "
                             f"got {self.block_size} and {self.block_scale!r}")

    @property
    def element(self) -> "QuantFormat":
        """The format of one element (no block scaling)."""
        return QuantFormat(self.kind, self.bits, self.exponent_bits)

    @property
    def element_top(self) -> float:
        """Largest element value under the OCP bias 2^(E-1) - 1 (FP) or the largest INT code: 6 for E2M1."""
        if self.kind == "int":
            return self.grid_max
        return self.grid_max / 2.0 ** (2 ** (self.exponent_bits - 1) - 1)

    @property
    def mantissa_bits(self) -> int:
        """Stored fraction bits (sign and implicit leading 1 not counted); 0 for INT."""
        return self.bits - 1 - self.exponent_bits if self.kind == "fp" else 0

    @property
    def grid_max(self) -> float:
        """Largest magnitude of the standard grid: FP with exponent bias 0, or the largest INT code."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        return (2.0 - 2.0 ** -self.mantissa_bits) * 2.0 ** (2 ** self.exponent_bits - 1)

    @property
    def name(self) -> str:
        """'E2M1', 'INT4', 'NVFP4', 'MXFP4', or element/b<block>/<scale> for other block formats."""
        element = f"INT{self.bits}" if self.kind == "int" else f"E{self.exponent_bits}M{self.mantissa_bits}"
        if not self.block_size:
            return element
        for alias, fmt in BLOCK_ALIASES.items():
            if fmt == self:
                return alias
        return f"{element}/b{self.block_size}/{self.block_scale}"

    def __str__(self) -> str:
        return self.name


BLOCK_SCALES = ("e8m0", "e4m3")


def fp_format(exponent_bits: int, mantissa_bits: int) -> QuantFormat:
    """ExMy float format with 1 + exponent_bits + mantissa_bits bits."""
    return QuantFormat("fp", 1 + exponent_bits + mantissa_bits, exponent_bits)


def int_format(bits: int) -> QuantFormat:
    """Symmetric signed integer format."""
    return QuantFormat("int", bits)


def parse_format(name: str) -> QuantFormat:
    """Inverse of `QuantFormat.name`: 'E2M1' -> fp_format(2, 1), 'INT4' -> int_format(4), 'NVFP4', 'MXFP4',
    'E4M3/b32/e8m0'."""
    text = name.strip()
    if text.upper() in BLOCK_ALIASES:
        return BLOCK_ALIASES[text.upper()]
    element, _, block = text.partition("/")
    match = re.fullmatch(r"E(\d+)M(\d+)|INT(\d+)", element.upper())
    block_match = re.fullmatch(r"b(\d+)/(e8m0|e4m3)", block) if block else None
    if match is None or (block and block_match is None):
        raise ValueError(f"unknown format name {name!r}: expected ExMy (e.g. E2M1), INTn (e.g. INT4), NVFP4, MXFP4 "
                         "or element/b<block size>/<e8m0|e4m3>")
    fmt = int_format(int(match.group(3))) if match.group(3) is not None else fp_format(int(match.group(1)),
                                                                                        int(match.group(2)))
    return with_blocks(fmt, int(block_match.group(1)), block_match.group(2)) if block_match else fmt


def with_blocks(fmt: QuantFormat, block_size: int, block_scale: str) -> QuantFormat:
    """fmt's elements in blocks of block_size along the last dimension with dynamic block_scale scales."""
    return QuantFormat(fmt.kind, fmt.bits, fmt.exponent_bits, block_size, block_scale)


BLOCK_ALIASES = {
    "NVFP4": QuantFormat("fp", 4, 2, 16, "e4m3"),
    "MXFP4": QuantFormat("fp", 4, 2, 32, "e8m0"),
    "MXFP8": QuantFormat("fp", 8, 4, 32, "e8m0"),
}


def formats_of_width(bits: int, kind: str = "fp") -> list[QuantFormat]:
    """Every format of one bit width: for FP4, [E3M0, E2M1, E1M2] (most exponent bits first); for INT, [INTn]."""
    if kind == "int":
        return [int_format(bits)]
    return [QuantFormat("fp", bits, e) for e in range(bits - 1, 0, -1)]


def exponent_bias_from_max(fmt: QuantFormat, max_value: torch.Tensor | float) -> torch.Tensor:
    """b = log2(grid_max) - log2(max_value); max_value > 0, any shape (float32 result)."""
    max_value = torch.as_tensor(max_value, dtype=torch.float32)
    return math.log2(fmt.grid_max) - torch.log2(max_value)


def max_from_exponent_bias(fmt: QuantFormat, exponent_bias: torch.Tensor | float) -> torch.Tensor:
    """max_value = (2 - 2^-M) * 2^(2^E - 1 - b), any shape (float32 result)."""
    exponent_bias = torch.as_tensor(exponent_bias, dtype=torch.float32)
    return fmt.grid_max * torch.exp2(-exponent_bias)
