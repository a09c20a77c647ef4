"""Exact FP4 on FP8 tensor cores: a QuantLinear of element formats computed as an FP8 E4M3 GEMM.

A QuantLinear (modules.py) with activation format F_a, per-tensor range m_a, FPQ's integer shifts k[c] >= 0 and
per-row weight ranges m_w[o] computes y = Q_a(x 2^k; m_a) @ W_fold^T + b. Every quantized value is a standard-grid
value times a scale (quantize.py: Q(x; m) = fl32(g * u), u = m / grid_max), so

    y[t, o] = sum_c fl32(g_a[t, c] u_a) fl32(g_w[o, c] u_w[o]) 2^-k[c] + b[o]          (simulated, float32 model)
    y[t, o] = fl32(fl32(sum_c A[t, c] W[o, c]) u_a) u_w[o] + b[o]                      (here)

with the E4M3 codes A = g_a [tokens, in] and W = g_w 2^-k [out, in]. For E2M1, E1M2, E3M0 and INT4 both are exact in
E4M3 (at most 4 significant bits, inside 2^-9 .. 448; with the search's shifts k <= 2^E_a - 1 <= 7 the weight codes
stay above 2^-9), so every product A W (at most 8 significant bits) is exact in float32 and the two results differ
only by float32 rounding: the sum's order and the two scale multiplications. Per output element,

    |y_fp8 - y_sim| <= (2 in + 8) 2^-24 (|Q_a| @ |W_fold|^T + |b|)                     (float32 outputs)

(each side a sum of `in` products with at most `in` + 3 roundings of 2^-24 relative). In a bfloat16 model the
simulation rounds Q_a and W_fold to bfloat16 before multiplying (2^-9 relative each), which this path does not:
the bound is then (2^-7 + (2 in + 8) 2^-24) (|Q_a| @ |W_fold|^T + |b|), the operands' and the output's roundings.

`fp8_weight` gives W and u_w from a weight's codes (codes.py), `quantize_activation_fp8` gives A (one fused Triton
kernel, kernels.CODES, or its PyTorch twin `quantize_activation_fp8_reference`, equal bit for bit), `fp8_gemm` the
product (torch._scaled_mm on CUDA with compute capability 8.9+, float32 accumulation; else `fp8_gemm_reference`,
the codes upcast to float32), `fp8_linear` all three, `FP8Linear` the executor a QuantLinear calls (modules.py).
Block-scaled formats (NVFP4, MX) have no per-tensor grid and are refused (`fp8_format_error`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from quant_layers import kernels
from quant_layers.codes import Encoded, code_table, decode, decode_fpq_weight
from quant_layers.formats import QuantFormat
from quant_layers.quantize import round_to_grid

FP8 = torch.float8_e4m3fn
SCALED_MM_ALIGNMENT = 16  # cuBLASLt's FP8 GEMM: the inner and output dimensions are multiples of 16


@functools.lru_cache(maxsize=None)  # asked on every forward
def fp8_format_error(fmt: QuantFormat) -> str | None:
    """Why fmt's standard-grid values are not all exact FP8 E4M3 numbers (block scaling, a value with too many
    significant bits or beyond 448), or None (E2M1, E1M2, E3M0, INT4: their grid values are E4M3 numbers)."""
    if fmt.block is not None:
        return (f"{fmt.name} is block-scaled: FP8 execution takes element formats (per-tensor activation and per-row "
                "weight ranges); Hopper has no block-scaled FP8 GEMM")
    if fmt.float32_error:
        return fmt.float32_error
    grid = code_table(fmt)
    grid = grid[torch.isfinite(grid)]
    inexact = grid[grid.to(FP8).float() != grid]
    if inexact.numel():
        return f"{fmt.name}'s grid value {float(inexact[0]):g} is not an FP8 E4M3 number"
    return None


def fp8_weight(encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized weight as E4M3 codes W [out, in] (torch.float8_e4m3fn) and float32 scales u_w [out]:

        W[o, c] = g[o, c] 2^-k[c],   fl(W[o, c] u_w[o]) == the decoded weight (W_fold)   exactly, in its dtype,

    g the standard-grid values of encoded.codes, u_w its grid_inverse (per tensor or per row [out, 1]), k its
    channel_shift (None: 0). ValueError (one line) for a format or a shifted value that is not exact in E4M3, or a
    scale whose float32 products differ from the decoded weight.
    """
    error = fp8_format_error(encoded.fmt)
    if error:
        raise ValueError(error)
    if encoded.codes.dim() != 2:
        raise ValueError(f"fp8_weight takes a weight [out, in], got codes {tuple(encoded.codes.shape)}")
    rows = encoded.codes.shape[0]
    grid = code_table(encoded.fmt).to(encoded.codes.device)[encoded.codes.long()]
    if encoded.channel_shift is not None:
        grid = torch.ldexp(grid, -encoded.channel_shift.to(device=grid.device, dtype=torch.float32))
    codes = grid.to(FP8)
    inexact = codes.float() != grid
    if inexact.any():
        row, column = (int(i) for i in inexact.nonzero()[0])
        raise ValueError(f"weight value {float(grid[row, column]):g} (column {column}: a grid value times 2^-k) is "
                         "not an FP8 E4M3 number; the channel shifts are too large for FP8 execution")
    scale = encoded.grid_inverse.to(torch.float32).expand(rows, 1).reshape(rows).contiguous()
    decoded = decode_fpq_weight(encoded) if encoded.channel_shift is not None else decode(encoded)
    if not torch.equal((codes.float() * scale[:, None]).to(decoded.dtype), decoded):
        raise ValueError("codes times scales do not give the decoded weight exactly (a float32 range that "
                         "underflows?)")
    return codes, scale


