"""Compare the Triton kernels with the PyTorch reference (the quantizer bit for bit, the weight proxy up to float32
summation order); prints one JSON line of mismatches.

Run as a script (under TRITON_INTERPRET=1 on CPU, or on CUDA); tests/test_kernels.py runs it.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quant_layers import kernels  # noqa: E402
from quant_layers.formats import fp_format, formats_of_width, int_format, parse_format  # noqa: E402
from quant_layers.quantize import (activation_scales, block_constants, grid_candidates,  # noqa: E402
                                   quantize_activation, residual_proxy, weight_residuals)

FORMATS = formats_of_width(4) + [int_format(4), int_format(8), fp_format(4, 3), fp_format(5, 2), fp_format(2, 3)]
BLOCK_FORMATS = [parse_format(name) for name in ("NVFP4", "MXFP4", "NVFP4_4OVER6", "MXFP8")]
BLOCK_CLIPS = (None, 0.7, 1.0)
BLOCK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# per format: dtypes x clips on 33 rows, rows 1 and 5, three more tensor ranges, QuantLinear's precomputed constants
BLOCK_CHECKS = len(BLOCK_FORMATS) * (len(BLOCK_DTYPES) * len(BLOCK_CLIPS) + 2 + 3 + 1) + 2 * len(kernels.BLOCK_TILES)
PROXY_CASES = [(fmt, rank, dtype) for fmt in formats_of_width(4) + [int_format(4)] for rank in (0, 5, 32)
               for dtype in (torch.float32, torch.bfloat16)]  # the weight proxy: float sums, checked to 1e-5


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, -0.0 and +0.0 told apart, NaN positions equal (payloads ignored)."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    a, b = a.float().masked_fill(nan_a, 0), b.float().masked_fill(nan_b, 0)
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def residual_close(got: torch.Tensor, want: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """q(W) - W may be one fused multiply-subtract on the GPU, fl(g * u - W), where the reference rounds twice,
    fl(fl(g * u) - W): the two differ by at most 2^-24 (|q| + |got| + |want|) <= 2^-21 |W| (|q| <= 2 |W|,
    |q - W| <= 3 |W|); bfloat16 results may differ by one more bfloat16 step. Non-finite results must match."""
    got, want = got.float(), want.float()
    finite = torch.isfinite(want)
    if not same_bits(got[~finite], want[~finite]):
        return False
    tolerance = 2.0**-21 * weight.abs().float().unsqueeze(0)
    if dtype == torch.bfloat16:
        tolerance = tolerance + torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=2.0**-126))) - 7)
    return bool(((got - want).abs() <= tolerance)[finite].all())


def first_difference(got: torch.Tensor, want: torch.Tensor) -> str:
    differ = (got.float() != want.float()) & ~(torch.isnan(got) & torch.isnan(want))
    differ |= torch.signbit(got.float()) != torch.signbit(want.float())
    index = tuple(differ.nonzero()[0].tolist()) if differ.any() else ()
    return f" at {index}: {got[index].item()!r} vs {want[index].item()!r}" if index else ""


def reference(fn, *args, **kwargs):
    return fn(*args, **kwargs, use_kernel=False)


def kernel(fn, *args, **kwargs):
    return fn(*args, **kwargs, use_kernel=True)


def main(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 80, generator=g) * torch.exp2(torch.randint(-6, 6, (80,), generator=g).float())
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1e-30])
    x[1, :4] = torch.tensor([0.25, -0.75, 2.5, 1e30])  # ties after scaling by 1 and overflow
    mismatches, checked = [], 0
    for fmt in FORMATS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(device=device, dtype=dtype)
            max_value = torch.tensor(3.0, device=device)
            shift = torch.randint(0, 4, (80,), generator=g).to(device)
            for channel_scale in (None, torch.exp2(shift.float()).to(dtype)):
                got = kernel(quantize_activation, xd, fmt, max_value, channel_scale)
                want = reference(quantize_activation, xd, fmt, max_value, channel_scale)
                checked += 1
                if got.dtype != want.dtype or not same_bits(got, want):
                    mismatches.append(f"fake {fmt} {dtype} shift={channel_scale is not None}"
                                      + first_difference(got, want))
            scale = (torch.rand(5, generator=g) * 4 + 0.1).to(device)
            shifts = torch.exp2(torch.randint(0, 4, (5, 80), generator=g).float()).to(device)
            for channel_scale in (None, shifts):
                for out_dtype in (torch.bfloat16, torch.float32):
                    got = kernel(grid_candidates, xd, fmt, scale, channel_scale, out_dtype)
                    want = reference(grid_candidates, xd, fmt, scale, channel_scale, out_dtype)
                    checked += 1
                    if got.dtype != want.dtype or not same_bits(got, want):
                        mismatches.append(f"grid {fmt} {dtype}->{out_dtype} shift={channel_scale is not None}"
                                          + first_difference(got, want))
        ranges = (torch.rand(3, x.shape[0], generator=g) * 5 + 0.05).to(device)
        for weight_dtype, out_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                        (torch.bfloat16, torch.bfloat16)):  # the search's bfloat16 path
            weight = x.to(device=device, dtype=weight_dtype)
            got = kernel(weight_residuals, weight, fmt, ranges, out_dtype)
            want = reference(weight_residuals, weight.float(), fmt, ranges, out_dtype)
            checked += 1
            exact = same_bits(got, want) if device == "cpu" else residual_close(got, want, weight, out_dtype)
            if got.dtype != want.dtype or not exact:
                mismatches.append(f"residual {fmt} {weight_dtype} -> {out_dtype}" + first_difference(got, want))
    checked += len(kernels.TILES) + len(PROXY_CASES) + 1 + BLOCK_CHECKS
    mismatches += tile_mismatches(device, g) + proxy_mismatches(device, g) + search_proxy_mismatches(device, g)
    mismatches += block_mismatches(device, g)
    if device == "cuda" and torch.cuda.device_count() > 1:
        checked += 1
        if not second_gpu_matches():
            mismatches.append("fake E2M1 on cuda:1 (current device cuda:0) differs from the reference")
    print(json.dumps({"checked": checked, "mismatches": mismatches}))


def tile_mismatches(device: str, g: torch.Generator) -> list[str]:
    """Every tile of the autotuned set gives the reference's bits (tiles cut rows and channels unevenly here)."""
    x = torch.randn(70, 1100, generator=g).to(device=device, dtype=torch.bfloat16)
    fmt, max_value = fp_format(2, 1), torch.tensor(2.5, device=device)
    shift = torch.exp2(torch.randint(0, 4, (1100,), generator=g).float()).to(device)
    want = reference(quantize_activation, x, fmt, max_value, shift)
    scale, inverse = activation_scales(fmt, max_value)
    mismatches = []
    for tile in kernels.TILES:
        got = kernels.fake_quantize(x, fmt, scale, inverse, shift, kernels.FAKE, tile=tile)[0]
        if not same_bits(got, want):
            mismatches.append(f"tile {tile}" + first_difference(got, want))
    return mismatches


