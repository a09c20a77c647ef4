"""Explicit block scales in the quantizer, BlockScaleStep's search (utils/search/block_scales.py) against brute force,
and their parameter-file round trip."""

import dataclasses

import pytest
import torch
from torch import nn

from quant_layers.formats import BLOCK_ALIASES, fp_format, with_blocks
from quant_layers.modules import QuantLinear, QuantParams
from quant_layers.quantize import block_scales, quantize
from utils.params import apply_params, load_params, save_params
from utils.search.block_scales import BlockScaleStep, local_block_losses, scale_format_values
from utils.search.problem import Budget, LinearProblem
from utils.search.steps import minmax_state

NVFP4, MXFP4 = BLOCK_ALIASES["NVFP4"], BLOCK_ALIASES["MXFP4"]
E3M2_MX = with_blocks(fp_format(3, 2), 32, "e8m0")


def _data_scales(x, fmt, max_value):
    blocks = x.float().reshape(*x.shape[:-1], -1, fmt.block.size)
    mv = max_value.unsqueeze(-1) if isinstance(max_value, torch.Tensor) and max_value.dim() else max_value
    return block_scales(blocks.abs().amax(-1, keepdim=True), fmt, mv).squeeze(-1)


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4, E3M2_MX])
def test_explicit_data_scales_equal_implicit(fmt):
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.logspace(-3, 2, 6).view(-1, 1)
    x[0, :16] = 0.0
    max_value = x.abs().amax(1, keepdim=True)
    scales = _data_scales(x, fmt, max_value)
    assert torch.equal(quantize(x, fmt, max_value, scales), quantize(x, fmt, max_value))
    if fmt.block.power_of_two:  # the file's int16 encoding gives the same result
        assert torch.equal(quantize(x, fmt, max_value, scales.to(torch.int16)), quantize(x, fmt, max_value))
    # candidates: a leading dimension of block scales gives one result each
    both = quantize(x, fmt, max_value, torch.stack([scales, scales]))
    assert torch.equal(both[1], quantize(x, fmt, max_value))


def test_scale_format_values_are_e4m3fn():
    values = scale_format_values(NVFP4.block.scale_format)
    assert values.numel() == 127 and values[-1] == 448 and values[1] == 2.0**-9
    assert torch.equal(values, values.to(torch.float8_e4m3fn).float())


