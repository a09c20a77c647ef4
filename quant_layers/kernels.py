"""Fused Triton kernels: the quantizer of quant_layers/quantize.py (reads x once, writes once), its block-scaled
form for activations (`block_fake_quantize`), and the search's weight proxy built on it (`residual_proxy`, at the
end of this file).

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
checks it under the interpreter, bench/fp8_gemm.py on CUDA before it times anything. The entry points of quantize.py
choose between a kernel and its reference with their `use_kernel` argument (`chosen`, shared with the FP8 and
packed entry points); `unavailable_reason` says why a kernel cannot run (no Triton, a CPU
tensor without the interpreter, a format it does not implement: unsigned, or block-scaled outside the activation
path).

Block-scaled activations (`block_fake_quantize`, quantize_activation's kernel for NVFP4, MX and Four Over Six):
each program reads a [rows, channels] tile, views it as blocks of the last dimension and computes per block its
absolute maximum a (NaN if the block holds one), clip * a, the block scale and the elements, as
quantize._quantize_blocks does: NVFP4 code = Q_E4M3(a / (m t)), range R = top * code * t, elements Q(x; R) (zeros
where R = 0), with two maxima (4/6) each candidate's squared error summed pairwise (quantize.pairwise_sum's order)
and the lower kept, ties to the first; MX k = clamp(floor_log2(a) - emax, ...), q = 2^k Q(x 2^-k), NaN for a block
holding NaN or Inf. Divisions by non-powers of two use div_rn (Triton's `/` is not correctly rounded on the GPU),
in the reference's form (torch's scalar / tensor is a reciprocal times the scalar; on CUDA, tensor / Python scalar
multiplies by the scalar's float32 reciprocal), constants come from the reference's own ops on x's device
(quantize.block_constants), and the kernel is compiled without fused multiply-adds: equal bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

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


def chosen(use_kernel: bool | None, reason: Callable[[], str | None], kernel: str = "the Triton kernel") -> bool:
    """Whether an entry point runs its kernel: use_kernel None picks it where `reason()` (why it cannot run here, or
    None) allows; True demands it (RuntimeError with the reason where it cannot run); False never (the reference)."""
    if use_kernel is False:
        return False
    why = reason()
    if use_kernel and why:
        raise RuntimeError(f"use_kernel=True, but {kernel} cannot run here: {why}")
    return why is None


def supports(fmt: QuantFormat, blocks: bool = False) -> bool:
    """The kernels implement signed element formats (FP with any exponent bits, INT) and, for the activation path
    (`block_fake_quantize`), block scaling of signed elements with the data's own scales: power-of-two block sizes
    up to MAX_BLOCK_SIZE, one or two block maxima. The search's batched entry points take element formats only."""
    if not fmt.signed:
        return False
    if fmt.block is None:
        return True
    if not blocks:  # the caller is not the activation path
        return False
    size = fmt.block.size
    return size & (size - 1) == 0 and size <= MAX_BLOCK_SIZE and len(fmt.block.targets(fmt.standard_max)) <= 2


def unavailable_reason(x: torch.Tensor, fmt: QuantFormat, blocks: bool = False) -> str | None:
    """Why the kernels cannot quantize x to fmt here, or None: Triton missing, a CPU tensor without Triton's
    interpreter (TRITON_INTERPRET=1), or a format they do not implement (blocks: the caller is the activation path,
    which has a block-scaled kernel; see `supports`)."""
    if triton is None:
        return "Triton is not installed"
    if not (x.is_cuda or _interpreted()):
        return f"the tensor is on {x.device} (kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    if not supports(fmt, blocks):
        if fmt.block is not None and blocks:
            return (f"{fmt.name} is not implemented by the block kernel (signed elements, power-of-two blocks up to "
                    f"{MAX_BLOCK_SIZE}, at most two block maxima)")
        return f"{fmt.name} is not implemented by the kernels here (signed element formats only)"
    return None


