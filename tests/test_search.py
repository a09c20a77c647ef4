"""The per-layer search: exact batched losses, planted optima, monotonicity, shifts."""

import pytest
import torch

from quant_layers.formats import exponent_bias_from_max, fp_format, int_format, max_from_exponent_bias
from quant_layers.quantize import quantize
import dataclasses

from quant_layers.modules import QuantParams
from utils.search.problem import ActCandidates, Budget, LinearProblem, channel_shift
from utils.search.space import SearchSpace
from utils.search.steps import fpq_search, minmax_state
from utils.search.table import search_table

E2M1 = fp_format(2, 1)
HALF_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])  # E2M1 values below its max 6


def planted(rows: int, cols: int, scale: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Values on scale * E2M1 grid (max 6 * scale) that never use +-6: the row maximum is 4 * scale, so the
    only exact range is 6 * scale = 1.5 x MinMax."""
    v = HALF_GRID[torch.randint(0, 7, (rows, cols), generator=generator)]
    v = v * torch.where(torch.rand(rows, cols, generator=generator) < 0.5, -1.0, 1.0)
    v[:, 0] = 4.0
    return v * scale


def brute_force_loss(x, w, weight_format, weight_max, act_format, act_range):
    xq = quantize(x.double(), act_format, act_range.double())
    wq = quantize(w.double(), weight_format, weight_max.double().view(-1, 1))
    return ((xq @ wq.T - x.double() @ w.double().T) ** 2).sum(0)  # per output row


def shifted_ranges(g: torch.Generator, count: int, channels: int) -> ActCandidates:
    """Random per-tensor ranges with random channel shifts 0..3 (range of column i: m * 2^-k_i)."""
    return ActCandidates(E2M1, torch.rand(count, generator=g) * 3 + 0.5,
                         torch.randint(0, 4, (count, channels), generator=g))


def column_ranges(acts: ActCandidates, index: int) -> torch.Tensor:
    return acts.max_value[index] * torch.exp2(-acts.shift[index].float())


@pytest.mark.parametrize("tokens", [256, 8])  # quadratic form (N >= in) and direct path (N < in)
@pytest.mark.parametrize("budget_rows", [1 << 20, 30, 5])  # all at once, 2 candidates a step, 5 weight rows a step
def test_weight_losses_match_brute_force(tokens, budget_rows):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, 32, generator=g), torch.randn(12, 32, generator=g)
    problem = LinearProblem(x, w, Budget(budget_rows * 32 * 16))  # 16 bytes per weight element and candidate
    acts = shifted_ranges(g, 1, 32)
    state = QuantParams(E2M1, problem.weight_absmax, E2M1, acts.max_value[0], acts.shift[0])
    candidates = SearchSpace((0.3, 1.2, 7)).candidates(E2M1, problem.weight_absmax)
    losses = problem.weight_losses(E2M1, candidates, state)
    expected = torch.stack([brute_force_loss(x, w, E2M1, c, E2M1, column_ranges(acts, 0)) for c in candidates])
    torch.testing.assert_close(losses.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("out_features", [64, 8])  # input-space quadratic form (in < out) and direct (out <= in)
def test_act_losses_match_brute_force(out_features):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(200, 16, generator=g), torch.randn(out_features, 16, generator=g)
    problem = LinearProblem(x, w, Budget(1 << 16))  # small budget: several token and candidate chunks
    weight_max = w.abs().amax(1) * 0.8
    acts = shifted_ranges(g, 9, 16)
    losses = problem.act_losses(acts, E2M1, weight_max)
    expected = torch.stack([brute_force_loss(x, w, E2M1, weight_max, E2M1, column_ranges(acts, i)).sum()
                            for i in range(len(acts))])
    torch.testing.assert_close(losses.double(), expected, rtol=1e-4, atol=1e-3)


def test_coarse_ranking_refines_on_all_tokens():
    """With a coarse subset the search scores only the refined candidates on all tokens, and its result
    is never worse than MinMax; with refine covering every candidate it equals the exhaustive search."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4096, 16, generator=g) * torch.exp2(torch.randint(-2, 3, (16,), generator=g).float())
    w = torch.randn(8, 16, generator=g)
    problem = LinearProblem(x, w, Budget(1 << 22))
    assert problem.coarse_rows(512).shape[0] == 512
    assert problem.coarse_rows(4096) is None
    exhaustive, _ = fpq_search(problem, E2M1, E2M1, SearchSpace((0.1, 1.2, 30), act_coarse_tokens=0, search_round=2), True)
    covering, _ = fpq_search(problem, E2M1, E2M1, SearchSpace((0.1, 1.2, 30), act_coarse_tokens=512, act_refine=64, search_round=2), True)
    coarse, minmax = fpq_search(problem, E2M1, E2M1, SearchSpace((0.1, 1.2, 30), act_coarse_tokens=512, act_refine=3, search_round=2), True)
    assert covering.mse == exhaustive.mse
    assert torch.equal(covering.act_max_value, exhaustive.act_max_value)
    assert coarse.mse <= minmax.mse
    assert coarse.mse <= 1.05 * exhaustive.mse


def test_search_recovers_planted_optimum():
    g = torch.Generator().manual_seed(2)
    row_scale = torch.rand(16, 1, generator=g) + 0.5
    w = planted(16, 32, row_scale, g)
    x = planted(512, 32, torch.tensor(0.7), g)
    problem = LinearProblem(x, w, Budget(1 << 24))
    space = SearchSpace((0.5, 2.0, 6))  # g in {0.5, 0.75, ..., 1.75} and 1: 1.5 is the planted optimum
    best, minmax = fpq_search(problem, E2M1, E2M1, dataclasses.replace(space, search_round=2), False)
    assert minmax.mse > 1e-3
    assert best.mse < 1e-9
    assert best.weight_format == E2M1 and best.act_format == E2M1
    torch.testing.assert_close(best.weight_max_value, 1.5 * problem.weight_absmax)
    torch.testing.assert_close(best.act_max_value, 1.5 * problem.act_absmax)


def test_search_picks_the_planted_format():
    """Weights exactly on an E1M2 grid: starting from E2M1, the search must move to E1M2 with zero weight error."""
    g = torch.Generator().manual_seed(3)
    e1m2 = fp_format(1, 2)
    codes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])  # E1M2, bias 0
    w = codes[torch.randint(0, 8, (8, 32), generator=g)] * torch.where(torch.rand(8, 32, generator=g) < .5, -1., 1.)
    w[:, 0] = 3.5  # the E1M2 maximum with bias 0
    x = torch.randn(256, 32, generator=g)
    problem = LinearProblem(x, w, Budget(1 << 24))
    best, _ = fpq_search(problem, E2M1, E2M1, SearchSpace((0.5, 1.5, 4), search_round=1), False)
    assert best.weight_format == e1m2
    torch.testing.assert_close(quantize(w, e1m2, best.weight_max_value.view(-1, 1)), w)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shifts", [False, True])
