"""LLM-FP4's weight step at block granularity: the scale of every block of a block-scaled weight format (NVFP4, MX,
any ExMy element), chosen against the layer's output error with the quantized input (`BlockScaleStep`).

Candidates per block, around the max-based scale that `quantize` derives from the block's data:
- power-of-two scale formats (MX, E8M0): the max-based exponent k0 plus each of `exponent_offsets` (default
  -2, -1, 0, +1), clamped to the scale format's exponents (as `block_scales` clamps k0);
- other scale formats (NVFP4, E4M3 under the row's float32 tensor scale t): the scale-format codes at positions
  -codes_below .. +codes_above of the max-based code in the sorted list of the format's non-negative values
  (default 8 below, 4 above: E4M3 has 8 codes per binade, so from about half to about 1.5 times the max-based
  scale), clamped to the list's ends (a clamped duplicate scores the same as its original: argmin keeps the first).
  The block range of code c is top * c * t (`block_range`). With several block maxima (4/6) the max-based code is
  the one the format's rule picks for the block.

Local loss of block j of row o under candidate c: d^T H_j d, d = q(w_oj; c) - w_oj, H_j the [size, size] diagonal
block of G = Xq^T Xq (`LinearProblem._weight_stats`), batched over candidates x rows x blocks (one einsum per
chunk within the problem's budget). It drops the cross-block terms of G, so each row then keeps, by its EXACT loss
u^T G u + 2 u.v + c (`LinearProblem.row_losses`, u the whole row's residual), the best of: the state's own block
scales, the max-based ones and the locally searched ones; then `exact_passes` passes of exact coordinate descent
over the blocks (block j of every row at once tries its `exact_candidates` best local candidates; the exact change
of the row loss includes the cross-block terms; a row takes a move only where its exact loss drops). The step never
returns a state whose loss (`LinearProblem.loss`, recomputed) is above the given one.

Not searched here: the row (tensor) scale t itself (state.weight_max_value is kept) and the activation side, whose
block scales stay dynamic.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from quant_layers.codes import code_table
from quant_layers.formats import QuantFormat
from quant_layers.modules import QuantParams
from quant_layers.quantize import block_range, block_scale_codes, block_scales, quantize
from utils.search.problem import LinearProblem, chunks
from utils.search.space import SearchSpace


def scale_format_values(fmt: QuantFormat) -> torch.Tensor:
    """The non-negative values of an FP scale format (no NaN codes), ascending, float32: for E4M3FN 0 .. 448. Its
    code table (quant_layers/codes.py) under the standard bias; codes 0 .. 2^(E+M) - 1 - nan_codes."""
    count = 2 ** (fmt.exponent_bits + fmt.mantissa_bits) - fmt.nan_codes
    return torch.ldexp(code_table(fmt)[:count], torch.tensor(-fmt.standard_bias))


@dataclass(frozen=True)
class BlockScaleStep:
    """Per-block weight scales of a block-scaled weight format by local search plus exact per-row selection (module
    docstring). A state whose weight format has no block scaling is returned unchanged."""

    codes_below: int = 8
    codes_above: int = 4
    exponent_offsets: tuple[int, ...] = (-2, -1, 0, 1)
    exact_passes: int = 1
    exact_candidates: int = 3  # per block and exact pass: how many of the best local candidates are tried

    @classmethod
    def from_space(cls, space: SearchSpace) -> BlockScaleStep:
        """The step as a config's further step (its candidate sets are this class's defaults)."""
        return cls()

    def candidates(self, fmt: QuantFormat, weight: torch.Tensor, max_value: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate block scales [C, out, blocks], max-based block scales [out, blocks]), encoded as `quantize`'s
        block_scale, of weight [out, in] (float32) under per-row ranges max_value [out]."""
        out, width = weight.shape
        blocks = weight.reshape(out, width // fmt.block.size, fmt.block.size)
        amax = blocks.abs().amax(-1, keepdim=True)
        row_range = max_value.float().view(-1, 1, 1)
        if fmt.block.power_of_two:
            scale_format = fmt.block.scale_format
            base = block_scales(amax, fmt, row_range).squeeze(-1)
            offsets = torch.tensor(self.exponent_offsets, dtype=torch.int32, device=weight.device)
            cands = (base.unsqueeze(0) + offsets.view(-1, 1, 1)).clamp_(-scale_format.standard_bias,
                                                                         scale_format.max_exponent)
            return cands, base
        code, tensor_scale = block_scale_codes(amax, fmt, row_range, blocks)  # 4/6: the block's own choice
        values = scale_format_values(fmt.block.scale_format).to(weight.device)
        # codes are exact values of the list; int32 positions halve the [C, out, blocks] index, the largest temporary
        position = torch.searchsorted(values, code.squeeze(-1).contiguous(), out_int32=True)
        offsets = torch.arange(-self.codes_below, self.codes_above + 1, dtype=torch.int32, device=weight.device)
        index = (position.unsqueeze(0) + offsets.view(-1, 1, 1)).clamp_(0, values.numel() - 1)
        candidate_codes = values[index]
        del index
        t = tensor_scale.squeeze(-1)
        return block_range(fmt, candidate_codes, t.unsqueeze(0)), block_range(fmt, values[position], t)

    def __call__(self, problem: LinearProblem, state: QuantParams) -> QuantParams:
        fmt = state.weight_format
        if fmt is None or fmt.block is None:
            return state
        problem.weight_stats(state)  # G, V, c (kept by the problem) made before the candidates' tensors exist
        weight = problem.weight.float()
        cands, max_based = self.candidates(fmt, weight, state.weight_max_value)
        local = local_block_losses(problem, state, cands, weight)  # [C, out, blocks]
        searched = cands.gather(0, local.argmin(0, keepdim=True))[0]
        # each block's exact_candidates best local candidates [k, out, blocks]; the [C, out, blocks] tensors (and the
        # int64 sort) are dropped here, before the exact losses and the descent
        trials = cands.gather(0, local.argsort(0)[: self.exact_candidates]) if self.exact_passes else None
        del cands, local
        current = state.weight_block_scale.to(max_based) if state.weight_block_scale is not None else max_based
        options = torch.stack([current, max_based, searched])
        exact = exact_row_losses(problem, state, options, weight)  # [3, out]
        best_loss = exact.min(0).values
        pick = (exact <= best_loss).to(torch.int8).argmax(0)  # the first option reaching the minimum: current first
        chosen = options.gather(0, pick.view(1, -1, 1).expand(1, *options.shape[1:]))[0]
        if self.exact_passes:
            chosen = self._descend(problem, state, weight, trials, chosen, best_loss)
        result = dataclasses.replace(state, weight_block_scale=chosen, weight_codes=None)  # scored rounded to nearest
        problem.release_weight_stats()  # before the loss, which reads X and W only
        result.mse = problem.loss(result)
        if math.isnan(state.mse) or result.mse <= state.mse:
            return result
        return state

    def _descend(self, problem: LinearProblem, state: QuantParams, weight: torch.Tensor, trials: torch.Tensor,
                 chosen: torch.Tensor, best_loss: torch.Tensor) -> torch.Tensor:
        """`exact_passes` passes of exact coordinate descent over the blocks, all rows at once: block j of row o
        moves to the one of its `exact_candidates` best local candidates (trials [k, out, blocks]) that lowers the
        exact row loss most, the change computed exactly from g = u G + v: 2 e . g_j + e^T H_j e for a change e of
        block j's residual. A row whose exact loss (recomputed at the end) did not drop keeps its scales."""
        fmt, size = state.weight_format, state.weight_format.block.size
        gram, v, _ = problem.weight_stats(state)
        gram = gram.float()
        hessian = diagonal_blocks(gram, size)
        max_value = state.weight_max_value.view(-1, 1)
        start = chosen
        chosen = chosen.clone()
        u = quantize(weight, fmt, max_value, chosen) - weight
        g = u @ gram + v
        for _ in range(self.exact_passes):
            for block in range(trials.shape[2]):
                cols = slice(block * size, (block + 1) * size)
                trial = trials[:, :, block]  # [k, out]
                e = quantize(weight[:, cols], fmt, max_value, trial.unsqueeze(-1)) - weight[:, cols] - u[:, cols]
                change = 2 * (e * g[:, cols]).sum(-1) + torch.einsum("kob,bc,koc->ko", e, hessian[block], e)
                best_change, which = change.min(0)
                rows = (best_change < 0).nonzero().squeeze(-1)
                if rows.numel():
                    step = e[which[rows], rows]  # [r, size]
                    u[rows, cols] += step
                    g[rows] += step @ gram[cols]
                    chosen[rows, block] = trial[which[rows], rows]
        del u, g, gram, hessian  # the exact losses below make their own residuals
        exact = exact_row_losses(problem, state, chosen, weight)
        return torch.where((exact < best_loss).unsqueeze(-1), chosen, start)


def exact_row_losses(problem: LinearProblem, state: QuantParams, scales: torch.Tensor, weight: torch.Tensor
                     ) -> torch.Tensor:
    """Exact row losses [..., out] (`LinearProblem.row_losses`) of state's weight format under block scales
    [..., out, blocks] for weight [out, in] (problem.weight in float32, the caller's copy), the residuals built in
    row chunks within the problem's budget."""
    max_value = state.weight_max_value.view(-1, 1)
    count = scales[..., 0, 0].numel()
    losses = torch.empty(*scales.shape[:-1], device=weight.device)
    for rows in chunks(problem.out_features, problem.budget.rows(problem.in_features * 16 * count)):
        u = quantize(weight[rows], state.weight_format, max_value[rows], scales[..., rows, :]) - weight[rows]
        losses[..., rows] = problem.row_losses(u, state, rows)
    return losses


def diagonal_blocks(gram: torch.Tensor, size: int) -> torch.Tensor:
    """The [size, size] diagonal blocks of gram [in, in] as [in / size, size, size] (float32: only the blocks are
    converted, not the whole of a bfloat16 gram)."""
    blocks = gram.shape[0] // size
    return gram.view(blocks, size, blocks, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1).float()


def local_block_losses(problem: LinearProblem, state: QuantParams, cands: torch.Tensor, weight: torch.Tensor
                       ) -> torch.Tensor:
    """d^T H_j d [C, out, blocks] for candidate block scales cands [C, out, blocks] of state's weight format, d the
    block's residual of weight [out, in] (problem.weight in float32, the caller's copy) and H_j the diagonal block
    of G (the quantized inputs of state's activation quantizer); chunked over rows and candidates to the problem's
    budget (about 16 bytes per weight element)."""
    fmt = state.weight_format
    gram = problem.weight_stats(state)[0]
    hessian = diagonal_blocks(gram, fmt.block.size)
    max_value = state.weight_max_value.view(-1, 1)
    count, out, blocks = cands.shape
    losses = torch.empty(count, out, blocks, device=weight.device)
    rows_step = min(out, problem.budget.rows(problem.in_features * 16))
    for rows in chunks(out, rows_step):
        cand_step = max(1, problem.budget.rows(problem.in_features * 16) // (rows.stop - rows.start))
        for cs in chunks(count, cand_step):
            d = quantize(weight[rows], fmt, max_value[rows], cands[cs, rows]) - weight[rows]
            d = d.view(d.shape[0], d.shape[1], blocks, fmt.block.size)
            losses[cs, rows] = torch.einsum("crjb,jbk,crjk->crj", d, hessian, d)
    return losses
