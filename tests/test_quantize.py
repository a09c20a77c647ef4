"""Numerics of the one quantizer, checked against independent plain-Python enumerations of each grid."""

import math

import pytest
import torch

from quant_layers.formats import (E4M3FN, E8M0, BlockScaling, QuantFormat, exponent_bias_from_max, formats_of_width,
                                  fp_format, int_format, max_from_exponent_bias, parse_format)
from quant_layers.quantize import abs_max, quantize


def enumerate_fp_grid(exponent_bits: int, mantissa_bits: int, bias: float) -> list[float]:
    """Every value of sign + E + M with real bias b, decoded code by code (float64): exponent code 0 holds
    the subnormals k * 2^(1 - b - M), codes 1..2^E-1 the normals 2^(e - b) * (1 + m / 2^M)."""
    magnitudes = {k * 2.0 ** (1 - bias - mantissa_bits) for k in range(2**mantissa_bits)}
    for e in range(1, 2**exponent_bits):
        for m in range(2**mantissa_bits):
            magnitudes.add(2.0 ** (e - bias) * (1 + m / 2**mantissa_bits))
    return sorted({s * v for v in magnitudes for s in (1, -1)})


def nearest(grid: list[float], x: float) -> float:
    return min(grid, key=lambda g: abs(g - x))


def test_e2m1_with_max_6_is_the_fp4_grid():
    values = quantize(torch.linspace(-10, 10, 200001), fp_format(2, 1), 6.0)
    assert sorted(set(values.tolist())) == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_e2m1_max_6_has_bias_1():
    assert float(exponent_bias_from_max(fp_format(2, 1), 6.0)) == 1.0
    assert float(max_from_exponent_bias(fp_format(2, 1), 1.0)) == 6.0


def _fits_float32(e: int, m: int, bias: float) -> bool:
    """The grid's largest and smallest non-zero magnitudes are normal float32 numbers."""
    return 2.0 ** (2**e - bias) < 2.0**127 and 2.0 ** (1 - bias - m) > 2.0**-126


FP_GRIDS = [
    (e, bits - 1 - e, bias)
    for bits in range(3, 9)
    for e in range(1, bits)
    for bias in (0.0, 1.0, 3.0, -2.0, 0.4, 2.7)
    if _fits_float32(e, bits - 1 - e, bias)
]


def scaled_grid(exponent_bits: int, mantissa_bits: int, max_value: float) -> torch.Tensor:
    """The grid quantize() defines for a range: the bias-0 grid, enumerated code by code in Python (exact: few
    significant bits), times u = max_value / grid_max rounded once to float32 (quantize.py's definition)."""
    standard = torch.tensor(enumerate_fp_grid(exponent_bits, mantissa_bits, 0.0), dtype=torch.float32)
    u = torch.tensor(max_value, dtype=torch.float32) / torch.tensor(max(standard.tolist()), dtype=torch.float32)
    return standard * u


