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

    def __post_init__(self) -> None:
        if self.kind not in ("fp", "int"):
            raise ValueError(f"format kind must be 'fp' or 'int', got {self.kind!r}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"format bits must be in 2..16, got {self.bits}")
        if self.kind == "fp" and not 1 <= self.exponent_bits <= self.bits - 1:
            raise ValueError(f"FP{self.bits} needs 1..{self.bits - 1} exponent bits, got {self.exponent_bits}")
        if self.kind == "int" and self.exponent_bits != 0:
            raise ValueError("INT formats have no exponent bits")

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
        """'E2M1', 'INT4', ..."""
        return f"INT{self.bits}" if self.kind == "int" else f"E{self.exponent_bits}M{self.mantissa_bits}"

    def __str__(self) -> str:
        return self.name


def fp_format(exponent_bits: int, mantissa_bits: int) -> QuantFormat:
    """ExMy float format with 1 + exponent_bits + mantissa_bits bits."""
    return QuantFormat("fp", 1 + exponent_bits + mantissa_bits, exponent_bits)


def int_format(bits: int) -> QuantFormat:
    """Symmetric signed integer format."""
    return QuantFormat("int", bits)


def parse_format(name: str) -> QuantFormat:
    """Inverse of `QuantFormat.name`: 'E2M1' -> fp_format(2, 1), 'INT4' -> int_format(4)."""
    match = re.fullmatch(r"E(\d+)M(\d+)|INT(\d+)", name.strip().upper())
    if match is None:
        raise ValueError(f"unknown format name {name!r}: expected ExMy (e.g. E2M1) or INTn (e.g. INT4)")
    if match.group(3) is not None:
        return int_format(int(match.group(3)))
    return fp_format(int(match.group(1)), int(match.group(2)))


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
