"""The activation step of block-scaled formats: the clipping multiplier of the dynamic block scale (`ActBlockClipStep`).

Activations' block scales stay dynamic, derived from each block's data at run time as the format defines them
(NVFP4, MX; quant_layers/formats.py); what a calibration can fix per Linear is a static multiplier alpha of the block
maximum the scale is derived from: a block's scale comes from alpha * amax, so its elements beyond that saturate
(`quantize`'s clip, QuantParams.act_block_clip). LLM-FP4's activation range step applied to the scale rule: every
multiplier of `SearchSpace.act_clip_candidates` is scored by the layer's output error with the weight fixed
(`LinearProblem.act_losses`, batched over candidates x token chunks within the problem's budget), ranked on a strided
token subset first when `act_coarse_tokens` applies (the best `act_refine` re-scored on all tokens). The current
multiplier is always a candidate and the step returns a new state only where its recomputed loss is not above the
given one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from quant_layers.modules import QuantParams
from utils.search.problem import ActCandidates, LinearProblem
from utils.search.space import ACT_CLIP_CANDIDATES, SearchSpace


@dataclass(frozen=True)
class ActBlockClipStep:
    """The clipping multiplier of a block-scaled activation format's dynamic block maxima (module docstring). A
    state without a block-scaled activation format (or without a weight format) is returned unchanged."""

    candidates: tuple[float, ...] = ACT_CLIP_CANDIDATES
    coarse_tokens: int = 4096  # 0: every candidate on every token
    refine: int = 8  # candidates re-scored on all tokens after the coarse ranking

    @classmethod
    def from_space(cls, space: SearchSpace) -> "ActBlockClipStep":
        return cls(space.act_clip_candidates, space.act_coarse_tokens, space.act_refine)

    def clips(self, state: QuantParams, device: torch.device) -> tuple[torch.Tensor, int]:
        """(candidate multipliers [C] float32, the index of the state's own: the last); the grid without the state's
        own value, which is appended once."""
        current = torch.ones((), device=device) if state.act_block_clip is None else \
            state.act_block_clip.to(device=device, dtype=torch.float32).reshape(())
        grid = torch.tensor(self.candidates, dtype=torch.float32, device=device)
        clips = torch.cat([grid[grid != current], current.view(1)])
        return clips, clips.numel() - 1

    def __call__(self, problem: LinearProblem, state: QuantParams) -> QuantParams:
        fmt = state.act_format
        if fmt is None or fmt.block is None or state.weight_format is None:
            return state
        device = problem.x.device
        clips, current = self.clips(state, device)
        count = clips.numel()
        shift = None if state.act_channel_shift is None else \
            state.act_channel_shift.to(device).view(1, -1).expand(count, -1)
        acts = ActCandidates(fmt, state.act_max_value.to(device=device, dtype=torch.float32).reshape(1).expand(count),
                             shift, clips)
        weight = (state.weight_format, state.weight_max_value)
        block_scale = state.weight_block_scale
        index = torch.arange(count, device=device)
        coarse = problem.coarse_rows(self.coarse_tokens)
        if coarse is not None and count > self.refine:
            rough = problem.act_losses(acts, *weight, x=coarse, weight_block_scale=block_scale)
            index = torch.cat([rough.topk(self.refine, largest=False).indices,
                               torch.tensor([current], device=device)]).unique().sort().values
        losses = problem.act_losses(acts.select(index), *weight, weight_block_scale=block_scale)
        pick = int(losses.argmin())
        chosen = int(index[pick])
        if chosen == current or not losses[pick] < losses[index == current][0]:
            return state
        result = dataclasses.replace(state, act_block_clip=clips[chosen].clone())
        result.mse = problem.loss(result)
        start = state.mse if not math.isnan(state.mse) else problem.loss(state)
        return result if result.mse <= start else state
