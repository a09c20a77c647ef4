"""GPTQ rounding (Frantar et al. 2022) under frozen scales, for every weight format `quantize` computes.

The scales are chosen first and kept: a per-row range max_value and, for block-scaled formats, the block scales
(`max_based_block_scale` freezes the ones `quantize` derives from the original weight). GPTQ then only chooses the
rounding: the columns of W [rows, in] are rounded one at a time, in `order`, and each column's rounding error is
spread over the columns not yet rounded so as to minimize the layer's output error ||(Q - W) X^T||^2 under the
Hessian H = X^T X [in, in] of the inputs (the quantized inputs Xq where the activation is quantized). With
U = chol(H^-1) the upper Cholesky factor of the inverse of the damped H (the published reference implementation):

    q_j = quant(w_j),    e = (w_j - q_j) / U_jj,    w_k -= e U_jk  for every k after j in the order,

computed in lazy blocks of `block_size` columns (updates inside a block column by column, to the rest of W once per
block). Damping: lambda = damping * mean(diag H) is added to H's diagonal. A dead column (H_jj = 0: its input is
always zero) gets H_jj = 1 before the damping; unlike the reference, its weights are kept (not set to 0), and it is
rounded to nearest (it is coupled to no other column).

The element rounding is a plain callable `quantize_columns(values [rows, k], columns [k]) -> [rows, k]`; the one of
`frozen_quantizer` is bit for bit what `quantize(W, fmt, max_value, block_scale)` does to those elements. Every row
is rounded at once (rows are independent given H); float32 by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quant_layers.formats import QuantFormat
from quant_layers.quantize import block_scales, quantize, quantize_elements

ColumnQuantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def max_based_block_scale(weight: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor) -> torch.Tensor:
    """The block scales [rows, in / size] `quantize(weight, fmt, max_value)` derives from weight [rows, in] (its block
    maxima), encoded as quantize's block_scale: int32 exponents k for power-of-two scale formats, float32 ranges
    top * code * t otherwise; max_value: the per-row range [rows] or [rows, 1] (unused by MX)."""
    size = fmt.block.size
    rows, width = weight.shape
    blocks = weight.float().reshape(rows, width // size, size)
    amax = blocks.abs().amax(-1, keepdim=True)
    return block_scales(amax, fmt, max_value.float().reshape(-1, 1, 1), blocks).squeeze(-1)  # 4/6 needs the blocks


def frozen_quantizer(fmt: QuantFormat, max_value: torch.Tensor, block_scale: torch.Tensor | None = None
                     ) -> ColumnQuantizer:
    """quantize_columns(values [rows, k], columns [k] int64) -> float32 [rows, k]: the elements of columns `columns`
    rounded under frozen scales, bit for bit as `quantize(W, fmt, max_value.view(-1, 1), block_scale)` rounds those
    elements (values are taken as float32, as quantize takes them).

    max_value: per-row ranges [rows] (or []); block_scale [rows, in / size]: required for block-scaled formats
    (an element uses its block's scale: ExMy element Q(x; R), zero where R = 0, or 2^k Q(x 2^-k; standard_max)).
    """
    row_range = max_value.to(torch.float32).reshape(-1, 1)
    if fmt.block is None:
        if block_scale is not None:
            raise ValueError(f"block_scale needs a block-scaled format, got {fmt.name}")
        return lambda values, columns: quantize(values.to(torch.float32), fmt, row_range)
    if block_scale is None:
        raise ValueError(f"{fmt.name}: freeze the block scales first (max_based_block_scale)")
    scales = block_scale.to(torch.int32 if fmt.block.power_of_two else torch.float32)
    size = fmt.block.size
    return lambda values, columns: quantize_elements(values.to(torch.float32), fmt, scales[:, columns // size])


def activation_order(hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ's static activation order: the columns by diag(H) descending (ties in column order), int64 [in]."""
    return torch.argsort(hessian.diagonal(), descending=True, stable=True)


def damped_hessian(hessian: torch.Tensor, damping: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """H' = H + lambda I [in, in] in dtype (a copy): dead columns (H_jj = 0) given H_jj = 1 first, then
    lambda = damping * mean(diag H) added to the diagonal."""
    h = hessian.to(dtype, copy=True)
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal += damping * diagonal.mean()
    return h


def inverse_hessian_factor(hessian: torch.Tensor, damping: float, order: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U = chol(H'^-1) [in, in] in dtype, upper triangular (U^T U = H'^-1), of H' = `damped_hessian` with rows and
    columns in `order`. torch.linalg.LinAlgError where H' is not positive definite. At most two [in, in] matrices
    live at once (each step's input is dropped as its output exists)."""
    factor = damped_hessian(hessian, damping, dtype)[order][:, order]
    factor = torch.linalg.cholesky(factor)
    factor = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(factor, upper=True)


def output_target_factor(hessian: torch.Tensor, damping: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L = chol(H') [in, in] (lower), H' = `damped_hessian`: what `target_from_factor` solves with.
    torch.linalg.LinAlgError where H' is not positive definite."""
    return torch.linalg.cholesky(damped_hessian(hessian, damping, dtype))


def target_from_factor(weight: torch.Tensor, cross: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """W* = W - V H'^-1 [rows, in] in factor's dtype, from L = `output_target_factor` (rows independent: any
    slice of rows of weight and cross gives those rows of W*)."""
    return weight.to(factor.dtype) - torch.cholesky_solve(cross.to(factor.dtype).T, factor).T


def output_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damping: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The real-valued weight [rows, in] that minimises the layer's damped output error against the unquantized
    layer, with the quantized input Xq [N, in] of the unquantized input X:

        W* = argmin_W' ||Xq W'^T - X W^T||^2 + lambda ||W' - W||^2 = W - V H'^-1,

    H = hessian = Xq^T Xq [in, in], H' = `damped_hessian(H, damping)`, V = cross = (D W^T)^T Xq [rows, in] with
    D = Xq - X (LinearProblem.weight_stats' V). GPTQ rounding W* under H then minimises the exact output error
    ||Xq Q^T - X W^T||^2 (its linear term 2 (Q - W) . v included), where rounding W minimises ||(Q - W) Xq^T||^2
    alone (the asymmetric calibration of GPTAQ, Li et al. 2025, with this layer's own input error). In dtype;
    torch.linalg.LinAlgError where H' is not positive definite."""
    return target_from_factor(weight, cross, output_target_factor(hessian, damping, dtype))


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, quantize_columns: ColumnQuantizer,
               damping: float = 0.01, block_size: int = 128, order: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GPTQ's rounding of weight [rows, in] (finite) under H = hessian [in, in] (symmetric PSD, e.g. Xq^T Xq):

    columns in `order` (a permutation of 0..in-1, int64; None: 0, 1, ...; `activation_order` for GPTQ's act order),
    each rounded by quantize_columns (its original column index passed, so it keeps its own scales), its error
    e = (w_j - q_j) / U_jj fed to the later columns through U = `inverse_hessian_factor` (module docstring), in lazy
    blocks of block_size columns; the updates are computed in dtype. Returns the rounded values [rows, in] float32.
    """
    rows, width = weight.shape
    if tuple(hessian.shape) != (width, width):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not fit a weight of {width} columns")
    if damping <= 0 or block_size < 1:
        raise ValueError(f"GPTQ needs damping > 0 and block_size >= 1, got {damping}, {block_size}")
    if not torch.isfinite(weight).all():
        raise ValueError("GPTQ needs a finite weight")
    if order is None:
        order = torch.arange(width, device=weight.device)
    elif not torch.equal(order.sort().values, torch.arange(width, device=order.device)):
        raise ValueError(f"order must be a permutation of 0..{width - 1}")
    order = order.to(device=weight.device, dtype=torch.int64)
    factor = inverse_hessian_factor(hessian.to(weight.device), damping, order, dtype)
    return gptq_round_factored(weight, factor, quantize_columns, block_size, order)


def gptq_round_factored(weight: torch.Tensor, factor: torch.Tensor, quantize_columns: ColumnQuantizer,
                        block_size: int, order: torch.Tensor) -> torch.Tensor:
    """`gptq_round` from its factor U = `inverse_hessian_factor(H, damping, order, dtype)` [in, in] (the updates in
    U's dtype; order int64 on weight's device, unchecked), for a caller that makes U itself (GPTQStep: once, with
    its damping retries). Returns float32 [rows, in]."""
    rows, width = weight.shape
    dtype = factor.dtype
    w = weight.to(dtype)[:, order]  # a copy, in the order of rounding
    rounded = torch.empty(rows, width, dtype=torch.float32, device=weight.device)  # in the weight's column order
    for start in range(0, width, block_size):
        stop = min(start + block_size, width)
        block = w[:, start:stop]  # a view: updated in place
        errors = torch.empty(rows, stop - start, dtype=dtype, device=weight.device)
        for i in range(stop - start):
            j = start + i
            column = order[j:j + 1]
            q = quantize_columns(block[:, i:i + 1], column)
            rounded[:, column] = q
            error = (block[:, i:i + 1] - q.to(dtype)) / factor[j, j]
            block[:, i:] -= error * factor[j, j:stop]
            errors[:, i:i + 1] = error
        w[:, stop:] -= errors @ factor[start:stop, stop:]
    return rounded
