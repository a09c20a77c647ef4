"""Quantization policies: which modules get which kind of format, at which granularity, searched or not.

Each named policy is one small module of this package holding `CONFIG = QuantConfig(...)`; the
`--quant_config` name is the module name. Bit widths and starting exponent bits come from `--qbits`.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

from quant_layers.formats import BLOCK_SCALES, QuantFormat, with_blocks

CONFIG_NAMES = (
    "FPQ_config_llama",
    "FPQ_baseline_config_llama",
    "MinMax_config_llama",
    "MinMax_INT_config_llama",
    "NVFP4_config_llama",
    "MXFP4_config_llama",
    "SmoothQuant_config_llama",
)


@dataclass(frozen=True)
class QuantConfig:
    """A quantization policy.

    format_kind: "fp" (ExMy; the exponent bits of --qbits are the starting format) or "int".
    linear / lm_head / embedding: quantize every nn.Linear in the decoder, the output head, the token
    embedding. weight_granularity: "per_channel" (one range per output row) or "per_tensor".
    Activations are always per tensor (static, calibrated); act_channel_shift adds LLM-FP4's
    per-input-channel integer exponent shifts, folded into the weight (Eq. 8).
    search: False keeps MinMax ranges (absolute maxima over the weight rows / calibration activations);
    True runs the exponent-bias / max-value search over every format of the bit width.
    block_size / block_scale: block-scaled formats (quant_layers/formats.py): every quantized tensor in blocks
    of block_size along its input dimension with dynamic "e8m0" (MX) or "e4m3" (NVFP4) scales, round to
    nearest; the calibrated per-tensor ranges only set NVFP4's float32 tensor scale.
    smooth_alpha: > 0 applies SmoothQuant's migration (utils/search/transforms.py) with this alpha before the
    Linears of each block are calibrated.
    """

    name: str
    format_kind: str
    search: bool
    act_channel_shift: bool
    linear: bool = True
    lm_head: bool = True
    embedding: bool = True
    weight_granularity: str = "per_channel"
    block_size: int = 0
    block_scale: str = ""
    smooth_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.format_kind not in ("fp", "int"):
            raise ValueError(f"{self.name}: format_kind must be 'fp' or 'int'")
        if self.weight_granularity not in ("per_channel", "per_tensor"):
            raise ValueError(f"{self.name}: weight_granularity must be 'per_channel' or 'per_tensor'")
        if self.act_channel_shift and self.format_kind != "fp":
            raise ValueError(f"{self.name}: activation channel shifts are exponent shifts and need FP formats")
        if self.block_size and (self.search or self.act_channel_shift or self.block_scale not in BLOCK_SCALES):
            raise ValueError(f"{self.name}: block-scaled formats take block_scale in {BLOCK_SCALES}, "
                             "round to nearest (no search) and no channel shifts")
        if not 0.0 <= self.smooth_alpha < 1.0:
            raise ValueError(f"{self.name}: smooth_alpha must be in [0, 1), got {self.smooth_alpha}")

    def to_dict(self) -> dict:
        return asdict(self)


def get_config(name: str) -> QuantConfig:
    """The policy called `name`; ValueError listing the known names otherwise."""
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown --quant_config {name!r}; choose one of: {', '.join(CONFIG_NAMES)}")
    return importlib.import_module(f"configs.{name}").CONFIG


@dataclass(frozen=True)
class QBits:
    """--qbits W A E w_exp a_exp e_exp: bit widths of weights, input activations and the token embedding,
    then the (starting) exponent bits of each. 16 bits means: leave that part in full precision."""

    weight_bits: int
    act_bits: int
    embed_bits: int
    weight_exp: int
    act_exp: int
    embed_exp: int

    @classmethod
    def parse(cls, values: list[int]) -> QBits:
        """Validate six integers; ValueError with one line naming the problem otherwise."""
        if len(values) != 6:
            raise ValueError(f"--qbits takes 6 integers (W A E w_exp a_exp e_exp, e.g. 4 4 4 2 2 2), got {len(values)}")
        qbits = cls(*values)
        for part, bits, exp in zip(("weight", "activation", "embedding"), values[:3], values[3:]):
            if not 2 <= bits <= 16:
                raise ValueError(f"--qbits: {part} bits must be in 2..16 (16 = not quantized), got {bits}")
            if bits < 16 and not 1 <= exp < bits - 1:
                raise ValueError(
                    f"--qbits: {part} exponent bits must be in 1..{bits - 2} for {bits} bits "
                    f"(below bits-1, leaving a mantissa bit), got {exp}"
                )
        return qbits

    def formats(self, config: QuantConfig) -> tuple[QuantFormat | None, QuantFormat | None, QuantFormat | None]:
        """(weight, activation, embedding) starting formats under config's kind and blocks; None where bits == 16."""
        def make(bits: int, exp: int) -> QuantFormat | None:
            if bits >= 16:
                return None
            fmt = QuantFormat("int", bits) if config.format_kind == "int" else QuantFormat("fp", bits, exp)
            return with_blocks(fmt, config.block_size, config.block_scale) if config.block_size else fmt

        return (make(self.weight_bits, self.weight_exp), make(self.act_bits, self.act_exp),
                make(self.embed_bits, self.embed_exp))

    def tag(self) -> str:
        """'W4A4E4', as in the saved parameter file name."""
        return f"W{self.weight_bits}A{self.act_bits}E{self.embed_bits}"