def _problem(fmt, seed, tokens=96, out=5, width=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g) * (1 + 3 * torch.rand(width, generator=g))
    w = torch.randn(out, width, generator=g) * 0.1
    return LinearProblem(x, w, Budget(1 << 14)), x, w  # small budget: several chunks


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4])
def test_local_search_equals_brute_force(fmt):
    problem, x, w = _problem(fmt, 1)
    state = minmax_state(problem, fmt, fmt)
    step = BlockScaleStep(codes_below=3, codes_above=2)
    cands, _ = step.candidates(fmt, w.float(), state.weight_max_value)
    fast = local_block_losses(problem, state, cands, problem.weight.float())
    xq = quantize(x.float(), fmt, state.act_max_value).double()
    gram = xq.T @ xq
    size = fmt.block.size
    for o in range(w.shape[0]):
        for j in range(w.shape[1] // size):
            cols = slice(j * size, (j + 1) * size)
            losses = []
            for c in range(cands.shape[0]):
                scales = _data_scales(w, fmt, state.weight_max_value.view(-1, 1)).clone()
                scales[o, j] = cands[c, o, j]
                q = quantize(w, fmt, state.weight_max_value.view(-1, 1), scales)
                d = (q[o, cols] - w[o, cols]).double()
                losses.append(float(d @ gram[cols, cols] @ d))
            torch.testing.assert_close(fast[:, o, j].double(), torch.tensor(losses, dtype=torch.float64),
                                       rtol=1e-4, atol=1e-6)
            best = torch.tensor(losses)
            assert best[int(fast[:, o, j].argmin())] <= best.min() * (1 + 1e-5) + 1e-9


def test_row_losses_equal_the_reference_loss():
    problem, x, w = _problem(NVFP4, 2)
    state = minmax_state(problem, NVFP4, NVFP4)
    u = quantize(w, NVFP4, state.weight_max_value.view(-1, 1)) - w
    total = problem.normalize(problem.row_losses(u, state).sum())
    assert float(total) == pytest.approx(state.mse, rel=1e-4)


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4])
@pytest.mark.parametrize("passes", [0, 1])
def test_step_never_above_max_based(fmt, passes):
    for seed in range(3):
        problem, _, w = _problem(fmt, 10 + seed)
        start = minmax_state(problem, fmt, fmt)
        searched = BlockScaleStep(exact_passes=passes)(problem, start)
        assert searched.mse <= start.mse
        assert searched.weight_block_scale.shape == (5, 64 // fmt.block.size)
        assert searched.mse == pytest.approx(problem.loss(searched))
        per_row_start = problem.row_losses(quantize(w, fmt, start.weight_max_value.view(-1, 1)) - w, start)
        per_row = problem.row_losses(quantize(w, fmt, start.weight_max_value.view(-1, 1),
                                              searched.weight_block_scale) - w, start)
        assert (per_row <= per_row_start * (1 + 1e-6)).all()
    # a second run from the searched state never goes up either
    again = BlockScaleStep(exact_passes=passes)(problem, searched)
    assert again.mse <= searched.mse


def _planted(fmt, seed):
    """(weight [4, 64], planted block scales, rows' range): every block is E2M1 grid values (0.5 and 4 included, so
    no other scale represents it exactly) times a planted scale: MX 2^k; NVFP4 6 * code under tensor scale t = 1
    (row range 6 * 448), the block maximum 4 so that the max-based code (about 2/3 of the planted) is not it."""
    g = torch.Generator().manual_seed(seed)
    out, width, size = 4, 64, fmt.block.size
    element = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    grid = torch.tensor(element)[torch.randint(0, 6, (out, width), generator=g)]
    grid *= torch.where(torch.rand(out, width, generator=g) < 0.5, -1.0, 1.0)
    grid.view(out, -1, size)[..., 0] = 4.0
    grid.view(out, -1, size)[..., 1] = 0.5
    if fmt.block.power_of_two:
        grid.view(out, -1, size)[..., 2] = 6.0  # the MX rule's max-based exponent is then the planted one
        k = torch.randint(-6, -2, (out, width // size), generator=g).to(torch.int32)
        w = torch.ldexp(grid.view(out, -1, size), k.unsqueeze(-1)).reshape(out, width)
        return w, k, torch.ones(out)
    values = scale_format_values(fmt.block.scale_format)
    codes = values[torch.randint(40, 100, (out, width // size), generator=g)]
    w = (grid.view(out, -1, size) * codes.unsqueeze(-1)).reshape(out, width)
    return w, 6.0 * codes, torch.full((out,), 6.0 * 448)


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4])
def test_planted_scales_are_found(fmt):
    w, planted, row_range = _planted(fmt, 3)
    x = torch.randn(128, w.shape[1], generator=torch.Generator().manual_seed(4))
    problem = LinearProblem(x, w, Budget(1 << 16))
    start = dataclasses.replace(minmax_state(problem, fmt, fmt), weight_max_value=row_range)
    start.mse = problem.loss(start)
    step = BlockScaleStep(codes_below=4, codes_above=6, exact_passes=0)
    cands, max_based = step.candidates(fmt, w, row_range)
    local = local_block_losses(problem, start, cands, problem.weight.float())
    assert torch.equal(cands.gather(0, local.argmin(0, keepdim=True))[0], planted.to(cands.dtype))
    if not fmt.block.power_of_two:
        assert not torch.equal(max_based, planted) and start.mse > 0
    # from a wrong state (every scale one step too large), the step returns the planted scales: W exactly
    values = scale_format_values(NVFP4.block.scale_format)
    wrong = planted + 1 if fmt.block.power_of_two else 6.0 * values[torch.searchsorted(values, planted / 6) + 1]
    disturbed = dataclasses.replace(start, weight_block_scale=wrong)
    disturbed.mse = problem.loss(disturbed)
    found = step(problem, disturbed)
    assert torch.equal(found.weight_block_scale, planted.to(found.weight_block_scale.dtype))
    assert torch.equal(quantize(w, fmt, row_range.view(-1, 1), found.weight_block_scale), w)
    assert found.mse < disturbed.mse


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4])
def test_params_round_trip(tmp_path, fmt):
    problem, x, w = _problem(fmt, 5)
    start = minmax_state(problem, fmt, fmt)
    state = BlockScaleStep()(problem, start)
    assert not torch.equal(state.weight_block_scale, _data_scales(w, fmt, start.weight_max_value.view(-1, 1)))

    def model():
        net = nn.Sequential(nn.Linear(64, 5, bias=False))
        net[0].weight.data.copy_(w)
        net[0] = QuantLinear(net[0])
        return net

    direct = model()
    direct[0].set_quant_params(state)
    save_params(tmp_path / "p.pt", {"0": state}, {})
    for path in (tmp_path / "p.pt", tmp_path / "p.safetensors"):
        layers, _ = load_params(path)
        assert layers["0"].weight_block_scale.dtype == (torch.int16 if fmt.block.power_of_two else torch.float32)
        loaded = model()
        apply_params(loaded, layers)
        assert torch.equal(loaded[0].weight, direct[0].weight)
    plain = model()
    plain[0].set_quant_params(dataclasses.replace(state, weight_block_scale=None))  # older files: data scales
    assert torch.equal(plain[0].weight, quantize(w, fmt, start.weight_max_value.view(-1, 1)))
