"""Codes and scales (quant_layers/codes.py): decode(encode(x)) equals quantize(x) bit for bit for every format, the
code tables against plain-Python decodes and torch's float8 bytes, FPQ weights against QuantLinear, nibble packing,
and the integer view of an E2M1 matmul (issue 21, items 1 and 5)."""

import math

import pytest
import torch
from torch import nn

from quant_layers.codes import (E8M0_NAN, code_table, decode, decode_fpq_weight, encode, encode_fpq_weight,
                                encode_quantized, pack_nibbles, stored_bits, unpack_nibbles)
from quant_layers.formats import (E4M3FN, QuantFormat, formats_of_width, fp_format, int_format,
                                  max_from_exponent_bias, parse_format)
from quant_layers.modules import QuantLinear, QuantParams
from quant_layers.quantize import quantize

E2M1 = fp_format(2, 1)
NVFP4, MXFP4 = parse_format("NVFP4"), parse_format("MXFP4")
OCP_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP FP4 (bias 1) by magnitude code, from the spec's table


def decode_by_hand(fmt: QuantFormat, code: int) -> float:
    """One code's standard-grid value (exponent bias 0), plain Python: FP sign-magnitude [s][E][M], exponent field 0
    the subnormals m 2^(1-M), else 2^e (1 + m / 2^M), the top nan_codes magnitudes NaN; INT two's complement."""
    if fmt.kind == "int":
        return float(code - 2**fmt.bits if code >= 2 ** (fmt.bits - 1) else code)
    magnitude_bits = fmt.bits - fmt.signed
    sign = -1.0 if fmt.signed and code >> magnitude_bits else 1.0
    magnitude = code % 2**magnitude_bits
    if magnitude >= 2**magnitude_bits - fmt.nan_codes:
        return math.nan
    exponent, mantissa = divmod(magnitude, 2**fmt.mantissa_bits)
    if exponent == 0:
        return sign * mantissa * 2.0 ** (1 - fmt.mantissa_bits)
    return sign * 2.0**exponent * (1 + mantissa / 2**fmt.mantissa_bits)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype and bits, with a zero of either sign counted as +0 (x + 0.0 maps -0.0 to +0.0, nothing else)."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal((a + 0.0).view(as_int), (b + 0.0).view(as_int))


TABLE_FORMATS = [*formats_of_width(4), fp_format(4, 3), fp_format(5, 2), fp_format(3, 4), E4M3FN, fp_format(7, 0),
                 QuantFormat("fp", 4, 2, signed=False), int_format(4), int_format(8), fp_format(2, 9)]


@pytest.mark.parametrize("fmt", TABLE_FORMATS, ids=lambda f: f.name)
def test_code_table_matches_plain_python_decode(fmt):
    table = code_table(fmt)
    expected = torch.tensor([decode_by_hand(fmt, code) for code in range(2**fmt.bits)], dtype=torch.float64)
    assert table.dtype == torch.float32 and len(table) == 2**fmt.bits
    torch.testing.assert_close(table.double(), expected, rtol=0, atol=0, equal_nan=True)
    if fmt.kind == "fp" and fmt.signed:
        assert torch.signbit(table[2 ** (fmt.bits - 1)])  # the -0 code decodes to -0.0; encode never writes it


def test_e2m1_codes_are_ocp_fp4_codes_and_e4m3_codes_are_float8_bytes():
    """The bias-0 grid is 2^b times the grid of bias b: E2M1's table is twice OCP FP4 (bias 1), code for code;
    E4M3FN's table times 2^-7 is torch's float8_e4m3fn decode of the same byte (NaN bytes included)."""
    assert code_table(E2M1).tolist() == [2 * v for v in OCP_E2M1] + [-2 * v for v in OCP_E2M1]
    fp8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    torch.testing.assert_close(code_table(E4M3FN) * 2.0**-7, fp8, rtol=0, atol=0, equal_nan=True)


