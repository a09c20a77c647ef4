"""Attention quantization policy: which attention tensors are quantized, in which format, at which granularity.

Independent of --quant_config and --qbits (the paper's six values keep their meaning): `--kv_format`,
`--kv_granularity`, `--attn_format`, `--attn_p_format` (utils/run/cli.py) build one `AttentionPolicy`; the numerics
are quant_layers/attention.py's. The matmuls' K and V inputs are the cached K and V: `--kv_format` quantizes both the
cache and those inputs; `--attn_format` adds Q (before Q K^T) and `--attn_p_format` P (before P V).
"""

from __future__ import annotations

from dataclasses import dataclass

from quant_layers.attention import DYNAMIC, GRANULARITIES, AttentionQuantError, TensorQuant
from quant_layers.formats import QuantFormat, parse_format

MAX_BITS = 8  # a wider format stores nothing a 16-bit cache does not


def _format(flag: str, name: str, signed: bool) -> QuantFormat:
    try:
        fmt = parse_format(name)
    except ValueError as error:
        raise AttentionQuantError(f"{flag}: {error}") from None
    if fmt.float32_error:
        raise AttentionQuantError(f"{flag}: {fmt.float32_error}")
    if fmt.bits > MAX_BITS:
        raise AttentionQuantError(f"{flag} {name}: at most {MAX_BITS} bits (a wider format holds nothing the 16-bit "
                                  "cache and activations do not)")
    if signed and not fmt.signed:
        raise AttentionQuantError(f"{flag} {name}: keys, values and queries are signed; an unsigned format cannot "
                                  "hold them (unsigned formats are for --attn_p_format)")
    return fmt


@dataclass(frozen=True)
class AttentionPolicy:
    """What attention quantizes. Format names as quant_layers/formats.py spells them; None = full precision.

    kv_format: K and V as cached (after RoPE), with key_granularity / value_granularity (GRANULARITIES; per_token is
    dynamic, the others are static ranges calibrated against the attention output; per_channel is for K only).
    q_format: Q before Q K^T, per token (dynamic). p_format: P before P V, range fixed at 1 (P lies in [0, 1])."""

    kv_format: str | None = None
    key_granularity: str = "per_channel"
    value_granularity: str = "per_token"
    q_format: str | None = None
    p_format: str | None = None

    def __post_init__(self) -> None:
        for part, granularity in (("key", self.key_granularity), ("value", self.value_granularity)):
            if granularity not in GRANULARITIES:
                raise AttentionQuantError(f"--kv_granularity: {part} granularity {granularity!r} is not one of "
                                          f"{', '.join(GRANULARITIES)}")
        if self.value_granularity == "per_channel":
            raise AttentionQuantError("--kv_granularity: per_channel is for keys only (values are quantized per "
                                      "tensor, head or token)")
        if self.kv_format is not None:
            fmt = self.formats["kv"]
            if fmt.block is not None and "per_channel" in (self.key_granularity, self.value_granularity):
                raise AttentionQuantError(f"--kv_format {self.kv_format}: block scales run along the head dimension; "
                                          "per_channel ranges do not combine with them")
        for name in ("q", "p"):
            if getattr(self, f"{name}_format") is not None:
                _ = self.formats[name]

    @property
    def enabled(self) -> bool:
        return any((self.kv_format, self.q_format, self.p_format))

    @property
    def formats(self) -> dict[str, QuantFormat]:
        """{"kv" | "q" | "p": format} of the parts that are quantized (validated)."""
        parts = {"kv": ("--kv_format", self.kv_format, True), "q": ("--attn_format", self.q_format, True),
                 "p": ("--attn_p_format", self.p_format, False)}
        return {key: _format(flag, name, signed) for key, (flag, name, signed) in parts.items() if name is not None}

    def specs(self) -> dict[str, TensorQuant]:
        """{"key" | "value" | "query" | "probs": TensorQuant without ranges} of the quantized tensors."""
        formats = self.formats
        specs = {}
        if "kv" in formats:
            specs["key"] = TensorQuant(formats["kv"], self.key_granularity)
            specs["value"] = TensorQuant(formats["kv"], self.value_granularity)
        if "q" in formats:
            specs["query"] = TensorQuant(formats["q"], DYNAMIC)
        if "p" in formats:
            specs["probs"] = TensorQuant(formats["p"], "per_tensor")  # fixed range 1
        return specs

    def check_head_dim(self, head_dim: int) -> None:
        """AttentionQuantError if a block format's blocks do not tile the head dimension."""
        for flag, fmt in (("--kv_format", "kv"), ("--attn_format", "q")):
            block = self.formats.get(fmt)
            if block is not None and block.block is not None and head_dim % block.block.size:
                raise AttentionQuantError(f"{flag} {block.name}: blocks of {block.block.size} do not tile the "
                                          f"attention head dimension {head_dim}")

    def tag(self) -> str:
        """'KV-E2M1-per_channel-per_token_Q-E2M1_P-UE3M1': the parameter file name's part (no '/')."""
        parts = []
        if self.kv_format:
            parts.append(f"KV-{self.kv_format}-{self.key_granularity}-{self.value_granularity}")
        parts += [f"{letter}-{name}" for letter, name in (("Q", self.q_format), ("P", self.p_format)) if name]
        return "_".join(parts).replace("/", "-")

    def to_dict(self) -> dict:
        return {"kv_format": self.kv_format, "key_granularity": self.key_granularity,
                "value_granularity": self.value_granularity, "q_format": self.q_format, "p_format": self.p_format}

    @classmethod
    def from_dict(cls, data: dict | None) -> "AttentionPolicy | None":
        return None if data is None else cls(**data)

    def results(self) -> dict:
        """The results JSON's `kv_cache` and `attention` entries."""
        kv = None if self.kv_format is None else {
            "format": self.kv_format, "key_granularity": self.key_granularity,
            "value_granularity": self.value_granularity,
            "ranges": {part: ("dynamic" if g == DYNAMIC else "static") if self.formats["kv"].has_range else
                       "block scales from the data" for part, g in
                       (("key", self.key_granularity), ("value", self.value_granularity))}}
        attention = None if not (self.q_format or self.p_format) else {
            "query_format": self.q_format, "query_granularity": DYNAMIC if self.q_format else None,
            "probs_format": self.p_format, "probs_range": 1.0 if self.p_format else None}
        return {"kv_cache": kv, "attention": attention}
