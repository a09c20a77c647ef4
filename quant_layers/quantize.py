"""The one quantizer: fake-quantize a tensor to any `QuantFormat` with a clipping range `max_value`.

Semantics (every format, every caller):
- The clipping range is `max_value` (> 0), a tensor broadcastable to x: per tensor (shape []),
  per output channel ([out, 1]) or per input channel ([in]). For FP formats it is the exponent bias in
  other units: b = log2(grid_max / max_value) (see formats.py), so a real-valued bias is a real scale.
- x is scaled onto the format's standard grid, y = x * s with s = grid_max / max_value, saturated to
  +-grid_max, rounded to the nearest grid point with ties to even (`round_to_grid`), and scaled back:
  q(x) = round_to_grid(x * s) * u with u = max_value / grid_max (float32, rounded once).
- FP grid (LLM-FP4 eq. 2-4 with bias 0): e = max(floor(log2|y|), 1), step = 2^(e - M), so exponent
  code 0 holds the subnormals and every code is a number (no inf / NaN codes). Exponent bits up to 7
  fit float32 arithmetic.
- INT grid: step 1, saturating at +-(2^(bits-1) - 1).
- Computed in float32; the result has x's dtype. NaN stays NaN.
- Unsigned formats saturate at 0 from below.
- Block-scaled formats (NVFP4, MX; formats.py): each block of the last dimension gets its scale from its own
  absolute maximum (`block_scales`), or from an explicit `block_scale` (a search's choice), then the element
  format is applied as above. Power-of-two scales are
  applied exactly (x * 2^-k, then q * 2^k), so every E8M0 scale from 2^-127 up is reached; a block scale that
  rounds to zero (E4M3) gives zeros. A clipping multiplier `clip` (a static choice for dynamic scales) derives
  the scales from clip * amax instead (elements beyond the clipped range saturate); with several block maxima
  (BlockScaling.maxima, 4/6) each block takes the scale of the lowest squared error.

Standard-grid values have at most M + 1 significant bits (INT: bits - 1), so for every format of up
to 8 bits they are exact in bfloat16: products of grids are exact, which the search uses to run its
matrix products in bfloat16 (utils/search/problem.py).

Kernels: quant_layers/kernels.py computes `quantize_activation`, `grid_candidates`, `weight_residuals` and
`residual_proxy` in fused Triton kernels. Each takes `use_kernel`: None picks the kernel where it applies (a CUDA
tensor, Triton present, a format it implements: `kernels.supports`), True demands it (a clear error otherwise),
False runs the PyTorch reference, which the kernel is tested against bit for bit (tests/kernel_check.py). Block
formats have a kernel on the activation path only (`quantize_activation`, with its per-tensor block clip); the
search's batched entry points and explicit block scales use the reference.
"""

from __future__ import annotations

import torch

from quant_layers import kernels
from quant_layers.formats import QuantFormat


_TINY = 1e-30  # floor for NVFP4's per-tensor range: an all-zero tensor keeps a finite tensor scale
_EXPONENT_FIELD = 0x7F800000  # float32 bits of the biased exponent
_EXPONENT_ONE = 128 << 23  # biased exponent field of 2^1