def test_search_never_worse_than_minmax(seed, shifts):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 24, generator=g) * torch.exp2(torch.randint(-3, 4, (24,), generator=g).float())
    x[0, 0] = 40.0  # an outlier
    w = torch.randn(20, 24, generator=g) * 0.1
    problem = LinearProblem(x, w, Budget(1 << 22))
    best, minmax = fpq_search(problem, E2M1, E2M1, SearchSpace((0.01, 1.2, 12), search_round=2), shifts)
    assert problem.loss(best) <= problem.loss(minmax) * (1 + 1e-5)
    assert best.mse == pytest.approx(problem.loss(best), rel=1e-3)
    assert problem.loss(best) < 0.9 * problem.loss(minmax)  # an outlier leaves room to gain


def test_search_result_holds_only_its_own_values():
    """The chosen ranges and shifts own their storage: a view into the [C, in] candidate tensors would keep
    every candidate alive for as long as the parameters (27 MiB per 7B block on the GPU, found by
    bench/calib_7b.py's peak growing with the number of layers)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g) * torch.exp2(torch.randint(-3, 4, (24,), generator=g).float())
    problem = LinearProblem(x, torch.randn(20, 24, generator=g) * 0.1, Budget(1 << 22))
    best, _ = fpq_search(problem, E2M1, E2M1, SearchSpace((0.01, 1.2, 12), search_round=2), True)
    for tensor in (best.weight_max_value, best.act_max_value, best.act_channel_shift):
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_channel_shift_by_hand():
    """E2M1: bias(max) = log2(12 / max). Tensor max 6 -> b_a = 1. Channel maxima 6, 1.5, 0.7, 0.01 ->
    b_c = 1, 3, 4.1, 10.2 -> round -> 1, 3, 4, 10 -> k = 0, 2, 3, 9 -> clamp to 2^E - 1 = 3."""
    shift = channel_shift(E2M1, torch.tensor([6.0]), torch.tensor([6.0, 1.5, 0.7, 0.01]))
    assert shift.tolist() == [[0, 2, 3, 3]]


def test_bias_space_multiplies_the_exponent_bias():
    absmax = torch.tensor([6.0, 0.75])  # E2M1 biases 1 and 4
    candidates = SearchSpace((0.5, 1.5, 2), search_space="bias").candidates(E2M1, absmax)
    biases = exponent_bias_from_max(E2M1, candidates)
    torch.testing.assert_close(biases, torch.tensor([[0.5, 2.0], [1.0, 4.0]]))
    max_candidates = SearchSpace((0.5, 1.5, 2)).candidates(E2M1, absmax)
    torch.testing.assert_close(max_candidates, torch.tensor([[3.0, 0.375], [6.0, 0.75]]))
    torch.testing.assert_close(max_from_exponent_bias(E2M1, torch.tensor(1.0)), torch.tensor(6.0))


def test_candidate_multipliers():
    g = SearchSpace((0.01, 1.2, 100)).multipliers()
    assert len(g) == 101 and float(g[0]) == pytest.approx(0.01) and 1.0 in g.tolist()
    assert float(g[-1]) == pytest.approx(0.01 + 99 * 1.19 / 100)


def test_minmax_state_and_int_format():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(64, 8, generator=g), torch.randn(4, 8, generator=g)
    state = minmax_state(LinearProblem(x, w, Budget(1 << 20)), int_format(4), int_format(4))
    torch.testing.assert_close(state.weight_max_value, w.abs().amax(1))
    assert float(state.act_max_value) == float(x.abs().max())
    assert isinstance(state, QuantParams) and state.act_channel_shift is None


def test_search_table_is_no_worse_than_minmax():
    g = torch.Generator().manual_seed(5)
    table = torch.randn(50, 16, generator=g)
    table[3, 3] = 30.0
    found = search_table(table, E2M1, SearchSpace((0.2, 1.2, 10)), Budget(1 << 20))
    assert found.mse <= found.mse_minmax and found.weight_max_value.shape == (50,) and found.kind == "embedding"
    direct = float((quantize(table, found.weight_format, found.weight_max_value.view(-1, 1)) - table).square().mean())
    assert found.mse == pytest.approx(direct, rel=1e-5)
    assert search_table(table, E2M1, None, Budget(1 << 20)).mse == pytest.approx(found.mse_minmax)


def test_weight_losses_stay_in_budget_when_one_candidate_does_not_fit(monkeypatch):
    """lm_head's case: one candidate's residuals [out, in] exceed the budget, so they go in row slices."""
    import utils.search.problem as search

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 16, generator=g), torch.randn(40, 16, generator=g)
    problem = LinearProblem(x, w, Budget(7 * 16 * 16))  # 7 weight rows of 16 inputs
    state = minmax_state(problem, E2M1, E2M1)
    candidates = SearchSpace((0.3, 1.2, 3)).candidates(E2M1, problem.weight_absmax)
    shapes, residuals = [], search.weight_residuals
    monkeypatch.setattr(search, "weight_residuals", lambda *a: shapes.append(a[0].shape) or residuals(*a))
    sliced = problem.weight_losses(E2M1, candidates, state)
    assert shapes and max(rows for rows, _ in shapes) == 7 and sum(rows for rows, _ in shapes) == len(candidates) * 40
    problem.budget = Budget(1 << 20)
    torch.testing.assert_close(sliced, problem.weight_losses(E2M1, candidates, state), rtol=1e-6, atol=1e-6)


def test_search_table_goes_in_row_slices_within_budget(monkeypatch):
    """The embedding's case: one candidate over the whole table exceeds the budget; slices give the same
    format and ranges as one pass."""
    import utils.search.table as table_search

    g = torch.Generator().manual_seed(6)
    table = torch.randn(50, 16, generator=g)
    table[3, 3], table[40, 1] = 30.0, -12.0
    whole = search_table(table, E2M1, SearchSpace((0.2, 1.2, 10)), Budget(1 << 20))
    shapes, quantizer = [], table_search.quantize
    monkeypatch.setattr(table_search, "quantize", lambda w, *a: shapes.append(w.shape) or quantizer(w, *a))
    sliced = search_table(table, E2M1, SearchSpace((0.2, 1.2, 10)), Budget(7 * 16 * 12))  # 7 rows of 16 at a time
    assert max(rows for rows, _ in shapes) == 7
    assert sliced.weight_format == whole.weight_format and torch.equal(sliced.weight_max_value, whole.weight_max_value)
    assert sliced.mse == pytest.approx(whole.mse, rel=1e-6)
    assert sliced.mse_minmax == pytest.approx(whole.mse_minmax, rel=1e-6)


def test_bfloat16_path_keeps_the_model_weight_and_exact_losses(monkeypatch):
    """Where products run in bfloat16 (CUDA; emulated here by exact float32 products of the upcast operands),
    the problem holds the model's own bfloat16 weight, no float32 copy (0.9 GiB for Qwen's lm_head), and its
    losses still match brute force (within the bfloat16 rounding of the residuals used for ranking)."""
    import utils.search.problem as search

    monkeypatch.setattr(search, "_bf16_products", lambda device: True)
    monkeypatch.setattr(search, "mm32", lambda a, b: a.float() @ b.float())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 16, generator=g).bfloat16()
    w = torch.randn(40, 16, generator=g).bfloat16()  # in < out: lm_head's input-space form
    problem = LinearProblem(x, w, Budget(1 << 16))
    assert problem.weight.dtype == torch.bfloat16 and problem.weight.data_ptr() == w.data_ptr()
    assert problem.weight_absmax.dtype == torch.float32
    acts = shifted_ranges(g, 5, 16)
    state = QuantParams(E2M1, problem.weight_absmax, E2M1, acts.max_value[0], acts.shift[0])
    candidates = SearchSpace((0.3, 1.2, 7)).candidates(E2M1, problem.weight_absmax)
    x64, w64 = x.double(), w.double()
    expected = torch.stack([brute_force_loss(x64, w64, E2M1, c, E2M1, column_ranges(acts, 0)) for c in candidates])
    torch.testing.assert_close(problem.weight_losses(E2M1, candidates, state).double(), expected, rtol=2e-2, atol=1e-2)
    weight_max = problem.weight_absmax * 0.8
    expected = torch.stack([brute_force_loss(x64, w64, E2M1, weight_max, E2M1, column_ranges(acts, i)).sum()
                            for i in range(len(acts))])
    torch.testing.assert_close(problem.act_losses(acts, E2M1, weight_max).double(), expected, rtol=2e-2, atol=1e-2)


def test_weight_statistics_are_not_held_through_the_activation_step(monkeypatch):
    """V = R^T Xq [out, in] (float32) is freed before each activation step and rebuilt by the next weight step,
    so the lm_head's V does not sit beside the activation step's own buffers; the result is unchanged."""
    from utils.search.steps import ActRangeStep

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 24, generator=g) * torch.exp2(torch.randint(-3, 4, (24,), generator=g).float())
    w = torch.randn(20, 24, generator=g) * 0.1
    space = SearchSpace((0.01, 1.2, 12))
    held, act_step = [], ActRangeStep.__call__

    def watched(self, problem, *args):
        held.append(len(problem._stats))
        return act_step(self, problem, *args)

    with monkeypatch.context() as patch:  # the statistics kept from round to round, as before
        patch.setattr(LinearProblem, "release_weight_stats", lambda self: None)
        kept, _ = fpq_search(LinearProblem(x, w, Budget(1 << 22)), E2M1, E2M1, dataclasses.replace(space, search_round=3), True)
    monkeypatch.setattr(ActRangeStep, "__call__", watched)
    released, _ = fpq_search(LinearProblem(x, w, Budget(1 << 22)), E2M1, E2M1, dataclasses.replace(space, search_round=3), True)
    assert held == [0, 0, 0]
    assert released.mse == kept.mse and torch.equal(released.weight_max_value, kept.weight_max_value)


def test_weight_proxy_with_a_full_basis_is_the_exact_loss():
    """The proxy keeps G's diagonal and its leading eigenvectors; with as many as G has, it is L itself."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated inputs: G not diagonal
    problem = LinearProblem(x, torch.randn(12, 16, generator=g), Budget(1 << 20))
    state = minmax_state(problem, E2M1, E2M1)
    candidates = SearchSpace((0.3, 1.2, 9)).candidates(E2M1, problem.weight_absmax)
    exact = problem.weight_losses(E2M1, candidates, state)
    torch.testing.assert_close(problem.weight_proxy_losses(E2M1, candidates, state, 16), exact, rtol=1e-4, atol=1e-3)
    diagonal_only = problem.weight_proxy_losses(E2M1, candidates, state, 0)
    assert (diagonal_only - exact).abs().max() > 1e-2 * exact.abs().max()  # off-diagonal terms matter here