if triton is not None:

    @triton.jit
    def _round_to_bfloat16(v):
        """float32 v rounded to the nearest bfloat16, ties to even, still float32 (the compiled store's rounding, which
        the interpreter's truncating cast lacks)."""
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)

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
        if MANUAL_BF16:  # the interpreter truncates float32 -> bfloat16
            result = _round_to_bfloat16(result)
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
    def _exp2_int(e):
        """2^e as float32 for integer -127 <= e <= 127, exact (2^-127 is a subnormal): torch.ldexp's multiplier."""
        return tl.where(e >= -126, (e + 127) << 23, 0x00400000).to(tl.float32, bitcast=True)

    @triton.jit
    def _halve(v):
        """[n, w] -> [n, w / 2]: neighbouring pairs summed (one step of quantize.pairwise_sum)."""
        even, odd = tl.split(tl.reshape(v, (v.shape[0], v.shape[1] // 2, 2)))
        return even + odd

    @triton.jit
    def _pairwise_sum(v, SIZE: tl.constexpr):
        """quantize.pairwise_sum of [n, SIZE] (a power of two up to 128) -> [n, 1], in its order."""
        if SIZE >= 128:
            v = _halve(v)
        if SIZE >= 64:
            v = _halve(v)
        if SIZE >= 32:
            v = _halve(v)
        if SIZE >= 16:
            v = _halve(v)
        if SIZE >= 8:
            v = _halve(v)
        if SIZE >= 4:
            v = _halve(v)
        if SIZE >= 2:
            v = _halve(v)
        return v

    @triton.jit
    def _block_elements(blocks, block_range, grid_max, inverse_grid_max, MANTISSA_BITS: tl.constexpr,
                        IS_INT: tl.constexpr, RECIPROCAL_DIV: tl.constexpr):
        """quantize(blocks, element, R) with a block range R [n, 1], zeros where R = 0 (quantize_elements).
        Triton's `/` is not correctly rounded on the GPU: div_rn is. The reference's s = grid_max / R is torch's
        scalar / tensor, R.reciprocal() * grid_max; its u = R / grid_max divides on the CPU but multiplies by the
        float32 reciprocal of the Python scalar on CUDA (RECIPROCAL_DIV)."""
        scale = tl.math.div_rn(tl.full(block_range.shape, 1.0, tl.float32), block_range) * grid_max
        if RECIPROCAL_DIV:
            inverse = block_range * inverse_grid_max
        else:
            inverse = tl.math.div_rn(block_range, tl.full(block_range.shape, grid_max, tl.float32))
        q = _standard_grid(blocks * scale, grid_max, MANTISSA_BITS, IS_INT) * inverse
        return tl.where(block_range == 0, 0.0, q)

    @triton.jit
    def _block_code(amax, target, tensor_scale, code_scale, code_inverse, scale_grid_max,
                    SCALE_MANTISSA_BITS: tl.constexpr):
        """block_scale_codes for one target m: quantize(a / (m t), scale format, its standard max) (div_rn: the
        reference's IEEE division of two tensors)."""
        ratio = tl.math.div_rn(amax, tl.full(amax.shape, 1.0, tl.float32) * (target * tensor_scale))
        return _standard_grid(ratio * code_scale, scale_grid_max, SCALE_MANTISSA_BITS, False) * code_inverse

    @triton.jit
    def _block_quantize_kernel(x_ptr, out_ptr, constants_ptr, clip_ptr, rows, channels, element_max, grid_max,
                               inverse_grid_max, scale_grid_max, target_0, target_1, max_exponent, exponent_min,
                               exponent_max, MANTISSA_BITS: tl.constexpr, IS_INT: tl.constexpr,
                               SCALE_MANTISSA_BITS: tl.constexpr, SIZE: tl.constexpr, POWER_OF_TWO: tl.constexpr,
                               TWO_TARGETS: tl.constexpr, HAS_CLIP: tl.constexpr, RECIPROCAL_DIV: tl.constexpr,
                               MANUAL_BF16: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (row < rows)[:, None] & (col < channels)[None, :]  # whole blocks: channels % SIZE == 0
        offsets = row[:, None] * channels + col[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        blocks = tl.reshape(x, (BLOCK_ROWS * BLOCK_COLS // SIZE, SIZE))
        has_nan = tl.max((blocks != blocks).to(tl.int32), axis=1)[:, None] > 0  # tl.max may skip NaN
        amax = tl.where(has_nan, float("nan"), tl.max(tl.abs(blocks), axis=1)[:, None])
        clipped = amax
        if HAS_CLIP:
            clipped = amax * tl.load(clip_ptr)
        if POWER_OF_TWO:  # k = clamp(floor_log2(a) - emax, ...); floor_log2 from the exponent field (0 gives -1)
            subnormal = (clipped.to(tl.int32, bitcast=True) & 0x7F800000) == 0
            normalised = tl.where(subnormal, clipped * 18446744073709551616.0, clipped)  # * 2^64, exact
            floor_log2 = ((normalised.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - tl.where(subnormal, 64, 0)
            floor_log2 = tl.where(clipped == 0, -1, floor_log2)
            exponent = tl.minimum(tl.maximum(floor_log2 - max_exponent, exponent_min), exponent_max)
            element_scale, element_inverse = tl.load(constants_ptr + 3), tl.load(constants_ptr + 4)
            y = blocks * _exp2_int(-exponent)  # torch.ldexp(x, -k) = x * 2^-k
            q = _standard_grid(y * element_scale, grid_max, MANTISSA_BITS, IS_INT) * element_inverse
            q = q * _exp2_int(exponent)
            q = tl.where(amax < float("inf"), q, float("nan"))  # OCP MX: NaN or Inf in a block makes it NaN
        else:
            tensor_scale = tl.load(constants_ptr)
            code_scale, code_inverse = tl.load(constants_ptr + 1), tl.load(constants_ptr + 2)
            code = _block_code(clipped, target_0, tensor_scale, code_scale, code_inverse, scale_grid_max,
                               SCALE_MANTISSA_BITS)
            q = _block_elements(blocks, element_max * code * tensor_scale, grid_max, inverse_grid_max,
                                MANTISSA_BITS, IS_INT, RECIPROCAL_DIV)
            if TWO_TARGETS:  # Four Over Six: the lower squared error (pairwise float32 sums), ties to the first
                code_1 = _block_code(clipped, target_1, tensor_scale, code_scale, code_inverse, scale_grid_max,
                                     SCALE_MANTISSA_BITS)
                q_1 = _block_elements(blocks, element_max * code_1 * tensor_scale, grid_max, inverse_grid_max,
                                      MANTISSA_BITS, IS_INT, RECIPROCAL_DIV)
                error = _pairwise_sum((q - blocks) * (q - blocks), SIZE)
                error_1 = _pairwise_sum((q_1 - blocks) * (q_1 - blocks), SIZE)
                take = (error_1 < error) | ((error_1 != error_1) & (error == error))  # torch.argmin: NaN is least
                q = tl.where(take, q_1, q)
        result = tl.reshape(q, (BLOCK_ROWS, BLOCK_COLS))
        if MANUAL_BF16:  # the interpreter truncates float32 -> bfloat16
            result = _round_to_bfloat16(result)
        tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


# Tiles of the block kernel (BLOCK_COLS a multiple of every supported block size), tuned as TILES are.
BLOCK_TILES = ((8, 256, 4), (4, 256, 4), (16, 256, 8), (4, 512, 4), (8, 512, 8), (2, 1024, 4), (1, 1024, 4),
               (32, 128, 8), (16, 128, 4))
BLOCK_INTERPRETER_TILE = (4, 64, 4)  # small: the tests cut rows and channels unevenly with it
MAX_BLOCK_SIZE = 128

if triton is not None:
    _tuned_block_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK_ROWS": r, "BLOCK_COLS": c}, num_warps=w) for r, c, w in BLOCK_TILES],
        key=["channels", "SIZE", "POWER_OF_TWO", "TWO_TARGETS", "HAS_CLIP"],
    )(_block_quantize_kernel)


@functools.lru_cache(maxsize=None)
def _float32_reciprocal(value: float) -> float:
    """fl32(1 / value), as CUDA's torch divides a tensor by a Python scalar (times this reciprocal)."""
    return float(1.0 / torch.tensor(value, dtype=torch.float32))


def block_fake_quantize(x: torch.Tensor, fmt: QuantFormat, constants: torch.Tensor, clip: torch.Tensor | None,
                        tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Block-scaled fake quantization of x [..., channels] (channels a multiple of the block size) with the data's
    own block scales, equal to quantize.quantize(x, fmt, max_value, clip=clip) bit for bit. constants: the float32
    [5] of quantize.block_constants (tensor scale t, the scale format's and MX element's s and u, each computed by
    the reference's own ops on x's device); clip: [] float32 multiplier of the block maxima, or None.
    Returns x's shape and dtype."""
    _needs_triton()
    size = fmt.block.size
    channels = x.shape[-1]
    if channels % size:
        raise ValueError(f"{fmt.name} needs the last dimension ({channels}) to be a multiple of {size}")
    x = x.contiguous()
    rows = x.numel() // channels
    out = torch.empty_like(x)
    if rows == 0:
        return out
    constants = constants.to(device=x.device, dtype=torch.float32).contiguous()
    clip = constants if clip is None else clip.to(device=x.device, dtype=torch.float32).reshape(1)
    element, scale_format = fmt.element, fmt.block.scale_format
    targets = fmt.block.targets(fmt.standard_max)
    interpreted = _interpreted()
    args = (x, out, constants, clip, rows, channels, fmt.standard_max, element.grid_max,
            _float32_reciprocal(element.grid_max),
            0.0 if fmt.block.power_of_two else scale_format.grid_max,  # E8M0's 2^254 is no float32 (and unused)
            targets[0], targets[-1], fmt.max_exponent, -scale_format.standard_bias, scale_format.max_exponent)
    flags = dict(MANTISSA_BITS=element.mantissa_bits, IS_INT=element.kind == "int",
                 SCALE_MANTISSA_BITS=scale_format.mantissa_bits, SIZE=size, POWER_OF_TWO=fmt.block.power_of_two,
                 TWO_TARGETS=len(targets) == 2, HAS_CLIP=clip is not constants, RECIPROCAL_DIV=x.is_cuda,
                 MANUAL_BF16=interpreted and out.dtype == torch.bfloat16,
                 enable_fp_fusion=False)  # no fused multiply-adds: the reference rounds every product
    if tile is None and interpreted:
        tile = BLOCK_INTERPRETER_TILE

    def launch(meta):
        return triton.cdiv(rows, meta["BLOCK_ROWS"]), triton.cdiv(channels, meta["BLOCK_COLS"])

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if tile is None:
            _tuned_block_kernel[launch](*args, **flags)
        else:
            rows_per_tile, cols_per_tile, warps = tile
            _block_quantize_kernel[launch](*args, **flags, BLOCK_ROWS=rows_per_tile, BLOCK_COLS=cols_per_tile,
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
