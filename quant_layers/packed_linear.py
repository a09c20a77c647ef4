"""Packed FP4 execution of a Linear: y = x @ W^T with W kept as 4-bit E2M1 codes and block scales (NVFP4, Four Over
Six, MXFP4), decoded inside a Triton GEMM kernel (Hopper has no block-scaled FP8 or FP4 tensor cores).

A weight W [N, K] of such a format is, element by element (quant_layers/codes.py),

    W[n, k] = f[n, k] * s[n, k / G] * t[n]

with f the OCP FP4 value of the E2M1 code (0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6), s the block scale (NVFP4 and
Four Over Six: the E4M3 byte's value, G = 16; MXFP4: 2^(byte - 127), G = 32) and t the float32 tensor scale
(NVFP4: max_value / (6 * 448), Four Over Six: / (6 * 256), per tensor or per row; MXFP4: none, t = 1).

**The product f * s is exact in bfloat16** (and float16, float32): f has at most 2 significant bits, an E4M3 scale
at most 4, so f * s has at most 6 of bfloat16's 8, and its magnitudes 2^-10 .. 6 * 448 = 2688 lie within its normal
range; an E8M0 scale is a power of two, so f * 2^(byte - 127) is f shifted, in bfloat16's range (its subnormals reach
2^-133 < 0.5 * 2^-127) up to the same overflow as float32's. The kernel therefore decodes each weight tile to
f * s in the input's dtype with no rounding, multiplies on the tensor cores with float32 accumulation, and applies
t (per output column) and the bias after accumulation:

    y[m, n] = fl(t[n] * sum_k x[m, k] (f s)[n, k] + bias[n])      (sum in float32, one rounding to x's dtype)

Against the simulated QuantLinear (F.linear with the decoded weight): MXFP4 weights are the simulated weights bit for
bit, so the outputs differ only in the float32 summation order; NVFP4's simulated weight is f * s * t rounded (in
float32, then to the model's dtype), which the kernel never rounds: it multiplies by t once per output instead
(a bfloat16 model's weight differs from f s t by up to 2^-9 relative, the kernel's product is the exact one).

Two ways compute that sum on the GPU. The fused kernel decodes each weight tile inside the GEMM (memory traffic of
the 4-bit weight only; what few-token inputs want). From DEQUANTIZE_MIN_ROWS input rows, where the fused kernel
measured at a third of bfloat16's speed (its decode and operand reshuffles starve the tensor cores), a small kernel
decodes the whole weight to f * s (`decode_unit_scaled`, exact, one transient [N, K] buffer) and torch's GEMM
(cuBLAS) multiplies it with t as its float32 alpha and the bias in its epilogue: the same equation, one rounding.

`packed_matmul(x, weight, bias, use_kernel)` runs the kernels (CUDA, or the CPU under TRITON_INTERPRET=1) or
`packed_matmul_reference` (the project's `decode` of the whole weight with t = 1, a float32 matmul, then t and the
bias), which tests/test_packed_linear.py compares it with. `PackedWeight.from_encoded` builds the packed tensors from
a weight's codes (codes.encode / utils/export) and checks they decode to the simulated weight bit for bit;
`PackedLinear` is the module a QuantLinear's `executor` holds. Activations are not touched: it quantizes the input
with the QuantLinear's own quantizer, as in the simulation, and multiplies the result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from quant_layers.codes import E8M0_NAN, Encoded, decode, pack_nibbles, unpack_nibbles
from quant_layers.formats import E4M3FN, E8M0, QuantFormat, fp_format
from quant_layers.kernels import _interpreted, chosen, triton

if triton is not None:
    import triton.language as tl

E2M1 = fp_format(2, 1)
_E4M3_NAN = 0x7F  # the E4M3 byte S.1111.111 without its sign
MAX_BLOCK_SIZE = 32  # every BLOCK_K (a power of two, 64 or more) then holds whole blocks of scales


def packable_reason(fmt: QuantFormat | None) -> str | None:
    """Why a weight of fmt cannot be packed here, or None: E2M1 elements in blocks of a power of two up to 32 with
    E4M3 scales under a tensor scale (NVFP4, Four Over Six) or E8M0 scales (MXFP4)."""
    if fmt is None:
        return "the weight is not quantized"
    block = fmt.block
    if fmt.element != E2M1 or block is None:
        return f"{fmt.name} is not E2M1 in blocks (NVFP4, MXFP4)"
    if (block.scale_format, block.tensor_scale) not in ((E4M3FN, True), (E8M0, False)):
        return f"{fmt.name}: block scales must be E4M3 under a tensor scale or E8M0"
    if block.size & (block.size - 1) or not 2 <= block.size <= MAX_BLOCK_SIZE:
        return f"{fmt.name}: blocks of {block.size}, the kernel takes a power of two from 2 to {MAX_BLOCK_SIZE}"
    return None


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight [N, K] as the kernel reads it (module docstring for the values).

    fmt: its format (packable); codes: uint8 [N, K / 2], two E2M1 codes per byte, low nibble first (k even);
    block_scale: uint8 [N, K / G], the E4M3 bytes (NVFP4) or E8M0 bytes (MXFP4); tensor_scale: float32 [1] (per
    tensor) or [N] (per row) for NVFP4, None for MXFP4; dtype: the simulated weight's dtype.
    """

    fmt: QuantFormat
    codes: torch.Tensor
    block_scale: torch.Tensor
    tensor_scale: torch.Tensor | None
    dtype: torch.dtype
    tensor_scale_value: float | None = None  # a per-tensor t as a Python float (read once: no device sync per call)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], 2 * self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.block_scale, self.tensor_scale)
                   if t is not None)

    @classmethod
    def from_encoded(cls, encoded: Encoded, weight: torch.Tensor) -> PackedWeight:
        """Pack an encoded weight [N, K] (codes.encode, utils/export's module_weight_codes) whose decode must equal
        `weight`, the simulated quantized weight, bit for bit; ValueError (one line) for a format or weight that
        cannot be packed (packable_reason, FPQ channel shifts, NaN blocks) or codes that do not decode to it."""
        fmt = encoded.fmt
        reason = packable_reason(fmt)
        if reason:
            raise ValueError(f"cannot pack this weight: {reason}")
        if encoded.codes.dim() != 2 or encoded.channel_shift is not None:
            raise ValueError("cannot pack this weight: a plain [N, K] weight is packed, got "
                             f"{tuple(encoded.codes.shape)}"
                             + (" with FPQ channel shifts" if encoded.channel_shift is not None else ""))
        rows = encoded.codes.shape[0]
        if fmt.block.power_of_two:
            scale_bytes = encoded.block_exponent
            if bool((scale_bytes == E8M0_NAN).any()):
                raise ValueError("cannot pack this weight: it holds NaN blocks (E8M0 byte 255)")
            tensor_scale = None
        else:
            scale_bytes = encoded.block_scale.view(torch.uint8)
            if bool(((scale_bytes & _E4M3_NAN) == _E4M3_NAN).any() | (scale_bytes >= 0x80).any()):
                raise ValueError("cannot pack this weight: its E4M3 block scales must be non-negative numbers")
            tensor_scale = encoded.tensor_scale.to(torch.float32).reshape(-1).contiguous()
            if tensor_scale.numel() not in (1, rows):
                raise ValueError(f"cannot pack this weight: tensor_scale has {tensor_scale.numel()} values for "
                                 f"{rows} rows")
        decoded = decode(encoded)
        if decoded.shape != weight.shape or decoded.dtype != weight.dtype or not torch.equal(decoded,
                                                                                              weight.detach()):
            raise ValueError(f"cannot pack this weight: its {fmt.name} codes do not decode to the simulated weight bit "
                             "for bit")
        value = float(tensor_scale) if tensor_scale is not None and tensor_scale.numel() == 1 else None
        return cls(fmt, pack_nibbles(encoded.codes).contiguous(), scale_bytes.contiguous(), tensor_scale,
                   weight.dtype, value)

    def unit_scaled(self, dtype: torch.dtype) -> torch.Tensor:
        """f * s [N, K] in dtype, the weight without its tensor scale: the project's `decode` with t = 1 (exact, see
        the module docstring); what the kernel multiplies."""
        codes = unpack_nibbles(self.codes)
        if self.fmt.block.power_of_two:
            encoded = Encoded(self.fmt, codes, dtype, block_exponent=self.block_scale)
        else:
            ones = torch.ones((), dtype=torch.float32, device=codes.device)
            encoded = Encoded(self.fmt, codes, dtype, block_scale=self.block_scale.view(torch.float8_e4m3fn),
                              tensor_scale=ones)
        return decode(encoded)

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.fmt, self.codes.to(device), self.block_scale.to(device),
                            None if self.tensor_scale is None else self.tensor_scale.to(device), self.dtype,
                            self.tensor_scale_value)


