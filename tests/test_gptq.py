"""GPTQ rounding under frozen scales (quant_layers/gptq.py) against a plain-loop float64 reference of the published
algorithm, codes <-> values under frozen scales (quant_layers/codes.py), GPTQStep (utils/search/gptq.py) on
LinearProblems, the parameter-file round trip of weight codes and FPQ's folded shifts."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from configs import QBits, QuantConfig
from conftest import calibrate_and_replay
from quant_layers.codes import Encoded, decode_fpq_weight, decode_frozen, encode, encode_frozen
from quant_layers.formats import BLOCK_ALIASES, NVFP4_BLOCKS, exponent_bias_from_max, fp_format, int_format
from quant_layers.gptq import activation_order, frozen_quantizer, gptq_round, max_based_block_scale, output_target
from quant_layers.modules import QuantEmbedding, QuantLinear, QuantParams
from quant_layers.quantize import grid_inverse, quantize
from utils.params import ParamFileError, apply_params, load_params, save_params
from utils.search.block_scales import BlockScaleStep
from utils.search.gptq import GPTQOutputStep, GPTQStep
from utils.search.problem import Budget, LinearProblem, channel_shift
from utils.search.space import SearchSpace
from utils.search.steps import ActRangeStep, WeightRangeStep, minmax_state

E2M1, E3M0, E4M3, INT4 = fp_format(2, 1), fp_format(3, 0), fp_format(4, 3), int_format(4)
NVFP4, MXFP4, NVFP4_4OVER6 = BLOCK_ALIASES["NVFP4"], BLOCK_ALIASES["MXFP4"], BLOCK_ALIASES["NVFP4_4OVER6"]
FORMATS = [E2M1, E3M0, INT4, NVFP4, MXFP4, NVFP4_4OVER6]
ROWS, WIDTH = 6, 64


def _frozen(fmt, w, clip=0.83):
    """Per-row ranges clip * absmax (a non-integer exponent bias for ExMy) and, for block formats, the max-based block
    scales of w."""
    max_value = w.abs().amax(1) * clip
    return max_value, max_based_block_scale(w, fmt, max_value) if fmt.block is not None else None


def _hessian(seed, width=WIDTH, tokens=256, dead=(5, 9, 40)):
    """X^T X / (4 tokens) (float64, mean diagonal about 1, so that a dead column's H_jj = 1 weighs in the damping) of
    random inputs with varied channel scales and a few correlated channels; `dead` channels are all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64) * (0.5 + 2 * torch.rand(width, generator=g))
    x[:, 1::7] += 0.8 * x[:, :1]  # correlated with channel 0
    x[:, list(dead)] = 0.0
    return x.T @ x / (4 * tokens)


def _reference_gptq(weight, hessian, quant, damping, order):
    """GPTQ's Algorithm 1 as the OBS update, one column at a time, float64: q_j = quant(W, j); e = (w_j - q_j) /
    [H^-1]_jj; the columns not yet rounded get w -= e [H^-1]_{j, .}; H^-1 loses row and column j by Gaussian
    elimination. Dead columns get H_jj = 1, then lambda = damping * mean(diag H) is added to the diagonal."""
    w = weight.double().clone()
    h = hessian.double().clone()
    for j in range(h.shape[0]):
        if h[j, j] == 0:
            h[j, j] = 1.0
    h += damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    remaining = [int(j) for j in order]
    for j in [int(j) for j in order]:
        remaining.remove(j)
        q[:, j] = quant(w, j)
        error = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, remaining] -= error.unsqueeze(1) * hinv[j, remaining].unsqueeze(0)
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gptq_equals_the_published_algorithm(fmt, act_order, dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(ROWS, WIDTH, generator=g) * torch.logspace(-1, 1, ROWS).view(-1, 1)
    w[0, :16] = 0.0  # a zero block: NVFP4's range 0 there (its elements round to 0 and push their error on)
    max_value, block_scale = _frozen(fmt, w)
    if fmt.kind == "fp" and fmt.block is None:
        bias = exponent_bias_from_max(fmt, max_value[1:])
        assert (bias - bias.round()).abs().min() > 0.01  # a real-valued exponent bias
    hessian = _hessian(2)
    order = activation_order(hessian) if act_order else torch.arange(WIDTH)
    if act_order:
        assert not torch.equal(order, torch.arange(WIDTH))

    def quant(current, j):  # the element rounding of quantize itself, on the current W, frozen scales
        return quantize(current.float(), fmt, max_value.view(-1, 1), block_scale)[:, j].double()

    expected = _reference_gptq(w, hessian, quant, 0.01, order)
    quantize_columns = frozen_quantizer(fmt, max_value, block_scale)
    nearest = quantize(w, fmt, max_value.view(-1, 1), block_scale)
    assert torch.equal(quantize_columns(w, torch.arange(WIDTH)), nearest)  # the element rounding is quantize's
    assert torch.equal(quantize_columns(w[:, order[:20]], order[:20]), nearest[:, order[:20]])
    got = gptq_round(w, hessian, quantize_columns, 0.01, 24, order if act_order else None, dtype)
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), expected)
    codes = encode_frozen(got, fmt, max_value.view(-1, 1), block_scale)
    assert torch.equal(codes, encode_frozen(expected.float(), fmt, max_value.view(-1, 1), block_scale))
    assert not torch.equal(got, nearest)  # GPTQ moved some rounding
    assert torch.equal(got[:, [5, 9, 40]], nearest[:, [5, 9, 40]])  # dead columns: kept, rounded to nearest


