"""Quantization policies: which modules get which kind of format, at which granularity, searched or not.

Each of the paper's named policies is one small module of this package holding `CONFIG = QuantConfig(...)`; the
`--quant_config` name is the module name. The recipes beyond the paper are built from components in
configs/recipes.py (`RECIPES`, named `<family>_<components>_config_llama`). Bit widths and starting exponent
bits come from `--qbits`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import asdict, dataclass

from quant_layers.formats import BlockScaling, QuantFormat
from utils.search.residual_rotation import ModelTransform
from utils.search.transforms import Transform

CONFIG_FILES = (
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
    block: block scaling (quant_layers/formats.py `BlockScaling`, e.g. NVFP4_BLOCKS, NVFP4_4OVER6_BLOCKS,
    MX_BLOCKS): every quantized tensor in blocks along its input dimension with dynamic block scales, round to
    nearest; the calibrated ranges only set NVFP4's float32 tensor scale (per tensor, or per row with
    "per_channel"), which `search` then searches (the format itself only, utils/search/space.py `range_formats`).
    MX formats have no range (power-of-two scales from the data): search is refused there, as are channel shifts
    with any block scaling.
    transforms: function-preserving changes fit on calibration data and saved in the parameter file, in order:
    first the model-wide ones (scope "model", e.g. ResidualRotation(), utils/search/residual_rotation.py), applied
    before calibration, then the per-block ones (utils/search/transforms.py, e.g. SmoothQuant(alpha=0.5)), fit on
    each block's captured inputs, and those with at_head=True (scope "head"), fit between the final norm and the
    output head when the head is calibrated (they need lm_head).
    steps: further search steps run on every Linear after the range search (or after MinMax when search is False),
    in order: step classes with `from_space(space)` (utils/search/, e.g. BlockScaleStep, GPTQStep), built from the
    run's SearchSpace so their knobs are flags.
    share_input_ranges: the Linears that read one input (q/k/v, gate/up) take one weight range and one input range
    after the range search, before the further steps (utils/search/shared_ranges.py): one float32 tensor scale per
    fused weight and per input, what fused serving kernels (vLLM's NVFP4) require. Per-tensor weight ranges, no
    channel shifts, not MX (no range).
    """

    name: str
    format_kind: str
    search: bool
    act_channel_shift: bool
    linear: bool = True
    lm_head: bool = True
    embedding: bool = True
    weight_granularity: str = "per_channel"
    block: BlockScaling | None = None
    transforms: tuple[ModelTransform | Transform, ...] = ()
    steps: tuple[type, ...] = ()
    share_input_ranges: bool = False

    def __post_init__(self) -> None:
        if self.format_kind not in ("fp", "int"):
            raise ValueError(f"{self.name}: format_kind must be 'fp' or 'int'")
        if self.weight_granularity not in ("per_channel", "per_tensor"):
            raise ValueError(f"{self.name}: weight_granularity must be 'per_channel' or 'per_tensor'")
        if self.act_channel_shift and self.format_kind != "fp":
            raise ValueError(f"{self.name}: activation channel shifts are exponent shifts and need FP formats")
        scopes = [t.scope for t in self.transforms]
        if scopes != sorted(scopes, key=lambda scope: scope != "model"):
            raise ValueError(f"{self.name}: model-wide transforms come first (they are applied before calibration)")
        if not self.lm_head and any(t.scope == "head" for t in self.transforms):
            raise ValueError(f"{self.name}: transforms at the head (at_head) need a quantized head (lm_head=True)")
        if self.block is not None and self.act_channel_shift:
            raise ValueError(f"{self.name}: block-scaled formats take no channel shifts")
        if self.block is not None and self.search and self.block.power_of_two:
            raise ValueError(f"{self.name}: power-of-two block scales (MX) come from the data alone: there is no range "
                             "to search (search=False)")
        if self.share_input_ranges and (self.weight_granularity != "per_tensor" or self.act_channel_shift
                                        or self.block is not None and self.block.power_of_two):
            raise ValueError(f"{self.name}: shared input ranges need per-tensor weight ranges, no channel shifts and a "
                             "format with a range (not MX)")

    @property
    def uses_search_space(self) -> bool:
        """Whether calibration reads the SearchSpace knobs: a range search or further steps."""
        return self.search or bool(self.steps)

    def to_dict(self) -> dict:
        """Plain data for parameter-file metadata: the fields, each transform as its own dict, each step by its
        class name (no "steps" key without steps, as in files written before steps existed; a block without maxima
        is written as before maxima existed, so older files of the same definition still match)."""
        fields = asdict(self)
        fields["transforms"] = [t.to_dict() for t in self.transforms]
        fields["steps"] = [step.__name__ for step in self.steps]
        if not self.steps:
            del fields["steps"]
        if not self.share_input_ranges:  # absent when off, as in files written before the option existed
            del fields["share_input_ranges"]
        if fields["block"] is not None and not fields["block"]["maxima"]:
            del fields["block"]["maxima"]
        return fields


def config_names() -> tuple[str, ...]:
    """Every --quant_config: the policies of this package's files, then the recipes (configs/recipes.py)."""
    from configs.recipes import RECIPES

    return CONFIG_FILES + tuple(RECIPES)


def get_config(name: str) -> QuantConfig:
    """The policy called `name`; ValueError listing the known names otherwise."""
    from configs.recipes import RECIPES

    if name in RECIPES:
        return RECIPES[name]
    if name not in CONFIG_FILES:
        raise ValueError(f"unknown --quant_config {name!r}; choose one of: {', '.join(config_names())}")
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
        """(weight, activation, embedding) starting formats under config's kind and blocks; None where bits == 16.
        ValueError (one line) for a format the quantizer cannot compute (more than 7 exponent bits)."""
        def make(bits: int, exp: int) -> QuantFormat | None:
            if bits >= 16:
                return None
            fmt = QuantFormat("int", bits) if config.format_kind == "int" else QuantFormat("fp", bits, exp)
            if fmt.float32_error:
                raise ValueError(f"--qbits: {fmt.float32_error}")
            return dataclasses.replace(fmt, block=config.block)

        return (make(self.weight_bits, self.weight_exp), make(self.act_bits, self.act_exp),
                make(self.embed_bits, self.embed_exp))

    def tag(self) -> str:
        """'W4A4E4', as in the saved parameter file name."""
        return f"W{self.weight_bits}A{self.act_bits}E{self.embed_bits}"