def test_proxy_eigenvectors_computed_once_per_weight_step(monkeypatch):
    """Every weight format of a step ranks with the same G: its eigenvectors are found once per step (rounds x 1,
    not rounds x formats), and the search ends where recomputing them for every format would."""
    import utils.search.problem as search

    g = torch.Generator().manual_seed(10)
    x = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g)
    w = torch.randn(12, 16, generator=g)
    space = SearchSpace((0.01, 1.2, 12), weight_refine=3, proxy_rank=4)
    cached_terms = LinearProblem._proxy_terms

    def fresh_terms(self, gram, rank):  # no cache: a new computation for every format
        self._proxy = ()
        return cached_terms(self, gram, rank)

    with monkeypatch.context() as patch:
        patch.setattr(LinearProblem, "_proxy_terms", fresh_terms)
        uncached, _ = fpq_search(LinearProblem(x, w, Budget(1 << 22)), E2M1, E2M1, dataclasses.replace(space, search_round=2), True)
    calls = []
    eigenpairs = search._leading_eigenpairs
    monkeypatch.setattr(search, "_leading_eigenpairs", lambda *args: calls.append(1) or eigenpairs(*args))
    cached, _ = fpq_search(LinearProblem(x, w, Budget(1 << 22)), E2M1, E2M1, dataclasses.replace(space, search_round=2), True)
    assert len(calls) == 2
    assert cached.mse == uncached.mse and torch.equal(cached.weight_max_value, uncached.weight_max_value)