def _test_input(shape, max_value, dtype, generator):
    """Random values around the range, plus zeros, -0.0, values that round to +-0, and saturating ones."""
    x = torch.randn(shape, generator=generator) * max_value / 2
    flat = x.view(-1)
    top = float(torch.as_tensor(max_value).max())
    flat[:8] = torch.tensor([0.0, -0.0, 1e-7 * top, -1e-7 * top, 3 * top, -3 * top, top, -top])
    return x.to(dtype)


def _random_range(fmt, shape, generator):
    """Per-row / per-column ranges from random real-valued exponent biases (INT, blocks: random positive ranges)."""
    if fmt.kind == "fp" and fmt.block is None:
        bias = torch.rand(shape, generator=generator) * 6 - 2 + fmt.standard_bias
        return max_from_exponent_bias(fmt, bias)
    return torch.rand(shape, generator=generator) * 4 + 0.1


ELEMENT_FORMATS = [*formats_of_width(4), fp_format(4, 3), fp_format(5, 2), fp_format(2, 3), fp_format(7, 0),
                   QuantFormat("fp", 4, 2, signed=False), int_format(4), int_format(8), fp_format(3, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranges", ["tensor", "row", "column"])
@pytest.mark.parametrize("fmt", ELEMENT_FORMATS, ids=lambda f: f.name)
def test_decode_of_encode_is_quantize(fmt, ranges, dtype):
    generator = torch.Generator().manual_seed(fmt.bits * 10 + fmt.exponent_bits)
    shape = {"tensor": (), "row": (12, 1), "column": (40,)}[ranges]
    max_value = _random_range(fmt, shape, generator)
    x = _test_input((12, 40), max_value, dtype, generator)
    encoded = encode(x, fmt, max_value)
    q = quantize(x, fmt, max_value)
    assert encoded.codes.shape == x.shape and encoded.grid_inverse.shape == max_value.shape
    assert encoded.codes.dtype == (torch.uint8 if fmt.bits <= 8 else torch.int32)
    assert same_bits(decode(encoded), q) and torch.equal(decode(encoded), q)


@pytest.mark.parametrize("fmt", [NVFP4, parse_format("NVFP4_4OVER6")], ids=lambda f: f.name)
def test_explicit_block_scales_encode_under_every_block_maximum_rule(fmt):
    """A searched weight's explicit block ranges R = top * code * t (random E4M3 codes, including 0 and subnormals):
    encode takes each block's byte from R itself, also under Four Over Six (whose data-driven choice between 6 and 4
    needs the blocks and does not apply to given ranges); decode equals quantize with those ranges, bit for bit."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 64, generator=generator) * 3
    max_value = x.abs().amax() * 0.9
    top = fmt.standard_max
    tensor_scale = max_value.clamp(min=1e-30) / (top * fmt.block.scale_max(top))
    code_bytes = torch.randint(0, 0x7F, (4, 4), generator=generator, dtype=torch.uint8)
    codes = code_bytes.view(torch.float8_e4m3fn).float()
    ranges = top * codes * tensor_scale
    want = quantize(x, fmt, max_value, block_scale=ranges)
    encoded = encode(x, fmt, max_value, block_scale=ranges)
    assert torch.equal(encoded.block_scale.view(torch.uint8), code_bytes)
    assert same_bits(decode(encoded), want)
    assert same_bits(decode(encode_quantized(want, fmt, max_value, ranges)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranges", ["tensor", "row"])
@pytest.mark.parametrize("fmt", [NVFP4, MXFP4, parse_format("MXFP8"), parse_format("INT8/b32/e8m0"),
                                 parse_format("E1M2/b16/e4m3"), parse_format("NVFP4_4OVER6"),
                                 parse_format("E2M1/b16/e4m3/max6,3,1.5")], ids=lambda f: f.name)
def test_block_formats_decode_of_encode_is_quantize(fmt, ranges, dtype):
    """Rows of blocks with amax spread over 2^-20 .. 2^20 (MX exponents, E4M3 subnormal and zero block scales)."""
    generator = torch.Generator().manual_seed(fmt.block.size)
    x = torch.randn(6, 128, generator=generator)
    x = x * torch.exp2(torch.randint(-20, 21, (6, 128 // fmt.block.size, 1), generator=generator)).repeat_interleave(
        fmt.block.size, 1).view(6, 128)
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0])
    x[1, : fmt.block.size] = 0.0
    amax = x.abs().amax(1, keepdim=True)
    max_value = amax.max() * 0.8 if ranges == "tensor" else amax * _random_range(fmt, (6, 1), generator) / 4
    x = x.to(dtype)
    encoded = encode(x, fmt, max_value)
    q = quantize(x, fmt, max_value)
    blocks = 128 // fmt.block.size
    if fmt.block.power_of_two:
        assert encoded.block_exponent.shape == (6, blocks) and encoded.block_exponent.dtype == torch.uint8
    else:
        assert encoded.block_scale.shape == (6, blocks) and encoded.block_scale.dtype == torch.float8_e4m3fn
        assert encoded.tensor_scale.shape == max_value.shape and encoded.tensor_scale.dtype == torch.float32
    assert same_bits(decode(encoded), q) and torch.equal(decode(encoded), q)


@pytest.mark.parametrize("fmt", [*formats_of_width(4), fp_format(3, 2), fp_format(1, 4), int_format(4)],
                         ids=lambda f: f.name)
def test_exact_ties_encode_to_the_even_neighbour(fmt):
    """With a power-of-two range the midpoints of neighbouring grid values are exact ties (few significant bits):
    encode gives quantize's value, and for M >= 1 (and INT) the even code (ties to even); E3M0 ties go up."""
    max_value = fmt.grid_max * 2.0**-3  # u = 2^-3
    positive = sorted({v for v in code_table(fmt).tolist() if v >= 0})
    middles = torch.tensor([(a + b) / 2 * 2.0**-3 for a, b in zip(positive, positive[1:])])
    x = torch.cat([middles, -middles])
    encoded = encode(x, fmt, max_value)
    assert same_bits(decode(encoded), quantize(x, fmt, max_value))
    if fmt.kind == "int" or fmt.mantissa_bits >= 1:
        assert all(code % 2 == 0 for code in encoded.codes.tolist())


@pytest.mark.parametrize("fmt", [E2M1, int_format(4), NVFP4, MXFP4], ids=lambda f: f.name)
def test_negative_zero_gets_the_positive_zero_code(fmt):
    """-0.0 and negative values that round to zero: quantize gives -0.0, encode the +0 code 0, decode +0.0 (equal
    as numbers; the only bits that differ are the sign of zero)."""
    x = torch.zeros(2, 32)
    x[0, :5] = torch.tensor([-0.0, -1e-6, 0.0, 1e-6, 6.0])  # 6.0: the block's scale is not zero
    q = quantize(x, fmt, 6.0)
    encoded = encode(x, fmt, 6.0)
    assert torch.signbit(q[0, :2]).all() and q[0, :2].tolist() == [0.0, 0.0]
    assert encoded.codes[0, :4].tolist() == [0] * 4 and encoded.codes[1].tolist() == [0] * 32
    assert not torch.signbit(decode(encoded)).any()
    assert torch.equal(decode(encoded), q) and same_bits(decode(encoded), q)


def test_nvfp4_block_scale_bytes_are_torch_float8_casts():
    """The stored block scale is the FP8 E4M3 byte of amax / (6 t) rounded to nearest, t = max / (6 * 448): checked
    against torch's float8_e4m3fn cast (the outside oracle), subnormal and zero scales included."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 256, generator=generator) * torch.exp2(torch.randint(-14, 4, (8, 1), generator=generator))
    x[7] *= 2.0**-20  # block scales that round to zero
    max_value = torch.tensor(7.25)
    encoded = encode(x, NVFP4, max_value)
    tensor_scale = max_value / (6.0 * 448.0)
    amax = x.view(8, 16, 16).abs().amax(-1)
    expected = (amax / (6.0 * tensor_scale)).clamp(max=448.0).to(torch.float8_e4m3fn)
    assert torch.equal(encoded.tensor_scale, tensor_scale)
    assert torch.equal(encoded.block_scale.view(torch.uint8), expected.view(torch.uint8))
    assert (encoded.block_scale.float() == 0).any() and (encoded.block_scale.float() < 2.0**-6).any()  # zero, sub


def test_mx_block_exponent_bytes_by_hand():
    """E8M0 byte = biased exponent: amax 5 -> 2^(2 - 2) -> 127; 0.3 -> 2^(-2 - 2) -> 123; 5 * 2^100 -> 227;
    1e-40 -> clamped to 2^-127 -> 0; a block holding NaN -> 255, which decodes to a NaN block as quantize gives."""
    x = torch.zeros(5, 32)
    x[:, 0] = torch.tensor([5.0, 0.3, 5.0 * 2.0**100, 1e-40, 1.0])
    x[4, 1] = float("nan")
    encoded = encode(x, MXFP4, 1.0)
    assert encoded.block_exponent.view(-1).tolist() == [127, 123, 227, 0, E8M0_NAN]
    assert [2.0 ** (b - 127) for b in encoded.block_exponent.view(-1).tolist()[:4]] == [1.0, 2.0**-4, 2.0**100,
                                                                                         2.0**-127]
    assert torch.isnan(decode(encoded)[4]).all()
    torch.testing.assert_close(decode(encoded), quantize(x, MXFP4, 1.0), rtol=0, atol=0, equal_nan=True)


def test_pack_nibbles_by_hand_and_round_trip():
    """Low nibble first: codes [1, 2, 15, 0, 8, 7] -> bytes [0x21, 0x0F, 0x78]."""
    codes = torch.tensor([1, 2, 15, 0, 8, 7], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [0x21, 0x0F, 0x78]
    random = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(random)
    assert packed.shape == (3, 5, 32) and torch.equal(unpack_nibbles(packed), random)
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(codes[:5])
    with pytest.raises(ValueError, match="0..15"):
        pack_nibbles(torch.tensor([16, 0], dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [E2M1, fp_format(1, 2), fp_format(3, 0)], ids=lambda f: f.name)
def test_fpq_weight_decodes_to_the_quantlinear_weight(fmt, dtype):
    """decode_fpq_weight = QuantLinear's folded weight Q_w(W) 2^-k bit for bit; decode alone = Q_w(W), unfolded."""
    torch.manual_seed(4)
    linear = nn.Linear(48, 24).to(dtype)
    weight_max = linear.weight.float().abs().amax(1) * (0.5 + torch.rand(24))
    shift = torch.randint(0, 5, (48,))
    module = QuantLinear(linear)
    module.set_quant_params(QuantParams(fmt, weight_max, fmt, torch.tensor(2.5), shift))
    encoded = encode_fpq_weight(linear.weight.detach(), fmt, weight_max, shift)
    assert encoded.channel_shift.dtype == torch.int8 and encoded.grid_inverse.shape == (24, 1)
    assert same_bits(decode_fpq_weight(encoded), module.weight.detach())
    assert same_bits(decode(encoded), quantize(linear.weight.detach(), fmt, weight_max.view(-1, 1)))


def test_folded_weight_is_off_the_rows_grid():
    """Why the codes are stored unfolded: W_fold = Q_w(W) 2^-k is not on its row's grid (E2M1 with k up to 3: the
    row's grid no longer holds it, and a row takes more than 15 values), while codes + k give it back exactly."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 64, generator=generator)
    weight_max = weight.abs().amax(1)
    shift = torch.randint(0, 4, (64,), generator=generator)
    encoded = encode_fpq_weight(weight, E2M1, weight_max, shift)
    folded = decode_fpq_weight(encoded)
    assert not torch.equal(quantize(folded, E2M1, weight_max.view(-1, 1)), folded)
    assert max(len(set(row.tolist())) for row in folded) > 15
    assert torch.equal(folded, quantize(weight, E2M1, weight_max.view(-1, 1)) * torch.exp2(-shift.float()))


FOUR_BIT = [*formats_of_width(4), int_format(4), NVFP4, MXFP4]


@pytest.mark.parametrize("fmt", FOUR_BIT, ids=lambda f: f.name)
def test_at_most_15_codes_per_scale_group(fmt):
    """16 codes minus the duplicate zero: per tensor, per row and per block, 0b1000 (-0, or INT4's -8) never
    appears; dense inputs reach all 15 codes of a per-tensor / per-row group."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(8, 512, generator=generator) * torch.exp2(torch.rand(8, 512, generator=generator) * 12 - 8)
    max_value = x.abs().amax(1, keepdim=True) * 0.5
    x[:, :256] = torch.linspace(-1, 1, 256) * max_value  # a dense ramp over each row's range
    x.view(-1)[:2] = torch.tensor([-0.0, -1e-9])
    groups = encode(x, fmt, max_value).codes.view(-1, fmt.block.size) if fmt.block else encode(x, fmt, max_value).codes
    assert all(len(set(group.tolist())) <= 15 and 0b1000 not in group.tolist() for group in groups)
    if fmt.block is None:
        assert len(set(encode(x, fmt, max_value.max()).codes.view(-1).tolist())) == 15
        assert all(len(set(group.tolist())) == 15 for group in groups)


def _scale_with_bits(significant_bits: int, exponent: int) -> float:
    """A positive number with exactly `significant_bits` significant bits, all ones: (2^b - 1) 2^(exponent - b)."""
    return (2**significant_bits - 1) * 2.0 ** (exponent - significant_bits)


def _integer_view(encoded) -> torch.Tensor:
    """E2M1 codes as int32 integers 2 x (OCP FP4 value) in -12..12, from the spec's table (not code_table)."""
    magnitude = torch.tensor([int(2 * v) for v in OCP_E2M1], dtype=torch.int32)
    codes = encoded.codes.long()
    return torch.where(codes >= 8, -magnitude[codes % 8], magnitude[codes % 8])


@pytest.mark.parametrize("dtype,significant_bits,exact", [(torch.float32, 18, True), (torch.bfloat16, 6, True),
                                                         (torch.bfloat16, 7, False)])
def test_integer_matmul_equals_the_simulated_matmul(dtype, significant_bits, exact):
    """E2M1 on both sides, per-tensor activation range, per-row weight ranges: v = 2 x (OCP value), |v| <= 12,
    multiplied in int32 (exact: |sum| <= 144 * 256 < 2^31), then scaled by (s_a s_w[row]) / 4 with s = max / 6,
    equals Q_a(X) @ Q_w(W)^T computed in float64 from the simulated tensors, exactly. float64 is exact here: every
    product is an integer (<= 144) times u_a u_w (at most 2b <= 36 significant bits), so every partial sum is an
    integer below 144 * 256 < 2^16 times u_a u_w: at most 16 + 36 <= 53 bits, in any summation order.

    Exact only when every simulated value g u (g on the bias-0 grid, u = max / 12) is a number of the simulation's
    dtype (test_simulated_values_are_grid_times_scale_only_for_short_scales): here u has b significant bits (all
    ones); in bfloat16, b = 7 gives bf16(3u) != 3u and the integer view differs from the simulation."""
    generator = torch.Generator().manual_seed(significant_bits)
    act_u = _scale_with_bits(significant_bits, -1)
    weight_u = torch.tensor([_scale_with_bits(significant_bits, int(e)) for e in torch.randint(-6, -2, (32,),
                                                                                               generator=generator)])
    act_max, weight_max = torch.tensor(12 * act_u), (12 * weight_u).float()  # 12 u: exact (b + 2 bits <= 24 bits)
    x = (torch.randn(64, 256, generator=generator) * act_u * 6).to(dtype)
    weight = (torch.randn(32, 256, generator=generator) * weight_u.view(-1, 1) * 6).to(dtype)
    act, weight_codes = encode(x, E2M1, act_max), encode(weight, E2M1, weight_max.view(-1, 1))
    accumulated = _integer_view(act).to(torch.int32) @ _integer_view(weight_codes).to(torch.int32).T
    assert accumulated.dtype == torch.int32
    act_scale, weight_scale = 2 * act.grid_inverse.double(), 2 * weight_codes.grid_inverse.double().view(1, -1)
    integer_view = accumulated.double() * (act_scale * weight_scale) / 4  # s = max / 6: OCP value x s
    simulated = quantize(x, E2M1, act_max).double() @ quantize(weight, E2M1, weight_max.view(-1, 1)).double().T
    scales = [float(act.grid_inverse), *weight_codes.grid_inverse.view(-1).tolist()]
    representable = all(float(torch.tensor(g * u, dtype=torch.float64).to(dtype)) == g * u
                        for g in code_table(E2M1).tolist() for u in scales)
    assert representable == exact
    assert torch.equal(integer_view, simulated) == exact
    if not exact:
        assert float(((integer_view - simulated) / simulated.abs().max()).abs().max()) < 2.0**-6


@pytest.mark.parametrize("dtype,max_value,exact", [
    (torch.float32, 12 * _scale_with_bits(22, 0), True), (torch.float32, 1.0, False),
    (torch.bfloat16, 12 * _scale_with_bits(6, 0), True), (torch.bfloat16, 12 * _scale_with_bits(7, 0), False)])
def test_simulated_values_are_grid_times_scale_only_for_short_scales(dtype, max_value, exact):
    """quantize's values are g u rounded to float32 (then to x's dtype), g on the bias-0 grid, u = max / 12. g <= 12
    = 3 * 2^2 adds at most 2 bits to u's significand: exact for u with at most 22 significant bits in float32 and 6
    in bfloat16 (all-ones significands at the bound); u = fl32(1 / 12) (max 1) or 7 bits in bfloat16 are rounded."""
    u = float(encode(torch.zeros(1), E2M1, max_value).grid_inverse)
    grid = code_table(E2M1).double()
    decoded = decode(encode((grid * u).to(dtype), E2M1, max_value)).double()
    assert torch.equal(decoded, grid * u) == exact


def test_integer_matmul_with_fpq_shifts():
    """With shifts k the weight W_fold = Q_w(W) 2^-k is not an integer grid: the integer view keeps the unfolded
    weight codes and shifts the activation integers left by K - k (K = max k), accumulates in int32 and applies
    u_a u_w 2^-K after. Equals the QuantLinear's Q_a(x 2^k) @ W_fold^T in float64, exactly (products <= 144 * 2^K,
    sums below 2^19; times 32-bit u_a u_w: <= 51 bits)."""
    generator = torch.Generator().manual_seed(7)
    act_max = torch.tensor(12 * _scale_with_bits(16, 0))
    weight_max = (12 * torch.tensor([_scale_with_bits(16, -3 - i % 3) for i in range(32)])).float()
    shift = torch.randint(0, 4, (256,), generator=generator)
    x = torch.randn(64, 256, generator=generator) * torch.exp2(-shift.float())
    linear = nn.Linear(256, 32, bias=False)
    weight = encode_fpq_weight(linear.weight.detach().clone(), E2M1, weight_max, shift)  # codes of Q_w(W), unfolded
    module = QuantLinear(linear)
    module.set_quant_params(QuantParams(E2M1, weight_max, E2M1, act_max, shift))
    act = encode(x * torch.exp2(shift.float()), E2M1, act_max)  # what quantize_input quantizes
    top = int(shift.max())
    act_int = _integer_view(act).to(torch.int32) << (top - shift).to(torch.int32)
    accumulated = act_int @ _integer_view(weight).to(torch.int32).T
    integer_view = accumulated.double() * (act.grid_inverse.double() * weight.grid_inverse.double().view(1, -1)) \
        * 2.0**-top
    simulated = module.quantize_input(x).double() @ module.weight.detach().double().T
    assert torch.equal(integer_view, simulated)
    assert torch.equal(decode_fpq_weight(weight), module.weight.detach())


def test_quantized_activations_show_more_than_15_values_before_the_shift_is_folded():
    """Per-tensor E2M1 with shifts k in {0, 1, 2}: Q(x 2^k) holds 15 values; Q(x 2^k) 2^-k (the explicit
    per-column view, x's quantized values) holds the union of the three shifted grids: 23 values (11 positive
    magnitudes, counted here in plain Python), at most 15 x 3."""
    shift = torch.tensor([0, 1, 2])
    x = torch.linspace(-7, 7, 4001).view(-1, 1) * torch.exp2(-shift.float())
    on_grid = quantize(x * torch.exp2(shift.float()), E2M1, 6.0)
    per_column_view = on_grid * torch.exp2(-shift.float())
    shifted_grids = {g * 2.0**-k for g in OCP_E2M1 if g > 0 for k in (0, 1, 2)}
    assert len(set(on_grid.view(-1).tolist())) == 15
    assert len(set(per_column_view.view(-1).tolist())) == 2 * len(shifted_grids) + 1 == 23 <= 15 * 3


def test_accumulator_width_and_stored_bits():
    """int32 holds (2^31 - 1) // 12^2 = 14913080 worst-case E2M1 x2 products, 1864135 with activation integers
    shifted left by K = 3 (test_integer_matmul_with_fpq_shifts). Stored bits of a [64, 256] tensor:
    E2M1 per row 4 + 32/256, FPQ + 8/64 (int8 shift per column), NVFP4 4 + 8/16 + 32/16384, MXFP4 4 + 8/32."""
    largest = int(code_table(E2M1).abs().max())
    assert largest == 12 and (2**31 - 1) // largest**2 == 14913080 and (2**31 - 1) // (largest**2 * 2**3) == 1864135
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(8))
    row_max = x.abs().amax(1)
    per_value = {
        "E2M1": stored_bits(encode(x, E2M1, row_max.view(-1, 1))) / x.numel(),
        "FPQ": stored_bits(encode_fpq_weight(x, E2M1, row_max, torch.zeros(256, dtype=torch.int8))) / x.numel(),
        "NVFP4": stored_bits(encode(x, NVFP4, row_max.max())) / x.numel(),
        "MXFP4": stored_bits(encode(x, MXFP4, 1.0)) / x.numel(),
        "INT8": stored_bits(encode(x, int_format(8), row_max.view(-1, 1))) / x.numel(),
    }
    assert per_value == {"E2M1": 4 + 32 / 256, "FPQ": 4 + 32 / 256 + 8 / 64, "NVFP4": 4 + 8 / 16 + 32 / 16384,
                         "MXFP4": 4 + 8 / 32, "INT8": 8 + 32 / 256}


def test_encode_rejects_what_it_cannot_store():
    with pytest.raises(ValueError, match="NaN"):
        encode(torch.tensor([1.0, float("nan")]), E2M1, 6.0)
    with pytest.raises(ValueError, match="enlarging"):
        encode(torch.ones(4), E2M1, torch.ones(3, 1))
    with pytest.raises(ValueError, match="per row"):
        encode(torch.ones(2, 32), NVFP4, torch.ones(32))
    with pytest.raises(ValueError, match="multiple of 16"):
        encode(torch.ones(2, 24), NVFP4, 1.0)
    with pytest.raises(TypeError):
        encode(torch.ones(4, dtype=torch.int32), E2M1, 6.0)
    with pytest.raises(ValueError, match="exponent bits"):
        encode(torch.ones(4), fp_format(8, 3), 1.0)
    with pytest.raises(ValueError, match="integers"):
        encode_fpq_weight(torch.ones(2, 4), E2M1, torch.ones(2), torch.tensor([0.5, 0, 0, 0]))
    with pytest.raises(ValueError, match="channel_shift"):
        decode_fpq_weight(encode(torch.ones(2, 4), E2M1, 6.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_frozen_codes_on_cuda_equal_cpu():
    """encode_frozen on CUDA tensors (a CPU constant once broke it there) gives the CPU codes."""
    from quant_layers.codes import encode_frozen
    from quant_layers.quantize import quantize

    fmt = fp_format(2, 1)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    max_value = x.abs().amax(1, keepdim=True)
    values = quantize(x, fmt, max_value)
    cpu = encode_frozen(values, fmt, max_value, None)
    assert torch.equal(encode_frozen(values.cuda(), fmt, max_value.cuda(), None).cpu(), cpu)
@pytest.mark.parametrize("fmt", [NVFP4, MXFP4], ids=lambda f: f.name)
def test_explicit_block_scales_decode_to_quantize_with_them(fmt):
    """encode(x, fmt, m, block_scale) = quantize(x, fmt, m, block_scale) for scales other than the data's (a block-
    scale search's choice: MX exponents one step off, NVFP4 ranges of the E4M3 codes one below and above)."""
    from quant_layers.quantize import block_range, block_scale_codes, block_scales

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4 * fmt.block.size, generator=generator)  # 4 blocks per row
    max_value = x.abs().amax(1, keepdim=True)
    amax = x.reshape(4, -1, fmt.block.size).abs().amax(-1, keepdim=True)
    if fmt.block.power_of_two:
        scales = block_scales(amax, fmt, max_value.unsqueeze(-1)).squeeze(-1) + torch.tensor([-1, 0, 1, 2])
    else:
        code, t = block_scale_codes(amax, fmt, max_value.unsqueeze(-1))
        nudged = (code * torch.tensor([0.875, 1.0, 1.125, 0.5]).view(1, -1, 1)).to(torch.float8_e4m3fn).float()
        scales = block_range(fmt, nudged, t).squeeze(-1)
    q = quantize(x, fmt, max_value, scales)
    assert not torch.equal(q, quantize(x, fmt, max_value))
    assert torch.equal(decode(encode(x, fmt, max_value, scales)), q)
    assert torch.equal(decode(encode_quantized(q, fmt, max_value, scales)), q)
    if not fmt.block.power_of_two:
        with pytest.raises(ValueError, match="top \\* code \\* t"):
            encode(x, fmt, max_value, scales * 1.01)


def test_nvfp4_scales_come_back_from_the_quantized_tensor():
    """Only q = quantize(x) is at hand (a model's weight). A block with amax / (6 t) = 0.55 2^-9 gets the E4M3
    subnormal scale 2^-9 and quantizes to maximum 3 2^-9, whose own scale 0.5 2^-9 rounds (ties to even) to 0:
    encode(q) loses it, encode_quantized finds 2^-9 again. MX exponents come back from q's own maxima (blocks that
    quantize to all zeros aside)."""
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 16] = 6 * 0.55 * 2**-9, 2688.0  # t = 2688 / (6 * 448) = 1
    x[1] = torch.randn(32, generator=torch.Generator().manual_seed(0))
    max_value = torch.tensor([[2688.0], [3.0]])
    q = quantize(x, NVFP4, max_value)
    assert q[0, 0] == 3 * 2**-9
    assert not torch.equal(decode(encode(q, NVFP4, max_value)), q)
    encoded = encode_quantized(q, NVFP4, max_value)
    assert torch.equal(decode(encoded), q) and encoded.block_scale[0, 0].float() == 2**-9
    assert torch.equal(encoded.block_scale[1], encode(x, NVFP4, max_value).block_scale[1])
    spread = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-40, 30, 8).view(-1, 1)
    q = quantize(spread, MXFP4, 1.0)
    encoded = encode_quantized(q, MXFP4, 1.0)
    nonzero = q.reshape(8, 2, 32).abs().amax(-1) > 0  # an all-zero block decodes to zeros under any exponent
    assert torch.equal(decode(encoded), q) and not nonzero.all()
    assert torch.equal(encoded.block_exponent[nonzero], encode(spread, MXFP4, 1.0).block_exponent[nonzero])
    with pytest.raises(ValueError, match="has no code"):
        encode_quantized(torch.tensor([[0.7]]), E2M1, torch.tensor([[6.0]]))
