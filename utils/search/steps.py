"""The per-layer search as a sequence of steps over one state (`QuantParams`), LLM-FP4's coordinate descent.

A step is a callable `step(problem, state) -> state` that never returns a state with a higher loss L than it was
given (the given state is always one of its candidates); `search_linear` runs steps in order. LLM-FP4's search
is `fpq_steps`: (ChannelShiftStart, if the config has FPQ's shifts) then `search_round` rounds of

1. WeightRangeStep: for every weight format of the width, the range of every output row over the candidates
   (rows are independent given Q_a(X)); keep the format with the lowest L.
2. ActRangeStep: for every activation format, the per-tensor range over the candidates (with FPQ's per-channel
   exponent shifts), ranked on a strided token subset, the best `act_refine` re-scored on all tokens; keep the
   format with the lowest L.

starting from MinMax (`minmax_state`), so L never ends above MinMax. New algorithms (GPTQ rounding, block-scale
search) are further steps: `BlockScaleStep` (utils/search/block_scales.py) chooses the block
scales of a block-scaled weight format, `ActBlockClipStep` (utils/search/act_blocks.py) the clipping multiplier
of a block-scaled activation format's dynamic block scales, `GPTQStep` (utils/search/gptq.py) the rounding of the
weight under frozen scales. The range steps here and BlockScaleStep score the weight rounded to nearest, so a state
they change carries no weight codes (QuantParams.weight_codes): GPTQ's rounding belongs after them. The losses come
from `LinearProblem` (utils/search/problem.py).

Block-scaled formats: the range steps search the per-tensor (or per-row) range, which for NVFP4 sets the float32
tensor scale (the block scales stay the data's own: a weight state's explicit block scales are dropped when its
range changes); only the starting format is tried (`range_formats`). MX formats ignore the range (power-of-two
scales from the data): the range steps skip them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quant_layers.formats import QuantFormat
from quant_layers.modules import QuantParams
from utils.search.problem import ActCandidates, Budget, LinearProblem, channel_shift
from utils.search.space import TINY, SearchSpace, range_formats

Step = Callable[[LinearProblem, QuantParams], QuantParams]


def minmax_weight_max(problem: LinearProblem, per_tensor: bool) -> torch.Tensor:
    """MinMax weight ranges [out]: each row's absolute maximum, or the whole tensor's repeated per row."""
    weight_max = problem.weight_absmax.clamp(min=TINY)
    return weight_max.amax().expand_as(weight_max).clone() if per_tensor else weight_max


def minmax_state(problem: LinearProblem, weight_format: QuantFormat, act_format: QuantFormat,
                 per_tensor_weight: bool = False) -> QuantParams:
    """Ranges from absolute maxima: per output row (or whole tensor) for W, per tensor for X; mse = L."""
    weight_max = minmax_weight_max(problem, per_tensor_weight)
    state = QuantParams(weight_format, weight_max, act_format, problem.act_absmax.clamp(min=TINY))
    state.mse = state.mse_minmax = problem.loss(state)
    return state


def round_to_nearest_loss(weight_format: QuantFormat, act_format: QuantFormat, per_tensor_weight: bool,
                          budget: Budget) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """(x [tokens, in], W [out, in]) -> L of round to nearest (`minmax_state`) in these formats: what a transform
    choosing between candidates scores (SmoothQuant's fitted strength)."""
    def loss(x: torch.Tensor, weight: torch.Tensor) -> float:
        problem = LinearProblem(x, weight, budget)
        return float(minmax_state(problem, weight_format, act_format, per_tensor_weight).mse)
    return loss


@dataclass(frozen=True)
class ChannelShiftStart:
    """FPQ's per-channel exponent shifts on the current range, kept where they lower L (the descent then starts
    from the better of the two)."""

    def __call__(self, problem: LinearProblem, state: QuantParams) -> QuantParams:
        shift = channel_shift(state.act_format, state.act_max_value.view(1), problem.channel_absmax)[0]
        shifted = dataclasses.replace(state, act_channel_shift=shift)
        shifted.mse = problem.loss(shifted)
        return shifted if shifted.mse < state.mse else state


@dataclass(frozen=True)
class WeightRangeStep:
    """Best per-row (or per-tensor) weight range for every format; keep the best format."""

    formats: tuple[QuantFormat, ...]
    space: SearchSpace
    per_tensor: bool = False

    def __call__(self, problem: LinearProblem, state: QuantParams) -> QuantParams:
        best = state
        base_absmax = minmax_weight_max(problem, self.per_tensor)
        for fmt in self.formats:
            if not fmt.has_range:  # MX: the range is unused
                continue
            candidates = self.space.candidates(fmt, base_absmax)
            if fmt == state.weight_format:
                candidates = torch.cat([candidates, state.weight_max_value.unsqueeze(0)])
            if self._ranks(problem, candidates.shape[0]):
                losses = self._refined_losses(problem, fmt, candidates, state, fmt == state.weight_format)
            else:
                losses = problem.weight_losses(fmt, candidates, state)
            if self.per_tensor:
                index = losses.sum(dim=1).argmin().expand(problem.out_features)
            else:
                index = losses.argmin(dim=0)
            rows = torch.arange(problem.out_features, device=losses.device)
            total = float(problem.normalize(losses[index, rows].sum()))
            if total < best.mse:
                best = dataclasses.replace(state, weight_format=fmt, weight_max_value=candidates[index, rows],
                                           # scored with the data's block scales, rounded to nearest:
                                           weight_block_scale=None, mse=total, weight_codes=None)
        problem.release_weight_stats()  # not held through the next step, which builds its own
        return best

    def _ranks(self, problem: LinearProblem, count: int) -> bool:
        """Whether candidates are ranked by the proxy first: asked for, more candidates than it re-scores, ranges
        per row, and the quadratic-form path (tokens >= in)."""
        return 0 < self.space.weight_refine < count and not self.per_tensor and problem.tokens >= problem.in_features

    def _refined_losses(self, problem: LinearProblem, fmt: QuantFormat, candidates: torch.Tensor, state: QuantParams,
                        has_current: bool) -> torch.Tensor:
        """Exact losses [C, out] for each row's best `weight_refine` candidates by the proxy (and the current
        range, candidates[-1] when has_current); +inf for the others."""
        rough = problem.weight_proxy_losses(fmt, candidates, state, self.space.proxy_rank)
        if has_current:  # always re-scored: the step never ends above the current loss
            rough[-1] = float("-inf")
        keep = min(candidates.shape[0], self.space.weight_refine + has_current)
        index = rough.topk(keep, dim=0, largest=False).indices
        exact = problem.weight_losses(fmt, candidates.gather(0, index), state)  # [k, out]
        return torch.full_like(rough, float("inf")).scatter_(0, index, exact)


def _with_current(acts: ActCandidates, state: QuantParams) -> ActCandidates:
    """acts with the state's own activation quantizer appended as the last candidate."""
    current = ActCandidates.of_state(state)
    device = acts.max_value.device
    shift = clip = None
    if (acts.shift, current.shift) != (None, None):
        width = (acts.shift if acts.shift is not None else current.shift).shape[1]
        shift = torch.cat([s if s is not None else torch.zeros(n, width, dtype=torch.int64, device=device)
                           for s, n in ((acts.shift, len(acts)), (current.shift, 1))])
    if (acts.block_clip, current.block_clip) != (None, None):
        clip = torch.cat([c.to(device) if c is not None else torch.ones(n, device=device)
                          for c, n in ((acts.block_clip, len(acts)), (current.block_clip, 1))])
    return ActCandidates(acts.fmt, torch.cat([acts.max_value, current.max_value.to(device)]), shift, clip)


@dataclass(frozen=True)
class ActRangeStep:
    """Best per-tensor input range (and FPQ's shifts) for every format; keep the best format. With a coarse
    subset (space.act_coarse_tokens), every candidate is ranked on it and the best `act_refine` (and the current
    state) are scored on all tokens. A block-scaled format keeps the state's block clip."""

    formats: tuple[QuantFormat, ...]
    space: SearchSpace
    shifts: bool = False

    def __call__(self, problem: LinearProblem, state: QuantParams) -> QuantParams:
        best = state
        coarse = problem.coarse_rows(self.space.act_coarse_tokens)
        weight = (state.weight_format, state.weight_max_value)
        block_scale = state.weight_block_scale
        for fmt in self.formats:
            if not fmt.has_range:  # MX: the range is unused
                continue
            act_max = self.space.candidates(fmt, problem.act_absmax)
            shift = channel_shift(fmt, act_max, problem.channel_absmax) if self.shifts else None
            clip = None
            if fmt.block is not None and state.act_block_clip is not None:
                clip = state.act_block_clip.to(act_max).reshape(1).expand(len(act_max))
            acts, current = ActCandidates(fmt, act_max, shift, clip), None
            if fmt == state.act_format:
                acts, current = _with_current(acts, state), len(acts)
            index = torch.arange(len(acts), device=act_max.device)
            if coarse is not None and len(acts) > self.space.act_refine:
                rough = problem.act_losses(acts, *weight, x=coarse, weight_block_scale=block_scale)
                index = rough.topk(self.space.act_refine, largest=False).indices
                if current is not None:
                    index = torch.cat([index, torch.tensor([current], device=index.device)]).unique()
                index = index.sort().values
            losses = problem.normalize(problem.act_losses(acts.select(index), *weight, weight_block_scale=block_scale))
            pick = int(losses.argmin())
            chosen = int(index[pick])
            if float(losses[pick]) < best.mse and chosen != current:
                # clones: a view would keep every candidate's shifts [C, in] alive for as long as the result
                best = dataclasses.replace(state, act_format=fmt, act_max_value=acts.max_value[chosen].clone(),
                                           act_channel_shift=None if acts.shift is None else acts.shift[chosen].clone(),
                                           act_block_clip=None if acts.block_clip is None
                                           else acts.block_clip[chosen].clone(),
                                           mse=float(losses[pick]), weight_codes=None)
        return best


def search_linear(problem: LinearProblem, state: QuantParams, steps: Sequence[Step]) -> QuantParams:
    """Run `steps` in order from `state`; the result's mse is recomputed on all tokens when a step changed it
    (mse <= state.mse), mse_minmax is carried over."""
    start = state
    for step in steps:
        state = step(problem, state)
    if state is not start:
        state.mse = problem.loss(state)
    return state


def fpq_steps(weight_format: QuantFormat, act_format: QuantFormat, space: SearchSpace, shifts: bool,
              per_tensor_weight: bool = False) -> tuple[Step, ...]:
    """LLM-FP4's search over every format of the starting formats' widths (module docstring; a block-scaled format:
    itself, MX: none, `range_formats`)."""
    weight_step = WeightRangeStep(range_formats(weight_format), space, per_tensor_weight)
    act_step = ActRangeStep(range_formats(act_format), space, shifts)
    return (ChannelShiftStart(),) * shifts + (weight_step, act_step) * space.search_round


def fpq_search(problem: LinearProblem, weight_format: QuantFormat, act_format: QuantFormat, space: SearchSpace,
               shifts: bool, per_tensor_weight: bool = False) -> tuple[QuantParams, QuantParams]:
    """LLM-FP4's whole per-layer search from MinMax: (searched state, MinMax state); searched.mse <= minmax.mse."""
    start = minmax_state(problem, weight_format, act_format, per_tensor_weight)
    return search_linear(problem, start, fpq_steps(weight_format, act_format, space, shifts, per_tensor_weight)), start