@pytest.mark.parametrize("shifts", [False, True])
def test_proxy_ranked_weight_step(shifts):
    """Re-scoring every candidate equals the exhaustive search; re-scoring a few is never worse than MinMax and,
    with a good proxy, finds the planted optimum."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(400, 24, generator=g) * torch.exp2(torch.randint(-3, 4, (24,), generator=g).float())
    problem = LinearProblem(x, torch.randn(20, 24, generator=g) * 0.1, Budget(1 << 22))
    exhaustive, _ = fpq_search(problem, E2M1, E2M1, SearchSpace((0.01, 1.2, 12), search_round=2), shifts)
    covering, _ = fpq_search(problem, E2M1, E2M1, SearchSpace((0.01, 1.2, 12), weight_refine=64, search_round=2), shifts)
    few, minmax = fpq_search(problem, E2M1, E2M1, SearchSpace((0.01, 1.2, 12), weight_refine=3, proxy_rank=4, search_round=2), shifts)
    assert covering.mse == exhaustive.mse and torch.equal(covering.weight_max_value, exhaustive.weight_max_value)
    assert few.mse <= minmax.mse and few.mse <= 1.05 * exhaustive.mse
    w = planted(16, 32, torch.rand(16, 1, generator=g) + 0.5, g)
    problem = LinearProblem(planted(512, 32, torch.tensor(0.7), g), w, Budget(1 << 24))
    best, _ = fpq_search(problem, E2M1, E2M1, SearchSpace((0.5, 2.0, 6), weight_refine=2, proxy_rank=8, search_round=2), False)
    assert best.mse < 1e-9
    torch.testing.assert_close(best.weight_max_value, 1.5 * problem.weight_absmax)

