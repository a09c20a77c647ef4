"""Fused Triton kernels: the quantizer of quant_layers/quantize.py (reads x once, writes once), and the search's
weight proxy built on it (`residual_proxy`, at the end of this file).

For candidate c and element x[r, i] of a row-major [rows, channels] tensor:

    y = clamp(x * k[c, i] * s[c, r], +-grid_max),   g = round_to_grid(y)  (ties to even)
    out[c, r, i] = g * u[c, r]  (FAKE),  g / k[c, i]  (GRID),  g * u[c, r] - x  (RESIDUAL)  or  g  (CODES)

with k an optional table of per-channel powers of two, s one scale per candidate, or per candidate and
row (weights), and u = max_value / grid_max the reference's inverse scale (quantize.py). The tensor is
read in [rows, channels] tiles, so per-row scales and per-channel multipliers are loaded once per tile.

Every step is the reference's float32 operation in the reference's order (rounding is the exact
1.5 * 2^23 trick; dividing by a power of two is multiplying by its exact reciprocal), so FAKE and GRID
equal the PyTorch reference bit for bit; RESIDUAL (used by the search only) may be one fused
multiply-subtract on the GPU. tests/kernel_check.py checks all three under Triton's interpreter on CPU
(in the test suite) and compiled on CUDA. CODES writes the E4M3 bytes of the standard-grid values for the FP8 GEMM
(quant_layers/fp8_linear.py: exact for the grids it accepts, so the cast rounds nothing) into a uint8 tensor
(`fake_quantize(..., dtype=torch.uint8)`, viewed as torch.float8_e4m3fn by the caller); tests/test_fp8_linear.py
checks it under the interpreter, bench/fp8_gemm.py on CUDA before it times anything. The entry points of quantize.py choose between a kernel and its
reference with their `use_kernel` argument; `unavailable_reason` says why a kernel cannot run (no Triton, a CPU
tensor without the interpreter, a format it does not implement: block-scaled or unsigned).
"""

from __future__ import annotations

import contextlib
import os

import torch

from quant_layers.formats import QuantFormat

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch reference is used
    triton = None

FAKE, GRID, RESIDUAL, CODES = 0, 1, 2, 3  # output modes


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(fmt: QuantFormat) -> bool:
    """The kernels implement signed element formats (FP with any exponent bits, INT), not block scaling."""
    return fmt.block is None and fmt.signed


def unavailable_reason(x: torch.Tensor, fmt: QuantFormat) -> str | None:
    """Why the kernels cannot quantize x to fmt here, or None: Triton missing, a CPU tensor without Triton's
    interpreter (TRITON_INTERPRET=1), or a format they do not implement."""
    if triton is None:
        return "Triton is not installed"
    if not (x.is_cuda or _interpreted()):
        return f"the tensor is on {x.device} (kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    if not supports(fmt):
        return f"{fmt.name} is not implemented by the kernels (signed element formats only)"
    return None


