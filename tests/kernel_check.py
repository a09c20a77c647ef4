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
from quant_layers.formats import fp_format, formats_of_width, int_format  # noqa: E402
from quant_layers.quantize import (activation_scales, grid_candidates, quantize_activation,  # noqa: E402
                                   residual_proxy, weight_residuals)

FORMATS = formats_of_width(4) + [int_format(4), int_format(8), fp_format(4, 3), fp_format(5, 2), fp_format(2, 3)]
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
    checked += len(kernels.TILES) + len(PROXY_CASES) + 1
    mismatches += tile_mismatches(device, g) + proxy_mismatches(device, g) + search_proxy_mismatches(device, g)
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