def block_activations(rows: int, g: torch.Generator) -> torch.Tensor:
    """[rows, 160] float32 activations for block formats: channels of very different sizes (outliers), and in the
    first rows the special blocks: NaN, +-Inf, +-0, an all-zero block of 32, a constant block (4/6's two scales tie),
    float32 subnormals and 1e30 (saturating, Inf in float16), an element tie (0.5, 1.5 steps), block maxima on
    rounding boundaries of the block scale, and a block where Four Over Six's two scales tie in error."""
    x = torch.randn(rows, 160, generator=g) * torch.exp2(torch.randint(-6, 7, (160,), generator=g).float())
    x[:, 7::16] *= 40  # an outlier channel in every block
    special = [(0, 0, [float("nan"), 1.0]), (0, 32, [float("inf"), -2.0, -0.0, 0.0]), (0, 64, [-float("inf")]),
               (0, 96, [0.0] * 32), (1, 0, [0.75] * 16), (1, 32, [1e-40, -3e-39, 2e-45] + [0.0] * 13),
               (1, 64, [1e30, -5.0]), (1, 96, [6.0, 5.0, 3.0, -2.5, 0.25, 1.75, 0.5] + [0.0] * 9),
               (2, 128, [1e-30, -1e-31, 3e-30]),
               # a / (m t) exactly between two E4M3 values (ties to even) at t = 2^-9 (ranges 5.25 NVFP4, 3 for 4/6)
               (2, 0, [17 * 6 * 2**-9, 0.1, -0.05] + [0.0] * 13), (2, 16, [17 * 4 * 2**-9, 0.05] + [0.0] * 14),
               (2, 32, [4.0, 1.0] + [0.0] * 30),
               # 4/6: both scales give the same squared error (0.0107421875) with different values: the first wins
               (2, 48, [-0.5, -0.09375, 0.21875, 0.09375, -0.25, 0.1875, -0.0625, 0.15625, -0.0, -0.75, 0.15625,
                        -0.25, 0.09375, -0.0, -0.09375, 0.3125])]
    for row, start, values in special:
        if row < rows:
            x[row, start:start + len(values)] = torch.tensor(values)
    return x