if triton is not None:

    @triton.jit
    def _round_half_even(v):
        """Nearest integer, ties to even, for |v| < 2^22 (float32 addition rounds to nearest even)."""
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _standard_grid(y, grid_max, MANTISSA_BITS: tl.constexpr, IS_INT: tl.constexpr):
        """round_to_grid of float32 y = x * s: saturate to +-grid_max (NaN stays), nearest grid point, ties to even."""
        clamped = tl.minimum(tl.maximum(y, -grid_max), grid_max)
        y = tl.where(y != y, y, clamped)
        magnitude = tl.abs(y)
        if IS_INT:
            rounded = _round_half_even(magnitude)
        else:
            step_bits = tl.maximum(magnitude.to(tl.int32, bitcast=True) & 0x7F800000, 128 << 23)
            step_bits = step_bits - (MANTISSA_BITS << 23)
            step = step_bits.to(tl.float32, bitcast=True)
            inverse_step = ((254 << 23) - step_bits).to(tl.float32, bitcast=True)
            rounded = _round_half_even(magnitude * inverse_step) * step
        sign = y.to(tl.int32, bitcast=True) & -2147483648
        return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _fake_quantize_kernel(x_ptr, out_ptr, scale_ptr, inverse_ptr, channel_ptr, rows, channels, grid_max,
                              MANTISSA_BITS: tl.constexpr, IS_INT: tl.constexpr, HAS_CHANNEL: tl.constexpr,
                              ROW_SCALE: tl.constexpr, MODE: tl.constexpr, MANUAL_BF16: tl.constexpr,
                              BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        candidate = tl.program_id(2).to(tl.int64)
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        row_ok, col_ok = row < rows, col < channels
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = row[:, None] * channels + col[None, :]
        x_in = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = x_in
        if ROW_SCALE:
            scale = tl.load(scale_ptr + candidate * rows + row, mask=row_ok, other=1.0)[:, None]
            inverse = tl.load(inverse_ptr + candidate * rows + row, mask=row_ok, other=1.0)[:, None]
        else:
            scale = tl.load(scale_ptr + candidate)
            inverse = tl.load(inverse_ptr + candidate)
        if HAS_CHANNEL:
            multiplier = tl.load(channel_ptr + candidate * channels + col, mask=col_ok, other=1.0)[None, :]
            x = x * multiplier
        grid = _standard_grid(x * scale, grid_max, MANTISSA_BITS, IS_INT)
        if MODE == 1:
            if HAS_CHANNEL:  # multiply by the exact reciprocal of a power of two
                grid = grid * ((254 << 23) - multiplier.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
            result = grid
        elif MODE == 2:
            result = grid * inverse - x_in
        elif MODE == 3:  # E4M3 bytes of g (exact); NaN stays NaN (the interpreter's cast saturates it to 384)
            result = tl.where(grid != grid, 0x7F, grid.to(tl.float8e4nv).to(tl.uint8, bitcast=True))
        else:
            result = grid * inverse
        if MANUAL_BF16:  # the interpreter truncates float32 -> bfloat16: round to nearest even by hand
            bits = result.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            result = bits.to(tl.float32, bitcast=True)
        out_offsets = candidate * rows * channels + offsets
        tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_ROWS, BLOCK_COLS, num_warps) tried once per (channels, mode, scale layout, dtypes) on the GPU; the fastest
# is kept (the output is rewritten by every trial, so the result does not depend on which wins). The last four keep
# 64 elements per thread in flight (more bytes in flight per SM for the large activation tensors).
TILES = ((8, 256, 8), (4, 256, 4), (16, 256, 8), (32, 256, 8), (16, 512, 8), (8, 512, 4), (4, 1024, 8), (2, 1024, 4),
         (32, 128, 4), (64, 128, 8), (16, 512, 4), (32, 512, 8), (16, 1024, 8), (64, 256, 8))
INTERPRETER_TILE = (8, 256, 4)  # the autotuner needs a GPU to time its configurations

if triton is not None:
    _tuned_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK_ROWS": r, "BLOCK_COLS": c}, num_warps=w) for r, c, w in TILES],
        key=["channels", "MODE", "ROW_SCALE", "HAS_CHANNEL"],  # the search's modes and evaluation's tune apart
    )(_fake_quantize_kernel)


def _needs_triton() -> None:
    if triton is None:
        raise RuntimeError("the fused kernels need Triton, which is not installed (pip install triton)")