@pytest.mark.parametrize("step", [GPTQStep(block_size=16), GPTQOutputStep.from_space(SearchSpace((0.01, 1.2, 4)))],
                         ids=["weight", "output"])
@pytest.mark.parametrize("fmt", [E2M1, NVFP4], ids=lambda f: f.name)
def test_step_selects_and_encodes_in_row_slices(fmt, step):
    """GPTQStep's selection and encoding in the row slices of a tiny budget (3 slices of 4, 4 and 2 rows) give the
    codes and block scales of one slice, from round to nearest and from codes of an earlier step."""
    problem, x, w = _linear_problem(5, out=10)
    whole = LinearProblem(x, w, Budget(1 << 40))
    problem.budget = Budget(4 * WIDTH * 16)
    assert [s.stop - s.start for s in problem.row_loss_chunks(10)] == [4, 4, 2]
    start = minmax_state(problem, fmt, _act_format(fmt))
    earlier = GPTQStep(block_size=8)(whole, dataclasses.replace(start, mse=float("inf")))
    assert earlier.weight_codes is not None
    for state in (start, earlier):
        sliced, one = step(problem, state), step(whole, state)
        assert torch.equal(sliced.weight_codes, one.weight_codes)
        assert (sliced.weight_block_scale is None) == (one.weight_block_scale is None)
        if one.weight_block_scale is not None:
            assert torch.equal(sliced.weight_block_scale, one.weight_block_scale)
        assert sliced.mse == pytest.approx(one.mse, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host-device synchronization exists on CUDA only")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_cuda_column_quantizer_never_waits_for_the_gpu(fmt):
    """The frozen quantizer GPTQ calls once per column queues its work on CUDA without one host-device
    synchronization (a Python number copied to the GPU, .item(), a data-dependent shape): each would make every
    column wait for the GPU's whole queue (MX formats had two per column, 4-5x NVFP4's calibration time on an H100).
    torch's sync debug mode raises on any; the values equal the CPU's within a float32 ulp (the devices' exp2 and log2
    may differ by one)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(ROWS, WIDTH, generator=g) * 0.1
    max_value, block_scale = _frozen(fmt, w)
    on_gpu = frozen_quantizer(fmt, max_value.cuda(), None if block_scale is None else block_scale.cuda())
    on_cpu = frozen_quantizer(fmt, max_value, block_scale)
    w_gpu, columns = w.cuda(), torch.arange(WIDTH).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [on_gpu(w_gpu[:, j:j + 1], columns[j:j + 1]) for j in range(WIDTH)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = [on_cpu(w[:, j:j + 1], torch.tensor([j])) for j in range(WIDTH)]
    assert torch.allclose(torch.cat(got, 1).cpu(), torch.cat(want, 1), rtol=2.0**-22, atol=0.0)


def test_gptq_lowers_the_quadratic_error_and_checks_its_input():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(ROWS, WIDTH, generator=g)
    hessian = _hessian(4).float()
    max_value, _ = _frozen(E2M1, w)
    quantize_columns = frozen_quantizer(E2M1, max_value)
    for block_size in (1, 7, 128):  # lazy blocks of one column, of several, one block: the same rounding
        got = gptq_round(w, hessian, quantize_columns, block_size=block_size)
        assert torch.equal(got, gptq_round(w, hessian, quantize_columns, block_size=64))
    nearest = quantize(w, E2M1, max_value.view(-1, 1))
    error = (got - w).double() @ hessian.double() @ (got - w).double().T
    error_nearest = (nearest - w).double() @ hessian.double() @ (nearest - w).double().T
    assert error.trace() < 0.95 * error_nearest.trace()
    with pytest.raises(ValueError, match="permutation"):
        gptq_round(w, hessian, quantize_columns, order=torch.zeros(WIDTH, dtype=torch.int64))
    with pytest.raises(ValueError, match="damping"):
        gptq_round(w, hessian, quantize_columns, damping=0.0)
    with pytest.raises(ValueError, match="block scales"):
        frozen_quantizer(NVFP4, max_value)
    with pytest.raises(torch.linalg.LinAlgError):
        gptq_round(w, -torch.eye(WIDTH), quantize_columns)


@pytest.mark.parametrize("fmt", FORMATS + [int_format(8), E4M3], ids=lambda f: f.name)
def test_values_from_codes_equal_quantize(fmt):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, WIDTH, generator=g) * torch.logspace(-3, 2, 5).view(-1, 1)
    x[0, :16] = 0.0  # NVFP4: a block of range 0
    x[1, 32:] *= 1e-37  # MX: tiny blocks (exponent clamped at -127, values subnormal in float32)
    max_value, block_scale = _frozen(fmt, x)
    q = quantize(x, fmt, max_value.view(-1, 1), block_scale)
    codes = encode_frozen(q, fmt, max_value.view(-1, 1), block_scale)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and int(codes.max()) < 2**fmt.bits
    assert torch.equal(decode_frozen(codes, fmt, max_value.view(-1, 1), block_scale), q)
    assert torch.equal(decode_frozen(codes, fmt, max_value.view(-1, 1), block_scale, torch.bfloat16),
                       quantize(x, fmt, max_value.view(-1, 1), block_scale).bfloat16())
    if fmt.block is not None:
        assert torch.equal(q, quantize(x, fmt, max_value.view(-1, 1)))  # frozen max-based = the data's own scales
        if not fmt.block.power_of_two:
            assert (block_scale[0, 0] == 0).item() and (q[0, :16] == 0).all()
        else:
            assert (block_scale[1, 1] == -127).item() and q[1, 32:].abs().max() < 1e-37
        # explicit other scales (one step smaller: saturation) round trip as well
        other = (block_scale - 1).clamp(min=-127) if fmt.block.power_of_two else block_scale * 0.75
        q_other = quantize(x, fmt, max_value.view(-1, 1), other)
        assert torch.equal(decode_frozen(encode_frozen(q_other, fmt, None, other), fmt, None, other), q_other)
    # the codes are codes.py's layout: those `encode` gives for round to nearest
    assert torch.equal(encode(x, fmt, max_value.view(-1, 1)).codes, codes)
    with pytest.raises(ValueError, match="grid"):
        encode_frozen(q + 1e-3 * q.abs().amax(), fmt, max_value.view(-1, 1), block_scale)


def _linear_problem(seed, correlated=True, tokens=192, out=ROWS, width=WIDTH):
    """Inputs with channel outliers; correlated: a rank-8 signal plus small noise (where GPTQ must help)."""
    g = torch.Generator().manual_seed(seed)
    if correlated:
        x = torch.randn(tokens, 8, generator=g) @ torch.randn(8, width, generator=g)
        x += 0.05 * torch.randn(tokens, width, generator=g)
    else:
        x = torch.randn(tokens, width, generator=g)
    x *= 1 + 4 * (torch.rand(width, generator=g) < 0.1)
    w = torch.randn(out, width, generator=g) * 0.1
    return LinearProblem(x, w, Budget(1 << 14)), x, w


def _act_format(fmt):
    return fmt if fmt.block is not None else E4M3


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_step_never_increases_the_loss_and_helps_on_correlated_inputs(fmt):
    for seed, correlated in ((0, True), (1, False), (2, True)):
        problem, x, w = _linear_problem(seed, correlated)
        start = minmax_state(problem, fmt, _act_format(fmt))
        result = GPTQStep(block_size=16)(problem, start)
        assert result.mse <= start.mse
        assert result is not start or not correlated
        if result is start:
            continue
        assert result.weight_codes.shape == w.shape and result.weight_codes.dtype == torch.uint8
        assert result.mse == pytest.approx(problem.loss(result), rel=1e-6)
        assert (result.weight_block_scale is not None) == (fmt.block is not None)
        values = decode_frozen(result.weight_codes, fmt, result.weight_max_value.view(-1, 1), result.weight_block_scale)
        nearest = quantize(w, fmt, start.weight_max_value.view(-1, 1), result.weight_block_scale)
        assert torch.equal(nearest, quantize(w, fmt, start.weight_max_value.view(-1, 1)))
        rows = problem.row_losses(values - w, start)
        assert (rows <= problem.row_losses(nearest - w, start)).all()
        # the loss honours the codes: the output error of the decoded weight, computed here
        xq = quantize(x, start.act_format, start.act_max_value)
        direct = ((xq.double() @ values.double().T - x.double() @ w.double().T).square().mean())
        assert result.mse == pytest.approx(float(direct), rel=1e-4)
        if correlated:
            assert result.mse < 0.8 * start.mse, (seed, result.mse, start.mse)
        again = GPTQStep(block_size=16)(problem, result)  # from its own codes: never up
        assert again.mse <= result.mse
    none = QuantParams(None, None)
    assert GPTQStep()(problem, none) is none
    bar = dataclasses.replace(start, mse=0.5 * result.mse)  # a given loss below what GPTQ reaches: kept
    assert GPTQStep(block_size=16)(problem, bar) is bar


def test_step_keeps_the_state_without_a_cholesky_factor(monkeypatch):
    """Negative definite G: no damping up to 100x makes a factor; the state comes back with a warning."""
    problem, _, _ = _linear_problem(0)
    start = minmax_state(problem, E2M1, E4M3)
    gram, v, c = problem.weight_stats(start)
    monkeypatch.setattr(problem, "weight_stats", lambda state: (-gram, v, c))  # negative definite
    with pytest.warns(UserWarning, match="no Cholesky factor up to damping 1"):
        assert GPTQStep()(problem, start) is start


def test_step_raises_the_damping_where_h_has_no_factor(monkeypatch):
    """G with a negative direction that 1% damping does not lift but 10% does: the step rounds with the larger
    damping, equal to GPTQ run directly at 10x damping on the same G."""
    problem, _, _ = _linear_problem(0)
    start = minmax_state(problem, E2M1, E4M3)
    gram, v, c = problem.weight_stats(start)
    gram = gram.float()
    indefinite = gram - 0.05 * gram.diagonal().mean() * torch.eye(gram.shape[0])  # lambda_min < 0 by 0.05 mean diag
    monkeypatch.setattr(problem, "weight_stats", lambda state: (indefinite, v, c))
    with pytest.raises(torch.linalg.LinAlgError):
        gptq_round(problem.weight.float(), indefinite, frozen_quantizer(E2M1, start.weight_max_value.view(-1, 1)),
                   0.01, 128, activation_order(indefinite))
    expected = gptq_round(problem.weight.float(), indefinite,
                          frozen_quantizer(E2M1, start.weight_max_value.view(-1, 1)), 0.1, 128,
                          activation_order(indefinite))
    rounded = GPTQStep()(problem, dataclasses.replace(start, mse=float("inf")))
    assert rounded.weight_codes is not None
    values = decode_frozen(rounded.weight_codes, E2M1, start.weight_max_value.view(-1, 1), None)
    kept = (values == expected).all(dim=1)
    assert kept.any()  # rows where GPTQ lowered the exact loss carry the 10x-damped rounding


@pytest.mark.parametrize("fmt", [E2M1, NVFP4], ids=lambda f: f.name)
def test_steps_that_score_round_to_nearest_drop_the_codes(fmt):
    """A range or block-scale step that changes a GPTQ state returns weights rounded to nearest (no stale codes under
    new scales); its mse is that state's loss."""
    problem, _, _ = _linear_problem(0)
    start = minmax_state(problem, fmt, _act_format(fmt))
    rounded = GPTQStep(block_size=16)(problem, start)
    assert rounded.weight_codes is not None
    space = SearchSpace((0.5, 1.2, 4), search_round=1)
    steps = [BlockScaleStep(exact_passes=0)] if fmt.block is not None else [
        WeightRangeStep((fmt,), space), ActRangeStep((_act_format(fmt),), space)]
    for step in steps:
        changed = step(problem, dataclasses.replace(rounded, mse=float("inf")))  # any candidate beats it
        assert changed.weight_codes is None
        assert changed.mse == pytest.approx(problem.loss(changed), rel=1e-4)
        assert step(problem, rounded) is rounded  # GPTQ's loss is below what round to nearest reaches here


def test_from_space_takes_the_knobs():
    step = GPTQStep.from_space(SearchSpace(gptq_damping=0.1, gptq_block=32))
    assert (step.damping, step.block_size, step.act_order) == (0.1, 32, True)
    assert GPTQStep.from_space(SearchSpace()) == GPTQStep()
    with pytest.raises(ValueError, match="gptq_damping"):
        SearchSpace(gptq_damping=0.0)
    with pytest.raises(ValueError, match="gptq_block"):
        SearchSpace(gptq_block=0)


def _model(w):
    net = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    net[0].weight.data.copy_(w)
    net[0] = QuantLinear(net[0])
    return net


@pytest.mark.parametrize("fmt", [E2M1, NVFP4, MXFP4, int_format(8)], ids=lambda f: f.name)
def test_params_round_trip_and_tampered_codes(tmp_path, fmt):
    problem, x, w = _linear_problem(3)
    state = GPTQStep(block_size=16)(problem, minmax_state(problem, fmt, _act_format(fmt)))
    assert state.weight_codes is not None
    direct = _model(w)
    direct[0].set_quant_params(state)
    assert not torch.equal(direct[0].weight, quantize(w, fmt, state.weight_max_value.view(-1, 1)))
    path = tmp_path / "p.pt"
    save_params(path, {"0": state}, {})
    payload = torch.load(path, weights_only=True)
    packed = fmt.bits <= 4
    assert payload["metadata"]["modules"]["0"]["weight_codes"] == ("nibbles" if packed else "plain")
    assert payload["tensors"]["0.weight_codes"].shape == (ROWS, WIDTH // 2 if packed else WIDTH)
    for file in (path, path.with_suffix(".safetensors")):
        layers, _ = load_params(file)
        assert torch.equal(layers["0"].weight_codes, state.weight_codes)
        loaded = _model(w)
        apply_params(loaded, layers)
        assert torch.equal(loaded[0].weight, direct[0].weight)
        with torch.no_grad():
            assert torch.equal(loaded(x), direct(x))
    plain = _model(w)  # a file without codes: round to nearest, as before
    plain[0].set_quant_params(dataclasses.replace(state, weight_codes=None, weight_block_scale=None))
    assert torch.equal(plain[0].weight, quantize(w, fmt, state.weight_max_value.view(-1, 1)))
    tampered = tmp_path / "t.pt"
    for codes, message in ((payload["tensors"]["0.weight_codes"][:, 1:], "weight codes"),
                           (payload["tensors"]["0.weight_codes"].float(), "weight codes")):
        torch.save({**payload, "tensors": {**payload["tensors"], "0.weight_codes": codes}}, tampered)
        with pytest.raises(ParamFileError, match=message):
            apply_params(_model(w), load_params(tampered)[0])


def test_embedding_takes_the_codes():
    g = torch.Generator().manual_seed(6)
    table = torch.randn(10, 32, generator=g)
    max_value = table.abs().amax(1)
    values = gptq_round(table, _hessian(7, width=32, dead=()), frozen_quantizer(INT4, max_value))
    assert not torch.equal(values, quantize(table, INT4, max_value.view(-1, 1)))
    codes = encode_frozen(values, INT4, max_value.view(-1, 1))
    embedding = QuantEmbedding(nn.Embedding.from_pretrained(table))
    embedding.set_quant_params(QuantParams(INT4, max_value, kind="embedding", weight_codes=codes))
    assert torch.equal(embedding.weight, values)


def test_fpq_shifts_fold_after_the_codes():
    problem, x, w = _linear_problem(4)
    start = minmax_state(problem, E2M1, E2M1)
    shift = channel_shift(E2M1, start.act_max_value.view(1), problem.channel_absmax)[0]
    assert shift.max() > 0
    shifted = dataclasses.replace(start, act_channel_shift=shift)
    shifted.mse = problem.loss(shifted)
    result = GPTQStep(block_size=16)(problem, shifted)
    assert result.weight_codes is not None and result.mse < shifted.mse
    max_value = result.weight_max_value.view(-1, 1)
    values = decode_frozen(result.weight_codes, E2M1, max_value)
    module = _model(w)[0]
    module.set_quant_params(result)
    assert torch.equal(module.weight, values * torch.exp2(-shift.float()))
    stored = Encoded(E2M1, result.weight_codes, torch.float32, grid_inverse=grid_inverse(E2M1, max_value),
                     channel_shift=shift.to(torch.int8))
    assert torch.equal(module.weight, decode_fpq_weight(stored))
    # the loss GPTQ lowered is the module's output error: Q_a(x 2^k) W_fold^T against x W^T
    with torch.no_grad():
        direct = (module(x).double() - x.double() @ w.double().T).square().mean()
    assert result.mse == pytest.approx(float(direct), rel=1e-4)
    assert math.isfinite(result.mse)


def _input_error_problem(seed, tokens=256, out=ROWS, width=WIDTH):
    """x [tokens, width] with two dead channels, w [out, width] and xq = x rounded to E2M1 at its per-tensor max
    (a coarse input error D = xq - x, as a W4A4 layer sees), float64."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, 8, generator=g) @ torch.randn(8, width, generator=g)
         + 0.3 * torch.randn(tokens, width, generator=g)).double()
    x[:, [3, 30]] = 0.0
    w = torch.randn(out, width, generator=g, dtype=torch.float64) * 0.1
    xq = quantize(x.float(), E2M1, x.abs().amax()).double()
    return x, w, xq


@pytest.mark.parametrize("damping", [0.0, 0.01, 0.3])
def test_output_target_is_the_least_squares_weight(damping):
    """W* against numpy-free least squares on the stacked system [Xq; sqrt(lambda) I] W'^T = [X W^T; sqrt(lambda) W^T]
    (float64, torch.linalg.lstsq); dead input channels keep W's values (damping > 0) where lstsq's minimum-norm
    solution of the undamped system sets them to 0."""
    x, w, xq = _input_error_problem(0)
    gram = xq.T @ xq
    cross = ((xq - x) @ w.T).T @ xq  # V = (D W^T)^T Xq
    diagonal = gram.diagonal().clone()
    diagonal[diagonal == 0] = 1.0
    lam = damping * diagonal.mean()
    lhs = torch.cat([xq, lam.sqrt() * torch.eye(WIDTH, dtype=torch.float64)])
    rhs = torch.cat([x @ w.T, lam.sqrt() * w.T])
    if damping == 0.0:  # dead channels: their column of the system is empty; H_jj = 1 keeps w there
        lhs = torch.cat([lhs, torch.eye(WIDTH, dtype=torch.float64)[[3, 30]]])
        rhs = torch.cat([rhs, w.T[[3, 30]]])
    expected = torch.linalg.lstsq(lhs, rhs).solution.T
    got = output_target(w, gram, cross, damping, torch.float64)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-11)
    assert torch.equal(got[:, [3, 30]], w[:, [3, 30]])
    assert (got - w).abs().max() > 0.01  # the input error moves the target
    got32 = output_target(w.float(), gram.float(), cross.float(), damping)
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), expected, rtol=1e-3, atol=1e-4)


def test_rounding_toward_the_output_target_is_the_exact_objective():
    """For any two weights Q1, Q2: ||Xq Q1^T - X W^T||^2 - ||Xq Q2^T - X W^T||^2 equals the same difference of
    GPTQ's objective aimed at W*, sum (Q - W*) G (Q - W*)^T (undamped, full-rank G), and not of the one aimed at W."""
    x, w, xq = _input_error_problem(1)
    x[:, [3, 30]] = xq[:, [3, 30]] = torch.randn(x.shape[0], 2, generator=torch.Generator().manual_seed(3),
                                                dtype=torch.float64)  # full rank
    gram, cross = xq.T @ xq, ((xq - x) @ w.T).T @ xq
    target = output_target(w, gram, cross, 0.0, torch.float64)
    g = torch.Generator().manual_seed(2)
    q1, q2 = (w + 0.05 * torch.randn(w.shape, generator=g, dtype=torch.float64) for _ in range(2))

    def exact(q):
        return (xq @ q.T - x @ w.T).square().sum()

    def aimed(q, at):
        return ((q - at) @ gram * (q - at)).sum()

    assert float(exact(q1) - exact(q2)) == pytest.approx(float(aimed(q1, target) - aimed(q2, target)), rel=1e-8)
    assert float(exact(q1) - exact(q2)) != pytest.approx(float(aimed(q1, w) - aimed(q2, w)), rel=1e-2)


@pytest.mark.parametrize("fmt", [E2M1, INT4, NVFP4, MXFP4], ids=lambda f: f.name)
def test_output_aim_lowers_the_exact_loss_below_gptq(fmt):
    """Under a coarse activation format (E2M1 per tensor; the block formats' own), GPTQ aimed at W* ends at a lower
    exact output error than GPTQ aimed at W, on every seed; its loss honours its codes."""
    for seed in range(3):
        problem, x, w = _linear_problem(seed, tokens=256)
        act = fmt if fmt.block is not None else E2M1
        start = minmax_state(problem, fmt, act)
        weight_aim = GPTQStep(block_size=16)(problem, start)
        output_aim = GPTQStep(block_size=16, aim="output")(problem, start)
        assert output_aim.mse < weight_aim.mse <= start.mse, (seed, output_aim.mse, weight_aim.mse)
        assert output_aim.mse == pytest.approx(problem.loss(output_aim), rel=1e-6)


def test_output_step_takes_the_knobs_and_checks_its_aim():
    step = GPTQOutputStep.from_space(SearchSpace(gptq_damping=0.1, gptq_block=32))
    assert step == GPTQStep(damping=0.1, block_size=32, aim="output")
    with pytest.raises(ValueError, match="aim must be one of weight, output"):
        GPTQStep(aim="outputs")


@pytest.mark.parametrize("step", [GPTQStep, GPTQOutputStep], ids=lambda s: s.__name__)
@pytest.mark.parametrize("block", [None, NVFP4_BLOCKS], ids=["FPQ", "NVFP4"])
def test_step_in_calibration_lowers_the_error_and_replays(tmp_path, block, step):
    """A config listing GPTQStep or GPTQOutputStep (built here, not one of configs/): every Linear gets codes, its
    error does not rise above MinMax, and the parameter file replays the calibrated logits exactly."""
    config = QuantConfig(name="gptq_test", format_kind="fp", search=block is None, act_channel_shift=block is None,
                         weight_granularity="per_channel" if block is None else "per_tensor", block=block,
                         embedding=False, steps=(step,))
    layers = calibrate_and_replay(config, QBits.parse([4, 4, 16, 2, 2, 2]), SearchSpace((0.5, 1.2, 4), search_round=1),
                                  tmp_path)
    linears = [p for p in layers.values() if getattr(p, "kind", None) == "linear"]
    assert linears and all(p.weight_codes is not None and p.mse <= p.mse_minmax for p in linears)