def block_mismatches(device: str, g: torch.Generator) -> list[str]:
    """The block-scaled activation kernel (NVFP4, MXFP4, Four Over Six, MXFP8) gives the reference's bits: every
    dtype and clip, row counts 1, 5 and 33 (tiles cut both unevenly), tiny and small tensor ranges (saturating
    block scales), QuantLinear's precomputed constants, every tile of the tuned set."""
    mismatches = []

    def check(label, x, fmt, max_value, clip, scales=None, tile=None):
        clip = None if clip is None else torch.tensor(clip, device=device)
        max_value = torch.tensor(max_value, device=device)
        want = reference(quantize_activation, x, fmt, max_value, block_clip=clip)
        if tile is None:
            got = kernel(quantize_activation, x, fmt, max_value, scales=scales, block_clip=clip)
        else:
            got = kernels.block_fake_quantize(x, fmt, block_constants(fmt, max_value, x.device), clip, tile=tile)
        if got.dtype != want.dtype or not same_bits(got, want):
            clip_text = None if clip is None else float(clip)
            mismatches.append(f"block {label} {fmt} {x.dtype} rows={x.shape[0]} clip={clip_text} "
                              f"range={float(max_value):g}" + first_difference(got, want))

    x = block_activations(33, g)
    for fmt in BLOCK_FORMATS:
        for dtype in BLOCK_DTYPES:
            for clip in BLOCK_CLIPS:
                check("fake", x.to(device=device, dtype=dtype), fmt, 3.0, clip)
        for rows in (1, 5):
            check("rows", block_activations(rows, g).to(device=device, dtype=torch.bfloat16), fmt, 3.0, 0.7)
        for max_value in (1e-35, 0.01, 5.25):  # the 1e-30 floor of t; block scales saturating at 448; t = 2^-9
            check("range", x.to(device), fmt, max_value, 1.0)
        max_value = torch.tensor(3.0, device=device)
        check("constants", x.to(device=device, dtype=torch.bfloat16), fmt, 3.0, 1.0,
              scales=activation_scales(fmt, max_value))
    for fmt in BLOCK_FORMATS[1:3]:
        for tile in kernels.BLOCK_TILES:
            check(f"tile {tile}", block_activations(70, g).to(device), fmt, 3.0, 0.7, tile=tile)
    return mismatches


def proxy_mismatches(device: str, g: torch.Generator) -> list[str]:
    """The fused weight proxy equals its reference up to float32 summation order (rows and inputs cut unevenly by
    its tiles): |got - want| <= 1e-5 x the sum of the magnitudes of its terms."""
    weight = torch.randn(70, 150, generator=g) * torch.exp2(torch.randint(-3, 3, (70, 1), generator=g).float())
    ranges = (torch.rand(4, 70, generator=g) * 3 + 0.1) * weight.abs().amax(1)
    diagonal, cross = torch.rand(150, generator=g), torch.randn(70, 150, generator=g)
    basis_full, values_full = torch.linalg.qr(torch.randn(150, 32, generator=g)).Q, torch.rand(32, generator=g) * 10
    mismatches = []
    for fmt, rank, dtype in PROXY_CASES:
        w, basis = weight.to(device=device, dtype=dtype), basis_full[:, :rank].to(device=device, dtype=dtype)
        args = (fmt, ranges.to(device), diagonal.to(device), cross.to(device), basis, values_full[:rank].to(device))
        got, want = kernel(residual_proxy, w, *args), reference(residual_proxy, w, *args)
        u = reference(weight_residuals, w.float(), fmt, args[1], torch.float32)
        size = ((u.to(dtype).float() @ basis.float()).square() @ args[5] + (u.square() * args[2]
                + 2 * (u * args[3]).abs()).sum(-1))
        if got.shape != want.shape or not bool(((got - want).abs() <= 1e-5 * size + 1e-30).all()):
            worst = float(((got - want).abs() / size.clamp(min=1e-30)).max())
            mismatches.append(f"proxy {fmt} rank {rank} {dtype}: relative difference {worst:.2e}")
    return mismatches


def search_proxy_mismatches(device: str, g: torch.Generator) -> list[str]:
    """The search's proxy-ranked losses (utils/search/problem.py) through the kernel equal those of its sliced reference."""
    from utils.search.problem import Budget, LinearProblem
    from utils.search.space import SearchSpace
    from utils.search.steps import minmax_state

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(300, 96, generator=g).to(device=device, dtype=dtype)
    weight = torch.randn(40, 96, generator=g).to(device=device, dtype=dtype)
    problem = LinearProblem(x, weight, Budget(96 * 16 * 8), use_kernel=True)
    sliced = LinearProblem(x, weight, Budget(96 * 16 * 8), use_kernel=False)  # reference in slices of 8 rows
    fmt = fp_format(2, 1)
    state = minmax_state(problem, fmt, fmt)
    candidates = SearchSpace((0.01, 1.2, 12)).candidates(fmt, problem.weight_absmax)
    got = problem.weight_proxy_losses(fmt, candidates, state, 8)
    want = sliced.weight_proxy_losses(fmt, candidates, state, 8)
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())):
        return [f"search proxy: largest difference {float((got - want).abs().max()):.3e}"]
    return []


def second_gpu_matches() -> bool:
    """A kernel on a tensor of the second GPU, just written there by a queued op, while cuda:0 is current:
    launched on cuda:0's stream it would read x before it exists (a split model's blocks on cuda:1)."""
    x = torch.randn(8192, 4096, device="cuda:1").mul_(3.0)
    max_value = torch.tensor(3.0, device="cuda:1")
    got = kernel(quantize_activation, x, fp_format(2, 1), max_value, None)
    return got.device == x.device and same_bits(got, reference(quantize_activation, x, fp_format(2, 1), max_value,
                                                                None))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
