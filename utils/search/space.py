"""The search's knobs, in one place: each field of `SearchSpace` is its own default, command-line flag, help text,
validation and parameter-file metadata key (utils/run/cli.py and utils/params.py read them from here).

Candidates are multipliers g_i = a + i (b - a) / n, i = 0..n-1, plus g = 1 (MinMax), of the MinMax range
(search_space "max": max_value = g * absmax) or, as the original code, of the MinMax exponent bias ("bias").
For block-scaled formats the range is the tensor's (NVFP4: it sets the float32 tensor scale); MX formats have none
(`range_formats`). `act_clip_candidates` are multipliers of the dynamic block maxima of block-scaled activations
(utils/search/act_blocks.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from quant_layers.formats import QuantFormat, exponent_bias_from_max, formats_of_width, max_from_exponent_bias

TINY = 1e-30  # floor for ranges: an all-zero row or tensor keeps a finite scale
# Provisional until chosen on held-out perplexity: clipping at 0.7 .. 1 of the block maxima, in steps of 0.05.
ACT_CLIP_CANDIDATES = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def knob(default, help: str, legacy=None, flag: bool = True, **argparse_options):
    """A SearchSpace field that is also a flag (--<field name>) and a metadata key. legacy: the value that parameter
    files written before the knob existed were made with (None: every file records it)."""
    return field(default=default, metadata={"help": help, "legacy": legacy, "flag": flag, **argparse_options})


@dataclass(frozen=True)
class SearchSpace:
    """What the search tries, and how much of it it scores exactly (see the help texts)."""

    search_intervals: tuple[float, float, int] = knob(
        (0.01, 1.2, 100), "a b n: candidates g_i = a + i(b-a)/n, i < n, plus g = 1 (MinMax)", nargs="+", type=float)
    search_round: int = knob(3, "rounds of weight-then-activation search", type=int)
    search_space: str = knob("max", "candidates multiply the MinMax max value or, as the original code, its exponent "
                             "bias", choices=("max", "bias"))
    act_coarse_tokens: int = knob(
        4096, "rank activation candidates on this many (strided) calibration tokens and re-score the best "
        "--act_refine on all of them; 0 scores every candidate on every token", type=int)
    act_refine: int = knob(8, "activation candidates of each format re-scored on all tokens after the "
                           "--act_coarse_tokens ranking (the current range is always re-scored too)", legacy=8, type=int)
    weight_refine: int = knob(
        0, "rank weight candidates per row by a cheap proxy of their loss (G's diagonal and 32 leading eigenvectors) "
        "and re-score the best K exactly; 0 scores every candidate exactly", legacy=0, type=int)
    proxy_rank: int = knob(32, "eigenvectors of G the weight proxy keeps", flag=False)
    gptq_damping: float = knob(0.01, "fraction of the mean diagonal of Xq^T Xq added to it before inverting (GPTQ's "
                               "damping)", legacy=0.01, type=float)
    gptq_block: int = knob(128, "columns GPTQ rounds per lazy-update block", legacy=128, type=int)
    act_clip_candidates: tuple[float, ...] = knob(
        ACT_CLIP_CANDIDATES, "multipliers of the dynamic block maxima a block-scaled activation format's clip search "
        "tries (the current multiplier is always tried too; provisional default)", legacy=list(ACT_CLIP_CANDIDATES),
        nargs="+", type=float)

    def __post_init__(self) -> None:
        if len(self.search_intervals) != 3:
            raise ValueError("--search_intervals takes 3 numbers: a b n (e.g. 0.01 1.2 100)")
        low, high, count = self.search_intervals
        if not (0 < low < high) or count < 1 or not float(count).is_integer():
            raise ValueError(f"--search_intervals {low:g} {high:g} {count:g}: need 0 < a < b and an integer n >= 1")
        object.__setattr__(self, "search_intervals", (float(low), float(high), int(count)))
        clips = tuple(float(c) for c in self.act_clip_candidates)
        if not clips or not all(math.isfinite(c) and c > 0 for c in clips):
            raise ValueError(f"--act_clip_candidates takes positive numbers, got {' '.join(map(str, clips)) or 'none'}")
        object.__setattr__(self, "act_clip_candidates", clips)
        for name, least, meaning in (("search_round", 1, "rounds"), ("act_coarse_tokens", 0, "0 = every token"),
                                     ("act_refine", 1, "candidates re-scored on all tokens"),
                                     ("weight_refine", 0, "0 = every candidate exactly"), ("proxy_rank", 0, ""),
                                     ("gptq_block", 1, "columns per block")):
            if getattr(self, name) < least:
                raise ValueError(f"--{name} must be >= {least} ({meaning}), got {getattr(self, name)}")
        if not self.gptq_damping > 0:
            raise ValueError(f"--gptq_damping must be > 0 (a fraction of the mean diagonal), got {self.gptq_damping}")

    @classmethod
    def flags(cls) -> list[dataclasses.Field]:
        """The fields that are command-line flags, in declaration order."""
        return [f for f in dataclasses.fields(cls) if f.metadata["flag"]]

    def metadata(self) -> dict:
        """{flag name: value} as the parameter file's search metadata records it."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in self.flags()}

    def multipliers(self, device: torch.device | str = "cpu") -> torch.Tensor:
        low, high, count = self.search_intervals
        i = torch.arange(count, dtype=torch.float64)
        g = torch.cat([low + i * (high - low) / count, torch.ones(1, dtype=torch.float64)])
        return torch.unique(g).to(device=device, dtype=torch.float32)

    def candidates(self, fmt: QuantFormat, absmax: torch.Tensor) -> torch.Tensor:
        """Candidate ranges [C, *absmax.shape] around the MinMax range absmax."""
        g = self.multipliers(absmax.device).view(-1, *([1] * absmax.dim()))
        absmax = absmax.clamp(min=TINY)
        if self.search_space == "max":
            return g * absmax
        return max_from_exponent_bias(fmt, g * exponent_bias_from_max(fmt, absmax)).clamp(min=TINY)


def range_formats(fmt: QuantFormat) -> tuple[QuantFormat, ...]:
    """The formats a range search tries from the starting format fmt: every format of its width (LLM-FP4: E3M0,
    E2M1, E1M2 for FP4); a block-scaled format only itself (its element is part of its definition: NVFP4 is E2M1,
    and its range is the tensor scale); none for power-of-two block scales (MX), whose ranges come from the data
    alone (`QuantFormat.has_range`): there is nothing to search."""
    if fmt.block is not None:
        return (fmt,) if fmt.has_range else ()
    return tuple(formats_of_width(fmt.bits, fmt.kind))
