"""Weight-only search of a lookup table (the token embedding): per-row ranges minimizing the table's own
quantization error, since its output feeds no Linear whose inputs the search could use."""

from __future__ import annotations

import torch

from quant_layers.formats import QuantFormat
from quant_layers.modules import QuantParams
from quant_layers.quantize import abs_max, quantize
from utils.search.problem import Budget, chunks
from utils.search.space import TINY, SearchSpace, range_formats


def search_table(weight: torch.Tensor, fmt: QuantFormat, space: SearchSpace | None, budget: Budget) -> QuantParams:
    """Weight-only search for a lookup table [rows, dim] (the token embedding): per-row range minimizing
    |Q(E) - E|^2 over every format of fmt's width (a block-scaled format: itself; MX: none, `range_formats`);
    space None = MinMax. Rows are independent, so the table goes
    in row slices within the budget (Qwen's 151936 x 1536 table is 0.9 GiB in float32 per candidate).

    Returns QuantParams(format, range [rows], mse=searched MSE, mse_minmax=MinMax MSE, kind="embedding").
    """
    formats = list(range_formats(fmt)) if space is not None else []
    rows_per_step = budget.rows(weight.shape[1] * 12)  # float32 row, its quantized copy, their squared difference
    absmax = torch.empty(weight.shape[0], device=weight.device)
    minmax_rows = torch.empty(weight.shape[0], device=weight.device)
    best_rows = torch.empty(len(formats), weight.shape[0], device=weight.device)  # per format: best loss per row
    best_ranges = torch.empty(len(formats), weight.shape[0], device=weight.device)
    for rows in chunks(weight.shape[0], rows_per_step):
        w = weight[rows].float()
        absmax[rows] = abs_max(w, dim=1).clamp(min=TINY)
        minmax_rows[rows] = (quantize(w, fmt, absmax[rows].view(-1, 1)) - w).square().sum(dim=-1)
        for index, candidate_format in enumerate(formats):
            candidates = space.candidates(candidate_format, absmax[rows])  # [C, rows of the slice]
            losses = torch.cat([(quantize(w, candidate_format, candidates[c].unsqueeze(-1)) - w).square().sum(dim=-1)
                                for c in chunks(candidates.shape[0], max(1, rows_per_step // w.shape[0]))])
            best_rows[index, rows], chosen = losses.min(dim=0)
            best_ranges[index, rows] = candidates[chosen, torch.arange(w.shape[0], device=w.device)]
    numel = weight.numel()
    minmax_loss = float(minmax_rows.sum()) / numel
    best = (fmt, absmax, minmax_loss)
    for index, candidate_format in enumerate(formats):
        total = float(best_rows[index].sum()) / numel
        if total < best[2]:
            best = (candidate_format, best_ranges[index], total)
    best_format, best_range, best_loss = best
    return QuantParams(best_format, best_range, mse=best_loss, mse_minmax=minmax_loss, kind="embedding")
