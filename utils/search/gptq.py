"""GPTQ's rounding as a search step (`GPTQStep`): the state's scales are kept, the rounding of the weight is chosen
against the layer's output error with the quantized input; the math is in quant_layers/gptq.py.

1. Freeze the scales: the per-row ranges state.weight_max_value and, for block-scaled formats, the state's block
   scales, or (None) the max-based ones `quantize` derives from the original weight (`max_based_block_scale`).
2. Round every row by GPTQ (`gptq_round`) with H = G = Xq^T Xq of the state's activation quantizer
   (`LinearProblem.weight_stats`), in static activation order, damping and lazy block size from the knobs; aimed at
   W itself (aim "weight", the published algorithm) or at W* = W - V G'^-1, the real-valued minimiser of the exact
   output error below (aim "output", `output_target`: the rounding also compensates the input's own quantization).
   GPTQ's pass runs once over all rows (its Python loop over the columns is the step's time): its working copy of
   the target and the rounding in float32, beside W and G as the problem holds them (bfloat16 on a GPU), the
   float32 factor U and, for aim "output", W* (float32); the step keeps no float32 copy of W or G.
3. Per row, keep GPTQ's rounding only where its EXACT row loss u^T G u + 2 u.v + c (`LinearProblem.row_losses`) is
   below the one of the state's own rounding under the same scales (round to nearest, or the state's stored codes):
   rows are independent given the activation quantizer, so the sum of the row losses only goes down.
4. Store the result as codes (QuantParams.weight_codes, `encode_frozen`) with the frozen block scales, recompute the
   loss (`LinearProblem.loss`, the reference quantizer) and return the given state where it is not above it.
   Steps 3 and 4 run in the row slices of `LinearProblem.row_loss_chunks` (the slices row_losses takes anyway, so
   the products are the same bit for bit): W in float32, the state's own rounding, the residuals and the codes'
   temporaries exist for one slice at a time.

A state without a weight format is returned unchanged. Where the damped H has no Cholesky factor (the damping too
small for a badly rounded G, e.g. G in bfloat16 on a GPU) the damping is raised tenfold, twice (DAMPING_RETRIES);
if H still has none the state is returned unchanged, with a warning naming the Linear's shape.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from quant_layers.codes import decode_frozen, encode_frozen
from quant_layers.gptq import (activation_order, frozen_quantizer, gptq_round_factored, inverse_hessian_factor,
                               max_based_block_scale, output_target_factor, target_from_factor)
from quant_layers.modules import QuantParams
from quant_layers.quantize import quantize
from utils.search.problem import LinearProblem, chunks
from utils.search.space import SearchSpace

DAMPING_RETRIES = (1.0, 10.0, 100.0)  # multipliers of the damping tried in turn while H + lambda I has no factor
AIMS = ("weight", "output")  # what GPTQ's rounding approaches: W, or the exact output error's minimiser W*
ENCODE_BYTES = 40  # encode_frozen's working memory per weight element (32 measured on the CPU, NVFP4 and MXFP4)


@dataclass(frozen=True)
class GPTQStep:
    """GPTQ's rounding of the weight under the state's frozen scales, kept per row where it lowers the exact loss
    (module docstring). damping: fraction of mean(diag G) added to G's diagonal; block_size: columns per lazy
    block; act_order: round columns by diag(G) descending (GPTQ's static activation order), else in column order;
    aim: "weight" rounds toward W, "output" toward `output_target`'s W* (AIMS)."""

    damping: float = 0.01
    block_size: int = 128
    act_order: bool = True
    aim: str = "weight"

    def __post_init__(self) -> None:
        if self.aim not in AIMS:
            raise ValueError(f"GPTQ's aim must be one of {', '.join(AIMS)}, got {self.aim!r}")

    @classmethod
    def from_space(cls, space: SearchSpace) -> GPTQStep:
        """The step with the run's knobs --gptq_damping and --gptq_block."""
        return cls(damping=space.gptq_damping, block_size=space.gptq_block)

    def __call__(self, problem: LinearProblem, state: QuantParams) -> QuantParams:
        fmt = state.weight_format
        if fmt is None:
            return state
        # the stats' own G (bfloat16 on a GPU): the factors copy it to float32 and its diagonal sorts as in float32
        gram, cross, _ = problem.weight_stats(state)
        order = activation_order(gram) if self.act_order else torch.arange(problem.in_features, device=gram.device)
        factors = self._factors(gram, order)
        del gram
        if factors is None:
            problem.release_weight_stats()
            warnings.warn(f"GPTQ: Xq^T Xq of a {problem.out_features} x {problem.in_features} Linear has no Cholesky "
                          f"factor up to damping {self.damping * DAMPING_RETRIES[-1]:g}; it keeps its rounding",
                          stacklevel=2)
            return state
        inverse_factor, target_factor = factors
        del factors
        # no float32 copy of W lives through the column loop and the selection: each use upcasts its own (exact)
        max_value = state.weight_max_value.float().view(-1, 1)
        block_scale = state.weight_block_scale
        if fmt.block is not None and block_scale is None:
            block_scale = max_based_block_scale(problem.weight.float(), fmt, max_value)
        if target_factor is None:
            target = problem.weight  # gptq_round_factored rounds a float32 copy of it
        else:
            target = target_from_factor(problem.weight.float(), cross.float(), target_factor)
        del target_factor, cross
        rounded = gptq_round_factored(target, inverse_factor, frozen_quantizer(fmt, max_value, block_scale),
                                      self.block_size, order)
        del target, inverse_factor, order
        row_range = max_value.expand(problem.out_features, 1)
        codes = torch.cat([self._select(problem, state, rows, problem.weight[rows].float(), rounded[rows],
                                        row_range[rows], None if block_scale is None else block_scale[rows])
                           for rows in problem.row_loss_chunks(problem.out_features)])
        del rounded
        result = dataclasses.replace(state, weight_block_scale=block_scale, weight_codes=codes)
        problem.release_weight_stats()  # before the loss, which reads X and W only
        result.mse = problem.loss(result)
        if math.isnan(state.mse) or result.mse <= state.mse:
            return result
        return state

    def _factors(self, gram: torch.Tensor, order: torch.Tensor) -> tuple | None:
        """(U = chol(H'^-1) in `order`, L = chol(H') for the output aim or None) at the first damping of
        DAMPING_RETRIES whose H' has the factors; None where none has."""
        for retry in DAMPING_RETRIES:
            damping = self.damping * retry
            try:
                target = None if self.aim == "weight" else output_target_factor(gram, damping)
                return inverse_hessian_factor(gram, damping, order), target
            except torch.linalg.LinAlgError:
                continue
        return None

    @staticmethod
    def _select(problem: LinearProblem, state: QuantParams, rows: slice, weight: torch.Tensor, rounded: torch.Tensor,
                max_value: torch.Tensor, block_scale: torch.Tensor | None) -> torch.Tensor:
        """Codes [r, in] of the output rows `rows` (weight, rounded [r, in], max_value [r, 1]): GPTQ's rounding where
        its exact row loss is below the state's own rounding's (step 3), encoded under the frozen scales (step 4) in
        row parts within the budget (ENCODE_BYTES per element)."""
        fmt = state.weight_format
        if state.weight_codes is None:
            current = quantize(weight, fmt, max_value, block_scale)
        else:
            current = decode_frozen(state.weight_codes[rows].to(weight.device), fmt, max_value, block_scale)
        better = problem.row_losses(rounded - weight, state, rows) < problem.row_losses(current - weight, state, rows)
        chosen = torch.where(better.view(-1, 1), rounded, current)
        del current
        parts = chunks(chosen.shape[0], problem.budget.rows(ENCODE_BYTES * problem.in_features))
        return torch.cat([encode_frozen(chosen[part], fmt, max_value[part],
                                        None if block_scale is None else block_scale[part]) for part in parts])


class GPTQOutputStep:
    """The config step of GPTQ aimed at the exact output error's minimiser (recipe component `gptqout`): built by
    from_space as GPTQStep(aim="output") with the run's knobs; a parameter file records it by this class's name."""

    @staticmethod
    def from_space(space: SearchSpace) -> GPTQStep:
        return dataclasses.replace(GPTQStep.from_space(space), aim="output")