def packed_matmul_reference(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x @ (f s)^T) * t + bias in float32, returned in x's dtype: x [..., K] -> [..., N]."""
    y = x.float() @ weight.unit_scaled(torch.float32).T
    if weight.tensor_scale is not None:
        y = y * weight.tensor_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the kernel cannot run on x here, or None (Triton missing; a CPU tensor without TRITON_INTERPRET=1; a dtype
    other than bfloat16, float16, float32)."""
    if triton is None:
        return "Triton is not installed"
    if not (x.is_cuda or _interpreted()):
        return f"the tensor is on {x.device} (the kernel runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"x is {x.dtype}, the kernel takes bfloat16, float16 or float32"
    return None


def packed_matmul(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
                  use_kernel: bool | None = None, tile: tuple[int, int, int, int, int] | None = None,
                  dequantize: bool | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for x [..., K] and a packed W [N, K]: [..., N] in x's dtype (module docstring).

    use_kernel: None runs the Triton kernels where they can run, else the reference; True demands them
    (RuntimeError with the reason where they cannot); False runs `packed_matmul_reference`. dequantize: True decodes
    the whole weight to f * s (`decode_unit_scaled`, exact) and multiplies with torch's GEMM, t and the bias in its
    float32 epilogue (per-tensor t only); False runs the fused kernel; None the first from DEQUANTIZE_MIN_ROWS input
    rows where t is per tensor. tile: one of TILES (or another (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)) to
    launch the fused kernel with instead of the autotuned one (implies dequantize=False).
    """
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the packed weight [{n}, {k}] takes {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if not chosen(use_kernel, lambda: unavailable_reason(x), "the packed GEMM kernel"):
        return packed_matmul_reference(x, weight, bias)
    per_tensor = weight.tensor_scale is None or weight.tensor_scale.numel() == 1
    if dequantize and not per_tensor:
        raise ValueError("dequantize=True takes a per-tensor tensor scale (a per-row t is applied by the fused kernel)")
    if dequantize is None:
        dequantize = tile is None and per_tensor and x.numel() // k >= DEQUANTIZE_MIN_ROWS
    if dequantize:
        return _dequantized_matmul(x, weight, bias)
    return _launch(x, weight, bias, tile)


def _dequantized_matmul(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """packed_matmul through the whole decoded weight: y = fl(t * (x @ (f s)^T) + bias), torch's GEMM (cuBLAS on
    CUDA) summing in float32 and applying alpha = t and the bias before its one rounding to x's dtype."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    unit = decode_unit_scaled(weight, x.dtype)
    t = 1.0 if weight.tensor_scale is None else weight.tensor_scale_value
    if t is None:
        t = float(weight.tensor_scale)
    if bias is None:  # beta = 0: the input is ignored, so an empty one (no fill on the hot path)
        return torch.addmm(unit.new_empty(n), x2, unit.T, beta=0, alpha=t).reshape(*x.shape[:-1], n)
    return torch.addmm(bias.to(x.dtype), x2, unit.T, alpha=t).reshape(*x.shape[:-1], n)


def decode_unit_scaled(weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """f * s [N, K] in dtype (PackedWeight.unit_scaled, exact) by a Triton kernel where it runs (CUDA, or the CPU
    under TRITON_INTERPRET=1), else by the reference."""
    n, k = weight.shape
    if unavailable_reason(weight.codes.new_empty(0, dtype=dtype)):
        return weight.unit_scaled(dtype)
    interpreted = _interpreted()
    out = torch.empty(n, k, dtype=torch.float32 if interpreted else dtype, device=weight.codes.device)
    block_n, block_k = DECODE_TILE
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _decode_kernel[grid](weight.codes, weight.block_scale, out, n, k, GROUP=weight.fmt.block.size,
                             MX=weight.fmt.block.power_of_two, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.to(dtype)


class PackedLinear(nn.Module):
    """The executor of one QuantLinear with a packed weight (modules.py: its forward calls executor(module, x) on the
    rotated input): packed_matmul(module.quantize_input(x), weight, module.bias), the input quantized as simulated.
    Buffers `codes`, `block_scale`, `tensor_scale` (the PackedWeight's, moved and saved with the model)."""

    def __init__(self, weight: PackedWeight) -> None:
        super().__init__()
        self.fmt, self.dtype, self.tensor_scale_value = weight.fmt, weight.dtype, weight.tensor_scale_value
        self.register_buffer("codes", weight.codes)
        self.register_buffer("block_scale", weight.block_scale)
        self.register_buffer("tensor_scale", weight.tensor_scale)

    @property
    def weight(self) -> PackedWeight:
        return PackedWeight(self.fmt, self.codes, self.block_scale, self.tensor_scale, self.dtype,
                            self.tensor_scale_value)

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return packed_matmul(module.quantize_input(x), self.weight, module.bias)

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        return f"{self.fmt.name} [{n}, {k}], {self.weight.nbytes} bytes"


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), timed once per (M bucket, N, K) on the GPU; the fastest is kept.
# Small BLOCK_M for short inputs (few tokens; BLOCK_N 32 gives N / 32 programs to fill the SMs), large tiles for
# long ones; BLOCK_K a power of two >= 64 (MAX_BLOCK_SIZE).
TILES = ((16, 32, 128, 2, 4), (16, 32, 256, 4, 3), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
         (32, 128, 64, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3), (128, 64, 64, 4, 4),
         (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3))
INTERPRETER_TILE = (64, 64, 64, 4, 1)  # the autotuner needs a GPU; few programs (the interpreter runs each in Python)
DECODE_TILE = (32, 256)  # (BLOCK_N, BLOCK_K) of decode_unit_scaled's programs
# From this many input rows packed_matmul decodes the weight and runs torch's GEMM. One H100 (2026-12-06, both paths
# timed side by side: bench/results/gpu_logs/packed_gemm_speedup_vs_bf16_2026-12-06b.json) ran the fused kernel at
# 0.65-0.94x bfloat16 at 16 rows and 0.21-0.64x at 256, the decode-then-GEMM path at 0.40-0.45x from 4096 rows and
# 0.63-0.84x at 16384 (fused: 0.29-0.48x there), with a decode kernel since rewritten (one contiguous store per tile
# instead of two interleaved ones); the switch lies between 256 and 4096 rows.
DEQUANTIZE_MIN_ROWS = 1024
GROUP_M = tl.constexpr(8) if triton is not None else 8  # programs along M sharing weight tiles in L2 (grouped order)

if triton is not None:

    @triton.jit
    def _e2m1_values(code):
        """OCP FP4 value of E2M1 codes (int32 0..15) as float32, exact: sign 0x8, exponent field e (2 bits), mantissa
        m; e = 0: m * 0.5, else (1 + m / 2) 2^(e - 1)."""
        e = (code >> 1) & 3
        m = code & 1
        bits = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22))
        return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)

    @triton.jit
    def _scale_values(byte, MX: tl.constexpr):
        """Block scales (int32 bytes) as float32, exact: E8M0 2^(byte - 127) (byte 0 is 2^-127, a float32 subnormal),
        or a non-negative E4M3 byte (exponent field e, mantissa m; e = 0: m 2^-9, else (1 + m / 8) 2^(e - 7))."""
        if MX:
            bits = tl.where(byte == 0, 0x00400000, byte << 23)
            return bits.to(tl.float32, bitcast=True)
        e = byte >> 3
        m = byte & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)

    @triton.jit
    def _decoded_tile(packed, byte, GROUP: tl.constexpr, MX: tl.constexpr):
        """f * s [rows, 2 c] float32 (exact) from packed code bytes [rows, c] (int32; codes 2i, 2i + 1 in the low and
        high nibble) and their block-scale bytes [rows, 2 c / GROUP] (int32): the two codes of a byte side by side."""
        rows: tl.constexpr = packed.shape[0]
        pairs: tl.constexpr = packed.shape[1]
        scale = _scale_values(byte, MX)  # one per GROUP / 2 bytes of codes
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (rows, 2 * pairs // GROUP, GROUP // 2)), (rows, pairs))
        low = _e2m1_values(packed & 15) * scale
        high = _e2m1_values(packed >> 4) * scale
        return tl.reshape(tl.join(low, high), (rows, 2 * pairs))

    @triton.jit
    def _packed_matmul_kernel(x_ptr, codes_ptr, scale_ptr, tensor_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                              m_bucket, GROUP: tl.constexpr, MX: tl.constexpr, ROW_SCALE: tl.constexpr,
                              HAS_BIAS: tl.constexpr,
                              DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        """out[M, N] = x[M, K] @ W^T (module docstring); m_bucket only keys the autotuner."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
        tile_n = (pid % (GROUP_M * tiles_n)) // group_rows
        rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        half_k, blocks_k = K // 2, K // GROUP
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & (k < K)[None, :],
                        other=0.0)
            pair = start // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(codes_ptr + cols[:, None] * half_k + pair[None, :],
                             mask=col_ok[:, None] & (pair < half_k)[None, :], other=0).to(tl.int32)
            block = start // GROUP + tl.arange(0, BLOCK_K // GROUP)
            byte = tl.load(scale_ptr + cols[:, None] * blocks_k + block[None, :],
                           mask=col_ok[:, None] & (block < blocks_k)[None, :], other=0).to(tl.int32)
            w = _decoded_tile(packed, byte, GROUP, MX)  # f * s [BLOCK_N, BLOCK_K]: exact in float32 and x's dtype
            if DOT_FP32:  # float32 x, or the interpreter (whose bfloat16 dot is wrong): exact float32 operands
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        if ROW_SCALE:
            acc = acc * tl.load(tensor_scale_ptr + cols, mask=col_ok, other=1.0)[None, :]
        elif not MX:
            acc = acc * tl.load(tensor_scale_ptr)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _decode_kernel(codes_ptr, scale_ptr, out_ptr, N, K, GROUP: tl.constexpr, MX: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[N, K] = f * s (exact in out's dtype): one [BLOCK_N, BLOCK_K] tile a program, read as whole rows of
        code and scale bytes and written as one contiguous tile (`_decoded_tile`)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = (rows < N)[:, None]
        pair = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(codes_ptr + rows[:, None] * (K // 2) + pair[None, :], mask=row_ok & (pair < K // 2)[None, :],
                         other=0).to(tl.int32)
        block = tl.program_id(1) * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
        byte = tl.load(scale_ptr + rows[:, None] * (K // GROUP) + block[None, :],
                       mask=row_ok & (block < K // GROUP)[None, :], other=0).to(tl.int32)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows[:, None] * K + cols[None, :],
                 _decoded_tile(packed, byte, GROUP, MX).to(out_ptr.dtype.element_ty), mask=row_ok & (cols < K)[None, :])

    _tuned_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                 for m, n, k, w, s in TILES],
        key=["m_bucket", "N", "K", "GROUP", "MX", "ROW_SCALE", "HAS_BIAS", "DOT_FP32"],
    )(_packed_matmul_kernel)


def m_bucket(rows: int) -> int:
    """The autotuner's key for M: the next power of two from 16 to 8192 (inputs of every length share ~10 tunings)."""
    return min(max(triton.next_power_of_2(rows), 16), 8192)


def _launch(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None,
            tile: tuple[int, int, int, int, int] | None) -> torch.Tensor:
    """The kernel on x [..., K] (packed_matmul's arguments)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    interpreted = _interpreted()
    # The interpreter truncates float32 -> bfloat16: there the kernel writes float32 and torch rounds to nearest
    # even, as the compiled kernel's store does.
    out = torch.empty(rows, n, dtype=torch.float32 if interpreted else x.dtype, device=x.device)
    mx = weight.fmt.block.power_of_two
    args = (x2, weight.codes, weight.block_scale, weight.block_scale if mx else weight.tensor_scale,
            weight.codes if bias is None else bias, out, rows, n, k, x2.stride(0), m_bucket(rows))
    flags = dict(GROUP=weight.fmt.block.size, MX=mx, ROW_SCALE=not mx and weight.tensor_scale.numel() > 1,
                 HAS_BIAS=bias is not None,
                 DOT_FP32=interpreted or x.dtype == torch.float32)
    if tile is None and interpreted:
        tile = INTERPRETER_TILE

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton uses the current device
        if tile is None:
            _tuned_kernel[grid](*args, **flags)
        else:
            block_m, block_n, block_k, warps, stages = tile
            _packed_matmul_kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                        num_warps=warps, num_stages=stages)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


__all__ = ["DEQUANTIZE_MIN_ROWS", "E2M1", "INTERPRETER_TILE", "PackedLinear", "PackedWeight", "TILES",
           "decode_unit_scaled", "m_bucket", "packable_reason", "packed_matmul", "packed_matmul_reference",
           "unavailable_reason"]