def fake_quantize(x: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor, inverse: torch.Tensor,
                  channel_scale: torch.Tensor | None, mode: int, dtype: torch.dtype | None = None,
                  tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Kernel entry point (see the module docstring). x: [..., channels]; scale: [C] or, per row, [C, rows]
    float32 grid scales (rows = x.numel() // channels) and `inverse` the reference's max_value / grid_max of
    the same shape; channel_scale: [C, channels] or [channels] powers of two, or None. tile: one of TILES to
    launch with instead of the autotuned one (bench/kernel_bandwidth.py times each).

    Returns [C, *x.shape] in `dtype` (default x.dtype).
    """
    _needs_triton()
    x = x.contiguous()
    channels = x.shape[-1]
    rows = x.numel() // channels
    row_scale = scale.dim() == 2
    candidates = scale.shape[0] if scale.dim() else 1
    if row_scale and scale.shape[1] != rows:
        raise ValueError(f"per-row scales need {rows} rows, got {scale.shape[1]}")
    out = torch.empty((candidates, *x.shape), dtype=dtype or x.dtype, device=x.device)
    scale = scale.to(device=x.device, dtype=torch.float32).contiguous()
    inverse = inverse.to(device=x.device, dtype=torch.float32).contiguous()
    if channel_scale is not None:
        channel_scale = channel_scale.to(device=x.device, dtype=torch.float32).reshape(candidates, channels)
        channel_scale = channel_scale.contiguous()
    interpreted = _interpreted()
    args = (x, out, scale, inverse, scale if channel_scale is None else channel_scale, rows, channels, fmt.grid_max)
    flags = dict(MANTISSA_BITS=fmt.mantissa_bits, IS_INT=fmt.kind == "int", HAS_CHANNEL=channel_scale is not None,
                 ROW_SCALE=row_scale, MODE=mode, MANUAL_BF16=interpreted and out.dtype == torch.bfloat16)
    if tile is None and interpreted:
        tile = INTERPRETER_TILE

    def launch(meta):
        return triton.cdiv(rows, meta["BLOCK_ROWS"]), triton.cdiv(channels, meta["BLOCK_COLS"]), candidates

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton uses the current device
        if tile is None:
            _tuned_kernel[launch](*args, **flags)
        else:
            rows_per_tile, cols_per_tile, warps = tile
            _fake_quantize_kernel[launch](*args, **flags, BLOCK_ROWS=rows_per_tile, BLOCK_COLS=cols_per_tile,
                                          num_warps=warps)
    return out


if triton is not None:

    @triton.jit
    def _residual_proxy_kernel(w_ptr, out_ptr, scale_ptr, inverse_ptr, diagonal_ptr, cross_ptr, basis_ptr, values_ptr,
                               rows, channels, grid_max, MANTISSA_BITS: tl.constexpr, IS_INT: tl.constexpr,
                               RANK: tl.constexpr, ROUND_BF16: tl.constexpr, DOT_FP32: tl.constexpr,
                               BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        candidate = tl.program_id(0).to(tl.int64)  # fastest: neighbouring programs read the same weight rows
        row = tl.program_id(1).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = row < rows
        scale = tl.load(scale_ptr + candidate * rows + row, mask=row_ok, other=1.0)[:, None]
        inverse = tl.load(inverse_ptr + candidate * rows + row, mask=row_ok, other=1.0)[:, None]
        diagonal_part = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        if RANK > 0:
            projected = tl.zeros((BLOCK_ROWS, RANK), dtype=tl.float32)
        for start in range(0, channels, BLOCK_COLS):
            col = start + tl.arange(0, BLOCK_COLS)
            col_ok = col < channels
            mask = row_ok[:, None] & col_ok[None, :]
            offsets = row[:, None] * channels + col[None, :]
            w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            u = _standard_grid(w * scale, grid_max, MANTISSA_BITS, IS_INT) * inverse - w
            diagonal = tl.load(diagonal_ptr + col, mask=col_ok, other=0.0)[None, :]
            cross = tl.load(cross_ptr + offsets, mask=mask, other=0.0)
            diagonal_part += tl.sum((u * diagonal + 2.0 * cross) * u, axis=1)
            if RANK > 0:
                basis = tl.load(basis_ptr + col[:, None] * RANK + tl.arange(0, RANK)[None, :], mask=col_ok[:, None],
                                other=0.0)
                if ROUND_BF16:  # to nearest even by hand: the interpreter's cast truncates (the same bits on CUDA)
                    bits = u.to(tl.int32, bitcast=True)
                    u = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                if DOT_FP32:  # float32 operands (bfloat16-rounded ones stay exact), no TF32 rounding
                    projected = tl.dot(u, basis.to(tl.float32), projected, input_precision="ieee")
                else:
                    projected = tl.dot(u.to(tl.bfloat16), basis, projected)
        result = diagonal_part
        if RANK > 0:
            values = tl.load(values_ptr + tl.arange(0, RANK))[None, :]
            result += tl.sum(projected * projected * values, axis=1)
        tl.store(out_ptr + candidate * rows + row, result, mask=row_ok)


RESIDUAL_PROXY_TILE = (64, 64, 4)  # (BLOCK_ROWS, BLOCK_COLS, num_warps), fixed: the sums' order never changes


def residual_proxy(weight: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor, inverse: torch.Tensor,
                   diagonal: torch.Tensor, cross: torch.Tensor, basis: torch.Tensor, values: torch.Tensor
                   ) -> torch.Tensor:
    """P[c, o] = sum_k values_k (u . basis_k)^2 + sum_i u_i (diagonal_i u_i + 2 cross[o, i]) for the weight residuals
    u = q(W[o]) - W[o] of candidate c, computed tile by tile without storing u (see quantize.residual_proxy).

    weight [out, in]; scale, inverse [C, out] float32; diagonal [in] float32; cross [out, in] float32; basis [in, rank]
    (u is rounded to its dtype for the projection); values [rank] float32. Returns [C, out] float32.
    """
    _needs_triton()
    rows, channels = weight.shape
    candidates = scale.shape[0]
    rank = basis.shape[1]
    padded = 0 if rank == 0 else max(16, 1 << (rank - 1).bit_length())  # tl.dot: a power of two, at least 16
    device = weight.device
    if padded:
        basis = torch.nn.functional.pad(basis, (0, padded - rank)).contiguous()
        values = torch.nn.functional.pad(values.float(), (0, padded - rank)).contiguous()
    else:
        basis, values = diagonal, diagonal  # unused
    out = torch.empty(candidates, rows, dtype=torch.float32, device=device)
    block_rows, block_cols, warps = RESIDUAL_PROXY_TILE
    grid = (candidates, triton.cdiv(rows, block_rows))
    with torch.cuda.device(device) if weight.is_cuda else contextlib.nullcontext():
        _residual_proxy_kernel[grid](
            weight.contiguous(), out, scale.float().contiguous(), inverse.float().contiguous(),
            diagonal.float().contiguous(), cross.float().contiguous(), basis, values, rows, channels, fmt.grid_max,
            MANTISSA_BITS=fmt.mantissa_bits, IS_INT=fmt.kind == "int", RANK=padded,
            ROUND_BF16=bool(padded) and basis.dtype == torch.bfloat16,
            DOT_FP32=_interpreted() or basis.dtype != torch.bfloat16,  # the interpreter's bfloat16 dot is wrong
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps)
    return out