def abs_max(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |x| over `dim` (all of x when None) as max(max x, -min x): no |x| copy of x. NaN propagates."""
    if dim is None:
        return torch.maximum(x.amax(), x.amin().neg())
    return torch.maximum(x.amax(dim=dim), x.amin(dim=dim).neg())


def as_float32(value: torch.Tensor | float, device: torch.device | str) -> torch.Tensor:
    """value as a float32 tensor on device. A Python number is filled in on the device (torch.full, the same
    float32 rounding as torch.as_tensor): torch.as_tensor(number, device="cuda") is a pageable host-to-device copy,
    which synchronizes the host with the GPU on every call (the GPTQ column loop of MX formats called it twice per
    column: quantize_elements' element quantize at standard_max)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32)
    return torch.full((), value, dtype=torch.float32, device=device)


def grid_scale(fmt: QuantFormat, max_value: torch.Tensor | float, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
    """s = grid_max / max_value (float32, max_value's shape): multiplies x onto the standard grid."""
    return fmt.grid_max / as_float32(max_value, device)


def grid_inverse(fmt: QuantFormat, max_value: torch.Tensor | float, device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """u = max_value / grid_max (float32): multiplies standard-grid values back (exact for power-of-two ratios)."""
    return as_float32(max_value, device) / fmt.grid_max


def _round_to_standard_grid_(y: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round y (float32, already inside +-grid_max) in place to fmt's standard grid, ties to even.

    FP: step = 2^(max(floor(log2|y|), 1) - M), built directly as float32 bits from y's exponent field
    (exact; zero and float32 subnormals fall in the clamp at exponent 1).
    """
    if fmt.kind == "int":
        return y.round_()
    step_bits = y.view(torch.int32).bitwise_and(_EXPONENT_FIELD)
    step_bits.clamp_(min=_EXPONENT_ONE).sub_(fmt.mantissa_bits << 23)
    step = step_bits.view(torch.float32)
    return y.div_(step).round_().mul_(step)


def round_to_grid(x: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor) -> torch.Tensor:
    """Standard-grid values round(clamp(x * scale, +-grid_max)) as a new float32 tensor (unsigned: [0, grid_max]).

    scale: float32, broadcastable to x (see `grid_scale`). One float32 tensor of the result's size is
    allocated (a bfloat16 x is upcast into it, exactly, when scale does not broadcast x to a larger shape).
    """
    if torch.broadcast_shapes(x.shape, scale.shape) == x.shape:
        y = x.to(torch.float32, copy=True).mul_(scale)
    else:
        y = x.to(torch.float32) * scale
    y.clamp_(-fmt.grid_max if fmt.signed else 0.0, fmt.grid_max)
    return _round_to_standard_grid_(y, fmt)


def check_format(fmt: QuantFormat) -> None:
    """ValueError (one line) for a format the quantizer cannot compute in float32 arithmetic."""
    if fmt.float32_error:
        raise ValueError(fmt.float32_error)


def quantize(x: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float,
             block_scale: torch.Tensor | None = None, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Fake-quantize x (any shape, float dtype) to fmt with clipping range max_value (broadcastable, > 0).

    Returns q(x) = round_to_grid(x * s) * u with s = grid_max / max_value, u = max_value / grid_max; same
    shape and dtype as x.
    x is never modified. This is the reference every other path is tested against.
    Block-scaled formats: the ranges of the blocks come from the data (see formats.py); max_value is the
    per-tensor range that NVFP4's float32 tensor scale is made from (unused by MX formats).
    block_scale (block-scaled formats only): explicit scales [..., blocks] instead of the data's own, encoded as
    `block_scales` returns them without its trailing 1: the integer exponent k per block for power-of-two scale
    formats (any integer dtype), else the block range top * code * t (float32); max_value is then unused by
    the element quantization. A block_scale with more leading dimensions than x gives one result per leading
    index (candidates [C, ..., blocks] -> [C, ..., last]). None: the data's scales (unchanged behaviour).
    clip (block-scaled formats only, not with block_scale): a multiplier (> 0) of each block's absolute maximum
    before its scale is derived, shaped like max_value (per tensor [], per row [..., 1]; more leading dimensions
    than x give one result per leading index, e.g. candidates [C, 1, 1] for a 2-D x). None: 1, bit for bit.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    check_format(fmt)
    if fmt.block is not None:
        return _quantize_blocks(x, fmt, max_value, block_scale, clip)
    if block_scale is not None or clip is not None:
        raise ValueError(f"block_scale and clip need a block-scaled format, got {fmt.name}")
    scale = grid_scale(fmt, max_value, x.device)
    return round_to_grid(x, fmt, scale).mul_(grid_inverse(fmt, max_value, x.device)).to(x.dtype)


def activation_scales(fmt: QuantFormat, max_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, u) as [1] float32 tensors on max_value's device: what `quantize_activation` multiplies by. Block-scaled
    formats: (`block_constants`, the same tensor)."""
    if fmt.block is not None:
        constants = block_constants(fmt, max_value, max_value.device)
        return constants, constants
    return (grid_scale(fmt, max_value, max_value.device).reshape(1),
            grid_inverse(fmt, max_value, max_value.device).reshape(1))


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2 |x|) as int32, exact for every finite non-zero float32 (subnormals included), from the float's
    own exponent (torch.frexp: x = m 2^e with 0.5 <= |m| < 1); 0 gives -1."""
    return torch.frexp(x.float()).exponent - 1


def block_scale_codes(amax: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float,
                      blocks: torch.Tensor | None = None, clip: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-power-of-two block scales (NVFP4): (code, t), t = max_value / (top * S) the float32 tensor scale (S =
    `BlockScaling.scale_max`: 448 for NVFP4, 256 for 4/6), code = Q_s(a / (m t)) the block scale in the scale format
    (float32 values of its grid, saturating), a = amax [..., blocks, 1] (times clip when given: broadcastable to it),
    m = top; with several block maxima (4/6) the m whose quantized block (blocks [..., blocks, size], needed then)
    has the lowest squared error (summed in float32 by `pairwise_sum`; ties: the first listed)."""
    top = fmt.standard_max
    tensor_scale = block_tensor_scale(fmt, max_value, amax.device)
    if clip is not None:
        amax = amax * clip
    codes = [scale_code(amax, fmt, target, tensor_scale) for target in fmt.block.targets(top)]
    if len(codes) == 1:
        return codes[0], tensor_scale
    if blocks is None:
        raise ValueError(f"{fmt.name} chooses each block's scale by its error: block_scale_codes needs the blocks")
    errors = torch.stack([pairwise_sum((quantize_elements(blocks, fmt, block_range(fmt, code, tensor_scale)) - blocks)
                                       .square_()) for code in codes])
    codes = torch.stack(torch.broadcast_tensors(*codes))
    return codes.gather(0, errors.argmin(dim=0, keepdim=True).expand(1, *codes.shape[1:]))[0], tensor_scale


def scale_code(a: torch.Tensor, fmt: QuantFormat, target: float, tensor_scale: torch.Tensor) -> torch.Tensor:
    """The block scale Q_s(a / (m t)) in fmt's scale format (float32 values of its grid, saturating) for a block
    maximum (or range) a, target maximum m and tensor scale t."""
    scale_format = fmt.block.scale_format
    return quantize(a / (target * tensor_scale), scale_format, scale_format.standard_max)


def block_tensor_scale(fmt: QuantFormat, max_value: torch.Tensor | float, device: torch.device | str
                       ) -> torch.Tensor:
    """NVFP4's float32 tensor scale t = max(max_value, 1e-30) / (top * S) (S = `BlockScaling.scale_max`)."""
    top = fmt.standard_max
    tensor_scale = as_float32(max_value, device).clamp(min=_TINY)
    return tensor_scale / (top * fmt.block.scale_max(top))


def block_constants(fmt: QuantFormat, max_value: torch.Tensor | float, device: torch.device | str) -> torch.Tensor:
    """The block kernel's float32 constants [5], each made by the reference's own ops on `device` (torch divides
    by a Python scalar differently on CPU and CUDA): the tensor scale t (`block_tensor_scale`; 1 for power-of-two
    scales), s and u of the scale format at its standard max (block_scale_codes's `quantize` of a / (m t)), s and u
    of the element at its standard max (quantize_elements's MX branch)."""
    scale_format, element = fmt.block.scale_format, fmt.element
    tensor_scale = (torch.ones((), device=device) if fmt.block.power_of_two
                    else block_tensor_scale(fmt, max_value, device).reshape(()))
    return torch.stack([tensor_scale, grid_scale(scale_format, scale_format.standard_max, device),
                        grid_inverse(scale_format, scale_format.standard_max, device),
                        grid_scale(element, element.standard_max, device),
                        grid_inverse(element, element.standard_max, device)])


def pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension [..., n] -> [..., 1] in a fixed order, the same on every device and in the
    kernel: neighbours first (x0 + x1, x2 + x3, ...), then neighbouring sums, ...; n is padded with zeros to a power
    of two (adding +0 is exact for the non-negative terms summed here). torch's `sum` picks its order per device."""
    width = 1 << (x.shape[-1] - 1).bit_length()
    if width != x.shape[-1]:
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x


def block_range(fmt: QuantFormat, code: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """A block's range top * code * t (float32, multiplied in this order; 0 where the code is 0)."""
    return fmt.standard_max * code * tensor_scale


def block_scales(amax: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float,
                 blocks: torch.Tensor | None = None, clip: torch.Tensor | None = None) -> torch.Tensor:
    """The scale of each block from its absolute maximum amax [..., blocks, 1] (float32), per formats.py, with a
    = amax, or clip * amax (clip broadcastable to amax):

    power-of-two scales: k = clamp(floor(log2 a) - emax, -bias_s, emax_s), returned as the int32 exponent k;
    others: the block range `block_range(fmt, *block_scale_codes(amax, fmt, max_value, blocks, clip))` (float32;
    blocks [..., blocks, size] needed with several block maxima).
    """
    if fmt.block.power_of_two:
        scale_format = fmt.block.scale_format
        exponent = floor_log2(amax if clip is None else amax * clip) - fmt.max_exponent
        return exponent.clamp_(-scale_format.standard_bias, scale_format.max_exponent)
    return block_range(fmt, *block_scale_codes(amax, fmt, max_value, blocks, clip))


def block_shaped(value: torch.Tensor | float | None, device: torch.device) -> torch.Tensor | float | None:
    """A per-tensor [] or per-row [..., 1] value (a range, a clip) shaped for block maxima [..., blocks, 1]: a
    tensor with dimensions gets a trailing 1 (so [..., 1] stays per row); others unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value.to(device).unsqueeze(-1)
    return value


def _quantize_blocks(x: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor | float,
                     block_scale: torch.Tensor | None = None, clip: torch.Tensor | float | None = None
                     ) -> torch.Tensor:
    size = fmt.block.size
    if x.shape[-1] % size:
        raise ValueError(f"{fmt.name} needs the last dimension ({x.shape[-1]}) to be a multiple of {size}")
    blocks = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // size, size)
    max_value = block_shaped(max_value, x.device)  # a per-row range [..., 1] stays per row for the blocks
    if clip is not None:
        if block_scale is not None:
            raise ValueError("clip multiplies the data's block maxima: it does not combine with explicit block_scale")
        clip = as_float32(clip, x.device)
        if clip.dim() > 0 and clip.shape[-1] != 1:
            raise ValueError(f"clip {tuple(clip.shape)} must be per tensor or per row [..., 1]")
        clip = block_shaped(clip, x.device)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if block_scale is None:
        scales = block_scales(amax, fmt, max_value, blocks, clip)
    elif fmt.block.power_of_two:
        scales = block_scale.to(device=x.device, dtype=torch.int32).unsqueeze(-1)
    else:
        scales = block_scale.to(device=x.device, dtype=torch.float32).unsqueeze(-1)
    q = quantize_elements(blocks, fmt, scales)
    if fmt.block.power_of_two:
        q.masked_fill_(~torch.isfinite(amax), float("nan"))  # OCP MX: a NaN or Inf in a block makes its scale NaN
        if isinstance(max_value, torch.Tensor):  # unused, but its shape broadcasts as for other formats
            q = q.expand(torch.broadcast_shapes(q.shape, max_value.shape))
    return q.reshape(*q.shape[:-2], x.shape[-1]).to(x.dtype)  # a range with more dims broadcasts x (candidates)


def quantize_elements(x: torch.Tensor, fmt: QuantFormat, scales: torch.Tensor) -> torch.Tensor:
    """The elements x (float32) of a block-scaled fmt under given block scales, each element with its block's scale
    (scales broadcast to x's shape; the encoding of `block_scales`):

    power-of-two scale formats: q = 2^k Q(x 2^-k; element, standard_max), k the int32 exponent (exact: 2^-k and
    2^k are float32 numbers for |k| <= 127); others: q = Q(x; element, R), R the float32 block range, 0 where R = 0.
    Returns float32 of the broadcast shape; no NaN rule (`quantize` makes a block holding NaN or Inf NaN under MX).
    """
    element = fmt.element
    if fmt.block.power_of_two:
        x = x.expand(torch.broadcast_shapes(x.shape, scales.shape))  # ldexp keeps its input's shape
        return torch.ldexp(quantize(torch.ldexp(x, -scales), element, element.standard_max), scales)
    return quantize(x, element, scales).masked_fill_(scales == 0, 0.0)  # a zero scale gives zeros


def _use_kernel(x: torch.Tensor, fmt: QuantFormat, use_kernel: bool | None, blocks: bool = False) -> bool:
    """Whether to run the Triton kernel: use_kernel None picks it where it applies; True demands it (RuntimeError
    with the reason where it cannot run). blocks: the caller has the block-scaled kernel (the activation path)."""
    return kernels.chosen(use_kernel, lambda: kernels.unavailable_reason(x, fmt, blocks))


def quantize_activation(x: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor,
                        channel_scale: torch.Tensor | None = None,
                        scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                        use_kernel: bool | None = None, block_clip: torch.Tensor | None = None) -> torch.Tensor:
    """q(x * c; max_value) for a per-tensor max_value [] and optional per-channel powers of two c [in] (float32).

    Equals `quantize(x * channel_scale, fmt, max_value, clip=block_clip)` bit for bit; one fused kernel on CUDA
    (element formats: `kernels.fake_quantize`; block-scaled formats: `kernels.block_fake_quantize`).
    scales: `activation_scales(fmt, max_value)` computed once by the caller (saves small kernel launches).
    block_clip []: a block-scaled format's clipping multiplier of its dynamic block maxima (None: 1).
    """
    if block_clip is not None and fmt.block is None:
        raise ValueError(f"block_clip needs a block-scaled format, got {fmt.name}")
    if fmt.block is not None:
        if channel_scale is not None:  # configs give block formats no shifts: the reference's product, unfused
            x = x * channel_scale.to(x.dtype)
        if block_clip is not None:
            block_clip = torch.as_tensor(block_clip, dtype=torch.float32)
        clip_ok = block_clip is None or block_clip.numel() == 1  # per-row clips: the reference only
        if clip_ok and _use_kernel(x, fmt, use_kernel, blocks=True):
            constants = scales[0] if scales is not None else block_constants(fmt, max_value, x.device)
            return kernels.block_fake_quantize(x, fmt, constants, block_clip)
        if use_kernel and not clip_ok:
            raise RuntimeError("use_kernel=True, but the Triton kernel takes one block clip per tensor")
        return quantize(x, fmt, max_value, clip=block_clip)
    if _use_kernel(x, fmt, use_kernel):
        scale, inverse = scales if scales is not None else activation_scales(fmt, max_value)
        return kernels.fake_quantize(x, fmt, scale, inverse, channel_scale, kernels.FAKE)[0]
    if channel_scale is not None:
        x = x * channel_scale.to(x.dtype)
    return quantize(x, fmt, max_value)


def grid_candidates(x: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor, channel_scale: torch.Tensor | None,
                    dtype: torch.dtype, use_kernel: bool | None = None) -> torch.Tensor:
    """Grid values of x for C candidates: out[c] = round_to_grid(x * c_c * s_c) / c_c, as `dtype`.

    x: [n, in]; scale s: [C] per-tensor grid scales; channel_scale c: [C, in] powers of two, or None.
    out: [C, n, in]; out[c] / s_c is the quantized x of candidate c. Exact in bfloat16 (see above).
    Element formats only (block formats have no per-tensor grid).
    """
    if fmt.block is not None:
        raise ValueError(f"grid_candidates takes element formats, got {fmt.name}")
    if _use_kernel(x, fmt, use_kernel):
        return kernels.fake_quantize(x, fmt, scale, scale, channel_scale, kernels.GRID, dtype=dtype)
    multiplier = scale.view(-1, 1, 1)
    if channel_scale is not None:
        multiplier = multiplier * channel_scale.unsqueeze(1)
    grid = round_to_grid(x.unsqueeze(0), fmt, multiplier)
    if channel_scale is not None:
        grid.div_(channel_scale.unsqueeze(1))
    return grid.to(dtype)


def weight_residuals(weight: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor, dtype: torch.dtype,
                     use_kernel: bool | None = None) -> torch.Tensor:
    """q(W) - W for C candidate ranges per row: weight [out, in] (float32 or bfloat16; computed in float32 from
    its exact upcast), max_value [C, out] -> [C, out, in] as `dtype`. One fused kernel on CUDA."""
    if _use_kernel(weight, fmt, use_kernel):
        scale, inverse = grid_scale(fmt, max_value, weight.device), grid_inverse(fmt, max_value, weight.device)
        return kernels.fake_quantize(weight, fmt, scale, inverse, None, kernels.RESIDUAL, dtype=dtype)
    weight = weight.float()
    return (quantize(weight, fmt, max_value.unsqueeze(-1)) - weight).to(dtype)


def residual_proxy(weight: torch.Tensor, fmt: QuantFormat, max_value: torch.Tensor, diagonal: torch.Tensor,
                   cross: torch.Tensor, basis: torch.Tensor, values: torch.Tensor, use_kernel: bool | None = None
                   ) -> torch.Tensor:
    """P[c, o] = sum_k values_k (u . basis[:, k])^2 + sum_i u_i (diagonal_i u_i + 2 cross[o, i]), u = q(W[o]) - W[o]
    under candidate range max_value[c, o]: the quadratic form u^T (B diag(values) B^T + diag(diagonal)) u + 2 u.cross.

    weight [out, in]; max_value [C, out]; diagonal [in]; cross [out, in]; basis [in, rank] (u is rounded to its dtype
    before the projection, as a product in that dtype would); values [rank]. Returns [C, out] float32. One fused
    kernel on CUDA that never stores u; here the reference, in float32.
    """
    if _use_kernel(weight, fmt, use_kernel):
        scale, inverse = grid_scale(fmt, max_value, weight.device), grid_inverse(fmt, max_value, weight.device)
        return kernels.residual_proxy(weight, fmt, scale, inverse, diagonal, cross, basis, values)
    u = weight_residuals(weight, fmt, max_value, torch.float32, use_kernel=False)
    projected = u.to(basis.dtype).float() @ basis.float()
    return projected.square() @ values.float() + ((u * diagonal.float() + 2 * cross.float()) * u).sum(-1)
