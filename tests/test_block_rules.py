"""The scale rules of block formats in the quantizer and the codes: the clipping multiplier of the dynamic block scale
and Four Over Six (4/6), against plain per-block loops in float64 written here."""

import math

import pytest
import torch

from quant_layers.codes import decode, encode
from quant_layers.formats import (E4M3FN, NVFP4_4OVER6_BLOCKS, NVFP4_BLOCKS, BlockScaling, fp_format, parse_format,
                                  with_blocks)
from quant_layers.quantize import quantize

NVFP4, MXFP4, MXFP8 = parse_format("NVFP4"), parse_format("MXFP4"), parse_format("MXFP8")
NVFP4_46 = parse_format("NVFP4_4OVER6")


# Plain-Python references (float64, one block at a time).

def _e4m3_values() -> list[float]:
    """The non-negative FP8 E4M3 values by code 0x00 .. 0x7E (0x7F is NaN), decoded by hand: subnormals m 2^-9."""
    values = []
    for code in range(0x7F):
        exponent, mantissa = divmod(code, 8)
        values.append(mantissa * 2.0**-9 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return values


E4M3_VALUES = _e4m3_values()
E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP FP4 magnitudes by code


def _nearest(value: float, grid: list[float]) -> float:
    """The grid magnitude nearest |value| (saturating at the top), ties to the even code, with value's sign."""
    magnitude = min(abs(value), grid[-1])
    index = min(range(len(grid)), key=lambda k: (abs(grid[k] - magnitude), k % 2))
    return math.copysign(grid[index], value)


def _f32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def nvfp4_block_by_hand(block: list[float], tensor_scale: float, clip: float = 1.0, maxima=(6.0,)
                        ) -> tuple[list[float], float]:
    """(values, E4M3 block scale) of one NVFP4 block: a = clip * amax; for each element maximum m the scale
    e4m3(a / (m t)), range R = 6 * scale * t, elements nearest E2M1 of x * 6 / R times R / 6 (0 when R = 0); of
    several maxima the one with the lowest squared error, ties to the first."""
    amax = max(abs(v) for v in block) * clip
    best = None
    for target in maxima:
        scale = _nearest(amax / (target * tensor_scale), E4M3_VALUES)
        block_range = 6 * scale * tensor_scale
        values = [0.0 if block_range == 0 else _nearest(v * 6 / block_range, E2M1_VALUES) * block_range / 6
                  for v in block]
        error = sum((q - v) ** 2 for q, v in zip(values, block))
        if best is None or error < best[0]:
            best = (error, values, scale)
    return best[1], best[2]


def mxfp4_block_by_hand(block: list[float], clip: float = 1.0) -> list[float]:
    """OCP MXFP4 with amax replaced by clip * amax: X = 2^(floor(log2 a) - 2) clamped to 2^-127 .. 2^127, elements
    nearest E2M1 of x / X (saturating) times X."""
    amax = max(abs(v) for v in block) * clip
    exponent = math.frexp(amax)[1] - 1 - 2 if amax > 0 else -127
    scale = 2.0 ** max(-127, min(127, exponent))
    return [_nearest(v / scale, E2M1_VALUES) * scale for v in block]


def _blocks_input(rows: int, width: int, size: int, seed: int) -> torch.Tensor:
    """Rows of blocks with maxima spread over 2^-6 .. 2^6, a zero block, and heavy-tailed values (outliers)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator) ** 3
    spread = torch.exp2(torch.randint(-6, 7, (rows, width // size, 1), generator=generator).float())
    x = (x.view(rows, -1, size) * spread).view(rows, width)
    x[0, :size] = 0.0
    return x


CLIPS = [0.55, 0.7, 0.8125, 0.9, 1.0]


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4, MXFP8, NVFP4_46, parse_format("E1M2/b16/e4m3")], ids=lambda f: f.name)
def test_clip_one_is_bit_identical(fmt):
    x = _blocks_input(5, 64, 32, 0)
    for max_value in (x.abs().max(), x.abs().amax(1, keepdim=True), torch.tensor(0.3)):
        plain = quantize(x, fmt, max_value)
        for clip in (1.0, torch.tensor(1.0), torch.ones(5, 1)):
            assert torch.equal(quantize(x, fmt, max_value, clip=clip).view(torch.int32), plain.view(torch.int32))


@pytest.mark.parametrize("clip", CLIPS)
def test_nvfp4_clip_equals_the_block_loop(clip):
    """Tensor scale t = 2^-3 exactly (max_value 6 * 448 / 8), so every scale and range is exact in both."""
    x = _blocks_input(6, 64, 16, 1)
    got = quantize(x, NVFP4, 6 * 448.0 / 8, clip=clip)
    encoded = encode(x, NVFP4, torch.tensor(6 * 448.0 / 8), clip=clip)
    for row in range(6):
        for start in range(0, 64, 16):
            block = x[row, start:start + 16].double().tolist()
            values, scale = nvfp4_block_by_hand(block, 2.0**-3, _f32(clip))
            assert got[row, start:start + 16].double().tolist() == values
            assert float(encoded.block_scale[row, start // 16].float()) == scale
    assert torch.equal(decode(encoded), got)


@pytest.mark.parametrize("clip", CLIPS)
def test_mxfp4_clip_equals_the_block_loop(clip):
    x = _blocks_input(6, 64, 32, 2)
    got = quantize(x, MXFP4, 1.0, clip=clip)
    for row in range(6):
        for start in range(0, 64, 32):
            block = x[row, start:start + 32].double().tolist()
            assert got[row, start:start + 32].double().tolist() == mxfp4_block_by_hand(block, _f32(clip))
    assert torch.equal(decode(encode(x, MXFP4, 1.0, clip=clip)), got)


def test_clip_shapes_candidates_and_refusals():
    x = _blocks_input(4, 32, 16, 3)
    clips = torch.tensor([0.6, 0.8, 1.0])
    for fmt in (NVFP4, MXFP4, NVFP4_46):
        max_value = x.abs().max()
        each = quantize(x, fmt, max_value, clip=clips.view(-1, 1, 1))
        assert each.shape == (3, 4, 32)
        for c in range(3):
            assert torch.equal(each[c], quantize(x, fmt, max_value, clip=clips[c]))
        rows = torch.tensor([[0.6], [0.8], [1.0], [0.7]])
        per_row = quantize(x, fmt, max_value, clip=rows)
        for r in range(4):
            assert torch.equal(per_row[r], quantize(x[r:r + 1], fmt, max_value, clip=rows[r, 0])[0])
        assert torch.equal(decode(encode(x, fmt, max_value, clip=rows)), per_row)
    with pytest.raises(ValueError, match="block-scaled"):
        quantize(x, fp_format(2, 1), 1.0, clip=0.9)
    with pytest.raises(ValueError, match="block_scale"):
        quantize(x, MXFP4, 1.0, torch.zeros(4, 1, dtype=torch.int32), clip=0.9)
    with pytest.raises(ValueError, match="per row"):
        quantize(x, NVFP4, 1.0, clip=torch.ones(32))


# Four Over Six.

def test_four_over_six_format_data():
    assert NVFP4_46.block == NVFP4_4OVER6_BLOCKS and NVFP4_46.name == "NVFP4_4OVER6"
    assert NVFP4_BLOCKS.scale_max(6.0) == 448.0 and NVFP4_4OVER6_BLOCKS.scale_max(6.0) == 256.0
    assert 256.0 * 6 / 4 <= 448.0 < 512.0 * 6 / 4  # the largest power of two whose 4-scaled block fits E4M3
    three = with_blocks(fp_format(2, 1), 16, "e4m3", (6.0, 3.0))
    assert three.block.scale_max(6.0) == 128.0 and parse_format(three.name) == three
    standard_spelled = with_blocks(fp_format(2, 1), 16, "e4m3", (6.0,))
    assert standard_spelled == NVFP4 and standard_spelled.name == "NVFP4"
    with pytest.raises(ValueError, match="exceed"):
        with_blocks(fp_format(2, 1), 16, "e4m3", (8.0, 6.0))
    with pytest.raises(ValueError, match="mantissa"):
        with_blocks(fp_format(2, 1), 32, "e8m0", (6.0, 4.0))
    with pytest.raises(ValueError, match="distinct"):
        BlockScaling(16, E4M3FN, True, (4.0, 4.0))


def test_standard_maxima_spelled_out_is_bit_identical_to_nvfp4():
    x = _blocks_input(6, 64, 16, 4)
    spelled = with_blocks(fp_format(2, 1), 16, "e4m3", (6.0,))
    for max_value in (x.abs().max(), x.abs().amax(1, keepdim=True)):
        assert torch.equal(quantize(x, spelled, max_value).view(torch.int32),
                           quantize(x, NVFP4, max_value).view(torch.int32))
    assert spelled.block.scale_max(6.0) == 448.0


@pytest.mark.parametrize("seed", range(3))
def test_four_over_six_equals_the_block_loop(seed):
    """Each block against both choices by hand; t = 2^-2 exactly (max_value 6 * 256 / 4). Both choices occur."""
    x = _blocks_input(8, 64, 16, 10 + seed)
    got = quantize(x, NVFP4_46, 6 * 256.0 / 4)
    encoded = encode(x, NVFP4_46, 6 * 256.0 / 4)
    fours = 0
    for row in range(8):
        for start in range(0, 64, 16):
            block = x[row, start:start + 16].double().tolist()
            values, scale = nvfp4_block_by_hand(block, 2.0**-2, maxima=(6.0, 4.0))
            assert got[row, start:start + 16].double().tolist() == values
            assert float(encoded.block_scale[row, start // 16].float()) == scale
            six, _ = nvfp4_block_by_hand(block, 2.0**-2)
            fours += values != six
    assert 0 < fours < 8 * 4
    assert torch.equal(decode(encoded), got)
    with_clip = quantize(x, NVFP4_46, 6 * 256.0 / 4, clip=0.75)
    for row in range(8):
        block = x[row, :16].double().tolist()
        assert with_clip[row, :16].double().tolist() == nvfp4_block_by_hand(block, 2.0**-2, 0.75, (6.0, 4.0))[0]


def test_four_over_six_never_overflows_e4m3():
    """A block holding the tensor's max whose values are exact on the 4-scaled grid: the 4-scale amax / (4 t) =
    1.5 * 256 = 384 fits E4M3, so the block is reproduced (with t from 448 it would be 672 and saturate to 448)."""
    amax = 3.7
    pattern = torch.tensor([1.0, -0.75, 0.5, 0.375, -0.25, 0.125] + [0.0] * 10)
    x = torch.cat([pattern * amax, torch.randn(16, generator=torch.Generator().manual_seed(0))]).view(1, 32)
    encoded = encode(x, NVFP4_46, amax)
    assert float(encoded.block_scale[0, 0].float()) == 384.0
    assert torch.isfinite(encoded.block_scale.float()).all() and encoded.block_scale.float().max() <= 448
    torch.testing.assert_close(quantize(x, NVFP4_46, amax)[0, :16], x[0, :16], rtol=1e-6, atol=0)
    mse_46 = (quantize(x, NVFP4_46, amax) - x)[0, :16].square().sum()
    mse_6 = (quantize(x, NVFP4, amax) - x)[0, :16].square().sum()
    assert mse_46 < mse_6