def nearest_on_grid(grid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Brute force: the grid point nearest each x (float64 distances), saturating at the ends."""
    distance = (x.double().view(-1, 1) - grid.double().view(1, -1)).abs()
    return grid[distance.argmin(dim=1)]


@pytest.mark.parametrize("exponent_bits,mantissa_bits,bias", FP_GRIDS)
def test_grid_matches_independent_enumeration(exponent_bits, mantissa_bits, bias):
    fmt = fp_format(exponent_bits, mantissa_bits)
    grid = enumerate_fp_grid(exponent_bits, mantissa_bits, bias)
    max_value = max_from_exponent_bias(fmt, bias)
    assert float(max_value) == pytest.approx(max(grid), rel=1e-6)  # the paper's formula, float64 enumeration
    on_grid = scaled_grid(exponent_bits, mantissa_bits, float(max_value))
    assert torch.equal(quantize(on_grid, fmt, max_value), on_grid)  # grid points map to themselves, bit for bit
    # Random inputs (and out-of-range ones) land on the nearest grid point (no ties: random float32 values).
    generator = torch.Generator().manual_seed(exponent_bits * 100 + mantissa_bits)
    x = (torch.rand(2000, generator=generator) * 2 - 1) * 1.3 * max(grid)
    assert torch.equal(quantize(x, fmt, max_value), nearest_on_grid(on_grid, x))


@pytest.mark.parametrize("seed", range(40))
def test_random_formats_biases_and_exact_ties(seed):
    """Property test over random (E, M, real-valued bias): on the grid, nearest, idempotent, odd. With an integer
    bias the scale is a power of two, so midpoints of neighbouring grid values are exact ties: each must go to the
    neighbour whose mantissa code is even (the one whose standard-grid value has an even last code)."""
    rng = torch.Generator().manual_seed(seed)
    bits = int(torch.randint(3, 9, (1,), generator=rng))
    exponent_bits = int(torch.randint(1, min(bits - 1, 4) + 1, (1,), generator=rng))
    mantissa_bits = bits - 1 - exponent_bits
    fmt = fp_format(exponent_bits, mantissa_bits)
    bias = float(torch.rand(1, generator=rng) * 8 - 4)
    max_value = float(max_from_exponent_bias(fmt, bias))
    grid = scaled_grid(exponent_bits, mantissa_bits, max_value)
    x = (torch.randn(3000, generator=rng) * max_value / 2).float()
    q = quantize(x, fmt, max_value)
    assert torch.equal(q, nearest_on_grid(grid, x))
    assert torch.equal(quantize(q, fmt, max_value), q) and torch.equal(quantize(-x, fmt, max_value), -q)
    integer_bias = round(bias)
    max_value = float(max_from_exponent_bias(fmt, integer_bias))
    positive = [v for v in enumerate_fp_grid(exponent_bits, mantissa_bits, 0.0) if v >= 0]  # standard grid
    scale = 2.0 ** -integer_bias
    for lower, upper in zip(positive, positive[1:]):
        middle = (lower + upper) / 2
        expected = round_half_even_by_hand(middle, mantissa_bits) * scale
        got = quantize(torch.tensor([middle * scale, -middle * scale]), fmt, max_value).tolist()
        assert got == [expected, -expected], (exponent_bits, mantissa_bits, integer_bias, middle)


def round_half_even_by_hand(y: float, mantissa_bits: int) -> float:
    """LLM-FP4's rounding (eq. 2-4, bias 0) in plain Python: in binade e = max(floor(log2 y), 1) the step is
    2^(e - M); y / step rounds to the nearest integer, a tie to the even one. For M >= 1 that is the neighbour with
    the even mantissa code; with M = 0 a tie between 2^e and 2^(e+1) goes up (significand 1.5 -> 2)."""
    exponent = max(math.floor(math.log2(y)), 1)
    step = 2.0 ** (exponent - mantissa_bits)
    units = y / step
    below = math.floor(units)
    if units - below > 0.5 or (units - below == 0.5 and below % 2 == 1):
        below += 1
    return below * step


@pytest.mark.parametrize("bits", range(3, 9))
def test_fp_grid_size(bits):
    for fmt in formats_of_width(bits):
        values = enumerate_fp_grid(fmt.exponent_bits, fmt.mantissa_bits, 0.0)
        assert len(values) == 2**bits - 1  # two zeros collapse into one
        q = quantize(torch.tensor(values), fmt, fmt.grid_max)
        assert sorted(set(q.tolist())) == values


# Ties to even on E2M1 (max 6). Each bucket on its own, with both signs: in binade [2^e, 2^(e+1)) the step is
# 2^(e-1); a value exactly between two grid points goes to the one whose mantissa code is even.
TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]


@pytest.mark.parametrize("value,expected", TIES)
def test_ties_round_to_even(value, expected):
    fmt = fp_format(2, 1)
    assert float(quantize(torch.tensor(value), fmt, 6.0)) == expected
    assert float(quantize(torch.tensor(-value), fmt, 6.0)) == -expected


@pytest.mark.parametrize("value,expected", [(0.5, 0.0), (1.5, 2.0), (2.5, 2.0), (-3.5, -4.0), (6.5, 6.0)])
def test_int_ties_round_to_even(value, expected):
    assert float(quantize(torch.tensor(value), int_format(4), 7.0)) == expected


def test_int_grid_and_saturation():
    q = quantize(torch.linspace(-20, 20, 4001), int_format(4), 7.0)
    assert sorted(set(q.tolist())) == list(range(-7, 8))
    assert float(quantize(torch.tensor(0.3), int_format(8), 127.0 * 0.1)) == pytest.approx(0.3)


@pytest.mark.parametrize("fmt", [fp_format(2, 1), fp_format(3, 0), fp_format(1, 2), fp_format(4, 3), fp_format(5, 2)])
def test_max_bias_round_trip(fmt):
    max_values = torch.tensor([1e-3, 0.37, 1.0, 6.0, 123.4, 5e4])
    assert torch.allclose(max_from_exponent_bias(fmt, exponent_bias_from_max(fmt, max_values)), max_values, rtol=1e-6)
    biases = torch.tensor([-3.0, -0.5, 0.0, 1.0, 2.25, 7.0])
    assert torch.allclose(exponent_bias_from_max(fmt, max_from_exponent_bias(fmt, biases)), biases, atol=1e-5)
    # The formula of the paper: max = (2 - 2^-M) 2^(2^E - 1 - b).
    b = 0.7
    paper = (2 - 2.0 ** -fmt.mantissa_bits) * 2.0 ** (2**fmt.exponent_bits - 1 - b)
    assert float(max_from_exponent_bias(fmt, b)) == pytest.approx(paper, rel=1e-6)


def test_e4m3_matches_torch_float8_below_448():
    """Outside oracle: OCP FP8 E4M3 (bias 7) equals our E4M3 with max 480 wherever OCP has no NaN code."""
    fmt = fp_format(4, 3)
    x = torch.cat([torch.randn(20000) * 40, torch.randn(2000) * 1e-2, torch.linspace(-448, 448, 10001)])
    ours = quantize(x, fmt, max_from_exponent_bias(fmt, 7.0))
    reference = x.to(torch.float8_e4m3fn).float()
    assert torch.equal(ours, reference)


def test_per_channel_ranges_broadcast():
    fmt = fp_format(2, 1)
    x = torch.tensor([[3.0, 3.0], [3.0, 3.0]])
    per_row = quantize(x, fmt, torch.tensor([[6.0], [1.5]]))
    assert per_row.tolist() == [[3.0, 3.0], [1.5, 1.5]]
    per_column = quantize(torch.full((2, 2), 1.3), fmt, torch.tensor([6.0, 12.0]))
    assert per_column.tolist() == [[1.5, 1.0], [1.5, 1.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_kept_and_idempotent(dtype):
    fmt = fp_format(2, 1)
    x = (torch.randn(64, 64) * 3).to(dtype)
    q = quantize(x, fmt, 6.0)
    assert q.dtype == dtype
    assert torch.equal(quantize(q, fmt, 6.0), q)
    assert torch.equal(quantize(-x, fmt, 6.0), -q)


def test_zero_and_nan():
    fmt = fp_format(2, 1)
    q = quantize(torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")]), fmt, 6.0)
    assert q[:2].tolist() == [0.0, 0.0]
    assert math.isnan(q[2])
    assert q[3:].tolist() == [6.0, -6.0]


def test_format_data():
    assert [f.name for f in formats_of_width(4)] == ["E3M0", "E2M1", "E1M2"]
    assert parse_format("e2m1") == fp_format(2, 1) and parse_format("INT4") == int_format(4)
    assert fp_format(2, 1).grid_max == 12.0 and int_format(4).grid_max == 7.0
    with pytest.raises(ValueError):
        QuantFormat("fp", 4, 0)
    with pytest.raises(ValueError):
        parse_format("FP4")


# Block-scaled formats (NVFP4, MXFP4): hand-computed blocks.

NVFP4, MXFP4 = parse_format("NVFP4"), parse_format("MXFP4")


def test_block_format_data():
    assert (NVFP4.element, NVFP4.block) == (fp_format(2, 1), BlockScaling(16, E4M3FN, tensor_scale=True))
    assert (MXFP4.element, MXFP4.block) == (fp_format(2, 1), BlockScaling(32, E8M0))
    assert NVFP4.standard_max == 6.0 and fp_format(4, 3).standard_max == 480.0
    for name in ("NVFP4", "MXFP4", "MXFP8", "E2M1/b64/e8m0", "INT8/b32/e8m0", "NVFP4_4OVER6", "E2M1/b16/e4m3/max6,3",
                 "INT8/b16/e4m3/max127,0.75"):
        assert parse_format(name).name == name
    for bad in ("E2M1/b16/e4m3/max", "E2M1/b16/e4m3/max6,,4", "E2M1/b16/e4m3/maxe"):
        with pytest.raises(ValueError):
            parse_format(bad)
    with pytest.raises(ValueError):
        BlockScaling(0, E8M0)
    with pytest.raises(ValueError):
        BlockScaling(16, int_format(8))
    with pytest.raises(ValueError):
        parse_format("E2M1/b16/fp16")


def decode_ocp(exponent_bits: int, mantissa_bits: int, code: int, signed: bool = True) -> float:
    """Plain-Python decode of an OCP float code with the standard bias 2^(E-1) - 1 (subnormals at exponent 0)."""
    sign = -1.0 if signed and code >> (exponent_bits + mantissa_bits) else 1.0
    exponent, mantissa = divmod(code % 2 ** (exponent_bits + mantissa_bits), 2**mantissa_bits)
    bias = 2 ** (exponent_bits - 1) - 1
    if exponent == 0:
        return sign * mantissa * 2.0 ** (1 - bias - mantissa_bits)
    return sign * (1 + mantissa / 2**mantissa_bits) * 2.0 ** (exponent - bias)


def test_scale_formats_derive_their_range_from_their_codes():
    """E4M3 with its NaN code (S.1111.111) tops out at 448, E8M0 (unsigned, no mantissa) spans 2^-127 .. 2^127:
    derived from the fields, checked against a plain decode of the top code and against torch's float8 type."""
    assert E4M3FN.standard_max == decode_ocp(4, 3, 0x7E) == 448.0 == torch.finfo(torch.float8_e4m3fn).max
    assert fp_format(4, 3).standard_max == decode_ocp(4, 3, 0x7F) == 480.0  # this project's elements: no NaN code
    assert E8M0.standard_max == 2.0**127 and E8M0.standard_bias == 127 and E8M0.max_exponent == 127
    assert (E4M3FN.name, E8M0.name) == ("E4M3FN", "UE8M0FN")


def test_e4m3_block_scale_rounding_equals_torch_float8_cast():
    """NVFP4's block scales go through our quantizer with E4M3FN (max 448); outside oracle: torch's float8 cast of
    every float32 in a wide range, ties and subnormals included."""
    codes = torch.arange(0, 0x7F, dtype=torch.int32)
    grid = torch.tensor([decode_ocp(4, 3, int(c)) for c in codes])
    middles = (grid[1:] + grid[:-1]) / 2  # ties
    x = torch.cat([grid, middles, torch.rand(20000, generator=torch.Generator().manual_seed(1)) * 460,
                   torch.exp2(torch.linspace(-14, 9, 5000))])
    assert torch.equal(quantize(x, E4M3FN, 448.0), x.clamp(max=448.0).to(torch.float8_e4m3fn).float())


def mx_reference(block: list[float], element_max: float, element_emax: int, grid: list[float]) -> list[float]:
    """OCP MX v1.0 by hand, in float64: X = 2^(floor(log2 amax) - emax_elem) clamped to 2^-127..2^127, each element
    x / X rounded to the nearest element value (ties to the even code), saturated, times X."""
    amax = max(abs(v) for v in block)
    exponent = math.frexp(amax)[1] - 1 - element_emax if amax > 0 else -127
    scale = 2.0 ** max(-127, min(127, exponent))
    out = []
    for v in block:
        r = max(-element_max, min(element_max, v / scale))
        below = max(g for g in grid if g <= r)
        above = min(g for g in grid if g >= r)
        pick = below if r - below < above - r else above if r - below > above - r else (
            below if grid.index(below) % 2 == 0 else above)
        out.append(pick * scale)
    return out


E2M1_VALUES = [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # even codes at even
# positions from 0 (0.0, 1.0, 2.0, 4.0 have mantissa 0)


@pytest.mark.parametrize("top", [2.0**-30, 2.0**-1, 1.0, 2.0**20, 6.0 * 2.0**-126])
def test_mx_shared_exponent_just_below_a_power_of_two(top):
    """Bug: floor(log2(amax)) in float32 rounds up for amax a few float32 steps below 2^k, doubling the scale. The
    shared exponent now comes from the float's bits; checked against the spec by hand, 1..4 steps below."""
    for steps in range(1, 5):
        amax = torch.tensor(top, dtype=torch.float32)
        for _ in range(steps):
            amax = torch.nextafter(amax, torch.tensor(0.0))
        block = torch.zeros(32)
        block[0], block[1], block[2] = amax, -amax / 3, amax / 7
        expected = mx_reference(block.double().tolist(), 6.0, 2, E2M1_VALUES)
        assert quantize(block, MXFP4, 1.0).double().tolist() == expected


@pytest.mark.parametrize("amax,nonzero", [(1e-31, True), (3e-35, True), (2.0**-124, True), (2.0**-125, True),
                                          (1e-38, True), (1e-40, False), (2.0**-149, False)])
def test_mx_tiny_blocks_reach_the_smallest_e8m0_scale(amax, nonzero):
    """Bug: blocks whose maximum is below 1e-30 became 0, though E8M0 reaches 2^-127 (float32 subnormals
    included): the spec by hand (float64) must match exactly; below 2^-127 * 0.25 the spec gives zeros too."""
    block = torch.zeros(32)
    block[:4] = torch.tensor([amax, -amax / 2, amax * 0.3, amax / 5])
    expected = mx_reference(block.double().tolist(), 6.0, 2, E2M1_VALUES)
    got = quantize(block, MXFP4, 1.0).double().tolist()
    assert got == expected and (got[0] != 0.0) == nonzero


def test_nvfp4_block_scale_rounding_to_zero_gives_zeros():
    """Bug: a block whose E4M3 scale rounds to zero gave +-1e-30 (a floor) instead of zeros."""
    x = torch.zeros(2, 16)
    x[0, 0] = 6 * 448.0  # sets the tensor scale to 1
    x[1, :3] = torch.tensor([1e-4, -3e-4, 2e-5])  # amax / 6 < 2^-10: the E4M3 code is 0
    q = quantize(x, NVFP4, 6 * 448.0)
    assert q[1].tolist() == [0.0] * 16 and not torch.signbit(q[1]).any()
    assert q[0, 0] == 6 * 448.0


def test_nan_in_an_mx_block_makes_the_block_nan():
    block = torch.ones(2, 32)
    block[0, 3] = float("nan")
    q = quantize(block, MXFP4, 1.0)
    assert torch.isnan(q[0]).all() and torch.equal(q[1], torch.ones(32))


@pytest.mark.parametrize("exponent_bits", [8])
def test_formats_beyond_float32_are_rejected(exponent_bits):
    """Bug: --qbits 12 12 12 8 8 8 passed validation, then died in quantize with a traceback."""
    fmt = fp_format(exponent_bits, 3)
    assert fmt.float32_error and "float32" in fmt.float32_error
    with pytest.raises(ValueError, match="exponent bits"):
        quantize(torch.ones(4), fmt, 1.0)
    assert fp_format(7, 4).float32_error is None


def test_mxfp4_block_by_hand():
    """amax 5 -> shared exponent floor(log2 5) - 2 = 0: scale 1, values on the E2M1 grid {0,.5,1,1.5,2,3,4,6};
    5 is a tie between 4 (even mantissa) and 6 -> 4. amax 0.3 -> exponent -2 - 2 = -4: 0.3 -> 4.8 * 2^-4 -> 0.25."""
    block_a = torch.tensor([5.0, 0.7, -2.6, 1.25] + [0.0] * 28)
    block_b = torch.tensor([0.3, -0.1] + [0.0] * 30)
    q = quantize(torch.stack([block_a, block_b]), MXFP4, 1.0)
    assert q[0, :4].tolist() == [4.0, 0.5, -3.0, 1.0]
    assert q[1, :2].tolist() == [0.25, -0.09375]  # -0.1 * 16 = -1.6 -> -1.5 -> -1.5 / 16


def test_nvfp4_block_by_hand():
    """Tensor max 6 * 448 -> float32 tensor scale 1. Block amax 3: FP8 block scale e4m3(3 / 6) = 0.5, range 3;
    block amax 5: e4m3(5/6 = 0.8333) = 0.8125 (1.625 * 2^-1), range 4.875, so 5 saturates to 4.875."""
    x = torch.zeros(2, 16)
    x[0, :3] = torch.tensor([3.0, 1.1, -0.3])
    x[1, :2] = torch.tensor([5.0, 1.0])
    q = quantize(x, NVFP4, 6 * 448.0)
    assert q[0, :3].tolist() == [3.0, 1.0, -0.25]
    assert q[1, :2].tolist() == [4.875, 0.8125]


def test_block_formats_edge_cases():
    zeros = quantize(torch.zeros(3, 32), MXFP4, 1.0)
    assert torch.equal(zeros, torch.zeros(3, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize(torch.ones(2, 24), NVFP4, 1.0)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for fmt in (NVFP4, MXFP4):
        q = quantize(x, fmt, x.abs().max())
        blocks = q.view(8, -1, fmt.block.size)
        assert all(len(set(b.tolist())) <= 15 for b in blocks.reshape(-1, fmt.block.size))
        assert float((q - x).abs().max()) < float(x.abs().max()) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(5))
def test_abs_max_equals_max_of_abs(dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(37, 19, generator=generator) * 10 ** torch.randint(-3, 4, (37, 1), generator=generator)).to(dtype)
    x[0, :3] = torch.tensor([-0.0, 0.0, -1e-3])
    assert torch.equal(abs_max(x), x.abs().amax())
    for dim in (0, 1, -1):
        assert torch.equal(abs_max(x, dim=dim), x.abs().amax(dim=dim))


def test_abs_max_propagates_nan_and_inf():
    x = torch.ones(4, 3, dtype=torch.bfloat16)
    x[1, 2] = -float("inf")
    assert abs_max(x) == float("inf") and abs_max(x, dim=0).tolist() == [1, 1, float("inf")]
    x[2, 0] = float("nan")
    assert torch.isnan(abs_max(x)) and torch.isnan(abs_max(x, dim=0)[0]) and abs_max(x, dim=1)[0] == 1