def _kernel_reason(x: torch.Tensor, fmt: QuantFormat) -> str | None:
    """Why the CODES kernel cannot run on x here (kernels.unavailable_reason, or a GPU without FP8: sm < 8.9)."""
    reason = kernels.unavailable_reason(x, fmt)
    if reason is None and x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
        return "Triton's FP8 E4M3 needs a GPU of compute capability 8.9 or newer"
    return reason


def quantize_activation_fp8_reference(x: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor,
                                      channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A = round_to_grid(x 2^k s) as E4M3 codes: the operations of quantize.quantize_activation's reference before
    it multiplies by u (x * channel_scale in x's dtype, exact, then float32)."""
    if channel_scale is not None:
        x = x * channel_scale.to(x.dtype)
    return round_to_grid(x, fmt, scale).to(FP8)


def quantize_activation_fp8(x: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor,
                            channel_scale: torch.Tensor | None = None, use_kernel: bool | None = None) -> torch.Tensor:
    """The standard-grid values g_a of Q_a(x 2^k; m_a) = g_a u_a as E4M3 codes [..., in] (torch.float8_e4m3fn).

    x [..., in] float (bfloat16, float16, float32); scale s = grid_max / m_a [1] float32 (QuantLinear.act_grid_scale);
    channel_scale 2^k [in] float32 or None; fmt with an E4M3-exact grid (`fp8_format_error`). One fused Triton
    kernel (shift, scale, saturate, round ties to even, cast) where it runs; use_kernel as in quantize.py (None:
    where it applies, True: demand it, False: the reference). Equal bit for bit to
    `quantize_activation_fp8_reference`.
    """
    error = fp8_format_error(fmt)
    if error:
        raise ValueError(error)
    if not kernels.chosen(use_kernel, lambda: _kernel_reason(x, fmt)):
        return quantize_activation_fp8_reference(x, fmt, scale, channel_scale)
    return kernels.fake_quantize(x, fmt, scale, scale, channel_scale, kernels.CODES, dtype=torch.uint8)[0].view(FP8)


def scaled_mm_reason(a_codes: torch.Tensor, w_codes: torch.Tensor) -> str | None:
    """Why torch._scaled_mm should not run A W^T here, or None: it needs CUDA with compute capability 8.9+ and in,
    out multiples of 16. On the CPU torch 2.13's _scaled_mm is a slow emulation (0.25 s for 64 x 256 x 256, 200x a
    float32 matmul), so the float32 reference runs there."""
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    if not a_codes.is_cuda:
        return f"the tensors are on {a_codes.device}, where torch._scaled_mm is a slow emulation"
    if torch.cuda.get_device_capability(a_codes.device) < (8, 9):
        return "FP8 GEMMs need a GPU of compute capability 8.9 or newer"
    if a_codes.shape[1] % SCALED_MM_ALIGNMENT or w_codes.shape[0] % SCALED_MM_ALIGNMENT:
        return f"in ({a_codes.shape[1]}) and out ({w_codes.shape[0]}) must be multiples of {SCALED_MM_ALIGNMENT}"
    return None


def fp8_gemm_reference(a_codes: torch.Tensor, w_codes: torch.Tensor, act_inverse: torch.Tensor,
                       weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_gemm with the codes upcast to float32 (exact) and one float32 matmul: fl(fl(A W^T) u_a) u_w[o] + b."""
    y = (a_codes.float() @ w_codes.float().t()).mul_(act_inverse).mul_(weight_scale)
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype)


def fp8_gemm(a_codes: torch.Tensor, w_codes: torch.Tensor, act_inverse: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, use_scaled_mm: bool | None = None) -> torch.Tensor:
    """y = (A W^T) u_a u_w[o] + b [tokens, out] in out_dtype.

    a_codes [tokens, in], w_codes [out, in] E4M3 (row-major: W^T is the column-major operand _scaled_mm takes);
    act_inverse u_a [1] float32; weight_scale u_w [out] float32; bias [out] or None. use_scaled_mm: None picks
    torch._scaled_mm where `scaled_mm_reason` is None, True demands it (also on the CPU), False runs
    `fp8_gemm_reference`. _scaled_mm runs with use_fast_accum=False (float32 accumulation); a bfloat16 output takes
    row-wise scales (u_a for every row, u_w per column) and the bias in the GEMM, other outputs (row-wise scaling
    gives bfloat16 only, except cuBLAS >= 12.9 on sm90) a float32 output under u_a, then u_w and b in float32.
    """
    if use_scaled_mm is False or use_scaled_mm is None and scaled_mm_reason(a_codes, w_codes):
        return fp8_gemm_reference(a_codes, w_codes, act_inverse, weight_scale, bias, out_dtype)
    act_inverse = act_inverse.to(torch.float32)
    if out_dtype == torch.bfloat16:
        scale_a = act_inverse.reshape(1, 1).expand(a_codes.shape[0], 1).contiguous()
        return torch._scaled_mm(a_codes, w_codes.t(), scale_a, weight_scale.reshape(1, -1), out_dtype=out_dtype,
                                bias=None if bias is None else bias.to(out_dtype), use_fast_accum=False)
    one = torch.ones((), dtype=torch.float32, device=a_codes.device)
    y = torch._scaled_mm(a_codes, w_codes.t(), act_inverse.reshape(()), one, out_dtype=torch.float32,
                         use_fast_accum=False).mul_(weight_scale)
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype)


def fp8_linear(x: torch.Tensor, act_format: QuantFormat, act_scale: torch.Tensor, act_inverse: torch.Tensor,
               channel_scale: torch.Tensor | None, w_codes: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, use_kernel: bool | None = None, use_scaled_mm: bool | None = None
               ) -> torch.Tensor:
    """QuantLinear's y = Q_a(x 2^k) @ W_fold^T + b [..., out] in x's dtype, as A = `quantize_activation_fp8`(x) and
    `fp8_gemm`(A, W): x [..., in]; act_scale s, act_inverse u_a [1] float32 (QuantLinear.act_grid_scale /
    act_grid_inverse); channel_scale 2^k [in] or None; w_codes [out, in] E4M3 and weight_scale [out] (`fp8_weight`)."""
    a_codes = quantize_activation_fp8(x.reshape(-1, x.shape[-1]), act_format, act_scale, channel_scale, use_kernel)
    y = fp8_gemm(a_codes, w_codes, act_inverse, weight_scale, bias, x.dtype, use_scaled_mm)
    return y.reshape(*x.shape[:-1], w_codes.shape[0])


class FP8Linear(nn.Module):
    """The executor of one QuantLinear (modules.py: its forward calls executor(module, x) on the rotated input):
    holds the weight as E4M3 codes [out, in] and float32 scales [out] (`fp8_weight`), and takes the activation
    quantizer (act_format, act_grid_scale, act_grid_inverse, act_channel_scale) and the bias from the module."""

    def __init__(self, weight_codes: torch.Tensor, weight_scale: torch.Tensor) -> None:
        super().__init__()
        if weight_codes.dtype != FP8 or weight_scale.shape != weight_codes.shape[:1]:
            raise ValueError(f"FP8Linear takes E4M3 codes [out, in] and scales [out], got {weight_codes.dtype} "
                             f"{tuple(weight_codes.shape)} and {tuple(weight_scale.shape)}")
        self.register_buffer("weight_codes", weight_codes)
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, module.act_format, module.act_grid_scale, module.act_grid_inverse,
                          module.act_channel_scale, self.weight_codes, self.weight_scale, module.bias)

    def extra_repr(self) -> str:
        return f"weight=E4M3 {tuple(self.weight_codes.shape)}, scales per row"
