"""The activation side of block formats and their range search: the losses of block formats and ActBlockClipStep
against brute force (the reference quantizer and a float64 matmul here), the per-tensor range search on NVFP4,
act_block_clip in QuantLinear and the parameter file, configs, calibration, and shared tensor ranges."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from configs import QBits, QuantConfig
from quant_layers.codes import encode
from quant_layers.formats import MX_BLOCKS, NVFP4_4OVER6_BLOCKS, NVFP4_BLOCKS, fp_format, parse_format
from quant_layers.modules import QuantLinear, QuantParams
from quant_layers.quantize import block_scales, quantize
from utils.params import ParamFileError, apply_params, load_params, save_params
from utils.search.act_blocks import ActBlockClipStep
from utils.search.problem import ActCandidates, Budget, LinearProblem
from utils.search.shared_ranges import share_tensor_ranges
from utils.search.space import SearchSpace, range_formats
from utils.search.steps import ActRangeStep, WeightRangeStep, fpq_search, minmax_state

NVFP4, MXFP4 = parse_format("NVFP4"), parse_format("MXFP4")
NVFP4_46 = parse_format("NVFP4_4OVER6")
E4M3_VALUES = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # torch's decode, 0 .. 448


def _f32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _outlier_problem(seed: int, tokens: int = 96, width: int = 64, out: int = 12, budget: int = 1 << 16):
    """Inputs with an outlier channel in every block of 16 (8 times the others, as LLMs' massive activations) whose
    weight column is small (0.05 times the others): clipping the block maxima pays."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    x[:, 3::16] *= 8
    w = torch.randn(out, width, generator=g) * 0.1
    w[:, 3::16] *= 0.05
    return LinearProblem(x, w, Budget(budget)), x, w


def _data_block_scales(w, fmt, row_ranges):
    """The block ranges [out, blocks] quantize derives from w's data (explicit block_scale's encoding)."""
    blocks = w.view(w.shape[0], -1, fmt.block.size)
    return block_scales(blocks.abs().amax(-1, keepdim=True), fmt, row_ranges.view(-1, 1, 1), blocks).squeeze(-1)


def _loss_by_hand(x, w, state: QuantParams, act_max=None, clip="state", weight_max=None, rows=False):
    """|Q_a(X) Q_w(W)^T - X W^T|^2 summed over tokens (per row with rows=True), the product in float64."""
    act_max = state.act_max_value if act_max is None else act_max
    clip = state.act_block_clip if isinstance(clip, str) else clip
    weight_max = state.weight_max_value if weight_max is None else weight_max
    xq = quantize(x, state.act_format, act_max, clip=clip).double()
    wq = quantize(w, state.weight_format, weight_max.view(-1, 1), state.weight_block_scale).double()
    errors = (xq @ wq.T - x.double() @ w.double().T).square().sum(0)
    return errors if rows else errors.sum()


@pytest.mark.parametrize("fmt", [NVFP4, NVFP4_46, MXFP4], ids=lambda f: f.name)
@pytest.mark.parametrize("tokens", [96, 40])  # more and fewer tokens than input channels
def test_block_act_losses_equal_brute_force(fmt, tokens):
    problem, x, w = _outlier_problem(1, tokens=tokens, budget=1 << 14)  # small budget: chunks of tokens and candidates
    state = minmax_state(problem, fmt, fmt, per_tensor_weight=True)
    ranges = torch.tensor([0.3, 0.8, 1.0, 2.0]) * problem.act_absmax
    clips = torch.tensor([1.0, 0.7, 0.9, 0.6])
    losses = problem.act_losses(ActCandidates(fmt, ranges, None, clips), fmt, state.weight_max_value)
    expected = torch.stack([_loss_by_hand(x, w, state, r, c) for r, c in zip(ranges, clips)])
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=0)
    if fmt.has_range:
        assert len(set(expected.tolist())) == 4  # ranges and clips both matter
    clipped = dataclasses.replace(state, act_block_clip=clips[1])  # LinearProblem.loss honours the clip
    assert problem.loss(clipped) == pytest.approx(float(_loss_by_hand(x, w, clipped)) / (tokens * 12), rel=1e-5)


@pytest.mark.parametrize("fmt", [NVFP4, NVFP4_46], ids=lambda f: f.name)
@pytest.mark.parametrize("tokens", [128, 40])  # quadratic form (N >= in) and the direct path (N < in)
def test_per_tensor_weight_losses_equal_brute_force(fmt, tokens):
    problem, x, w = _outlier_problem(2, tokens=tokens, budget=1 << 13)
    state = dataclasses.replace(minmax_state(problem, fmt, fmt, per_tensor_weight=True),
                                act_block_clip=torch.tensor(0.8))
    candidates = SearchSpace((0.3, 1.2, 5)).candidates(fmt, state.weight_max_value)
    losses = problem.weight_losses(fmt, candidates, state)
    expected = torch.stack([_loss_by_hand(x, w, state, weight_max=c, rows=True) for c in candidates])
    torch.testing.assert_close(losses.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.max()))
    step = WeightRangeStep((fmt,), SearchSpace((0.3, 1.2, 5)), per_tensor=True)
    found = step(problem, dataclasses.replace(state, mse=problem.loss(state)))
    best = int(expected.sum(1).argmin())
    assert torch.equal(found.weight_max_value, candidates[best]) and found.act_block_clip == state.act_block_clip
    assert found.mse == pytest.approx(float(expected[best].sum()) / (tokens * 12), rel=1e-4)


def test_weight_range_step_drops_explicit_block_scales_it_did_not_score():
    """The range candidates are scored with the data's block scales: a state whose explicit block scales (here 4 times
    too large) lose to them leaves the step without them, its mse the loss of what it holds."""
    problem, x, w = _outlier_problem(10)
    state = minmax_state(problem, NVFP4, NVFP4, per_tensor_weight=True)
    bad = dataclasses.replace(state, weight_block_scale=4 * _data_block_scales(w, NVFP4, state.weight_max_value))
    bad.mse = problem.loss(bad)
    found = WeightRangeStep((NVFP4,), SearchSpace((0.5, 1.2, 4)), per_tensor=True)(problem, bad)
    assert found.weight_block_scale is None and found.mse < bad.mse
    assert found.mse == pytest.approx(problem.loss(found), rel=1e-5)


def test_act_range_step_on_nvfp4_equals_brute_force_and_skips_mx():
    problem, x, w = _outlier_problem(3)
    space = SearchSpace((0.2, 1.2, 6), act_coarse_tokens=0)
    state = minmax_state(problem, NVFP4, NVFP4, per_tensor_weight=True)
    explicit = _data_block_scales(w, NVFP4, state.weight_max_value) * 2  # a weight step's choice
    state = dataclasses.replace(state, act_block_clip=torch.tensor(0.85), weight_block_scale=explicit)
    state.mse = problem.loss(state)
    found = ActRangeStep((NVFP4,), space)(problem, state)
    ranges = torch.cat([space.candidates(NVFP4, problem.act_absmax), state.act_max_value.view(1)])
    by_hand = torch.stack([_loss_by_hand(x, w, state, act_max=r) for r in ranges])
    assert float(found.act_max_value) == float(ranges[int(by_hand.argmin())]) and found.act_block_clip == 0.85
    assert found.mse == pytest.approx(float(by_hand.min()) / (96 * 12), rel=1e-5) and found.mse <= state.mse
    mx = minmax_state(problem, MXFP4, MXFP4, per_tensor_weight=True)
    assert ActRangeStep((MXFP4,), space)(problem, mx) is mx
    assert WeightRangeStep((MXFP4,), space, True)(problem, mx) is mx


def test_range_formats_keep_block_formats():
    assert range_formats(NVFP4) == (NVFP4,) and range_formats(NVFP4_46) == (NVFP4_46,)
    assert range_formats(MXFP4) == () and [f.name for f in range_formats(fp_format(2, 1))] == ["E3M0", "E2M1", "E1M2"]


def test_fpq_search_on_nvfp4_stays_nvfp4_and_never_above_minmax():
    problem, _, _ = _outlier_problem(4)
    searched, minmax = fpq_search(problem, NVFP4_46, NVFP4_46, SearchSpace((0.3, 1.2, 6), search_round=1), False,
                                  per_tensor_weight=True)
    assert searched.weight_format == NVFP4_46 and searched.act_format == NVFP4_46
    assert searched.mse <= minmax.mse and searched.mse == pytest.approx(problem.loss(searched))
    assert (searched.weight_max_value == searched.weight_max_value[0]).all()


# ActBlockClipStep.

@pytest.mark.parametrize("fmt", [NVFP4, MXFP4, NVFP4_46], ids=lambda f: f.name)
def test_clip_step_equals_brute_force_and_never_raises_the_loss(fmt):
    problem, x, w = _outlier_problem(5)
    step = ActBlockClipStep((0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), coarse_tokens=0)
    start = minmax_state(problem, fmt, fmt, per_tensor_weight=True)
    found = step(problem, start)
    by_hand = {c: float(_loss_by_hand(x, w, start, clip=torch.tensor(c))) for c in step.candidates}
    best = min(by_hand, key=by_hand.get)
    assert best < 1.0  # outliers: clipping pays
    assert float(found.act_block_clip) == _f32(best) and found.mse <= start.mse
    assert found.mse == pytest.approx(by_hand[best] / (96 * 12), rel=1e-5)
    for clip in (0.5, 0.75, 1.0):  # from other states (0.75 is not a candidate: it stays one), never above them
        begun = dataclasses.replace(start, act_block_clip=torch.tensor(clip))
        begun.mse = problem.loss(begun)
        again = step(problem, begun)
        assert again.mse <= begun.mse
    assert step(problem, found) is found  # the best already: kept


def test_clip_step_finds_a_planted_clip():
    """NVFP4 with t = 1 (ranges 6 * 448): every input block is E2M1 values times an E4M3 scale s (its largest 6 s)
    plus, at position 0, an outlier 7.5 s whose weight column is zero; the weights are exact NVFP4 values. Clip 0.8
    puts the block scale at s, so the inliers are exact and the loss is 0; every other candidate leaves error."""
    g = torch.Generator().manual_seed(6)
    tokens, width, out = 64, 64, 8
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

    def exact_blocks(rows, scales):
        v = e2m1[torch.randint(0, 8, (rows, width), generator=g)] * torch.where(
            torch.rand(rows, width, generator=g) < 0.5, -1.0, 1.0)
        v.view(rows, -1, 16)[..., 1] = 6.0
        return (v.view(rows, -1, 16) * scales.unsqueeze(-1)).view(rows, width)

    e4m3 = E4M3_VALUES
    x = exact_blocks(tokens, e4m3[torch.randint(48, 90, (tokens, width // 16), generator=g)])
    x.view(tokens, -1, 16)[..., 0] = 7.5 * x.view(tokens, -1, 16)[..., 1] / 6
    w = exact_blocks(out, e4m3[torch.randint(48, 90, (out, width // 16), generator=g)])
    w[:, ::16] = 0.0
    problem = LinearProblem(x, w, Budget(1 << 16))
    start = QuantParams(NVFP4, torch.full((out,), 6 * 448.0), NVFP4, torch.tensor(6 * 448.0))
    assert torch.equal(quantize(w, NVFP4, start.weight_max_value.view(-1, 1)), w)
    start.mse = problem.loss(start)
    found = ActBlockClipStep((0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0), coarse_tokens=16, refine=2)(problem, start)
    assert float(found.act_block_clip) == _f32(0.8) and found.mse < 1e-12 < start.mse
    assert ActBlockClipStep.from_space(SearchSpace(act_clip_candidates=(0.8,), act_coarse_tokens=0))(
        problem, start).act_block_clip == _f32(0.8)


def test_clip_step_leaves_other_states_alone():
    problem, _, _ = _outlier_problem(7)
    plain = minmax_state(problem, fp_format(2, 1), fp_format(2, 1))
    assert ActBlockClipStep()(problem, plain) is plain
    weight_only_blocks = minmax_state(problem, NVFP4, fp_format(2, 1))
    assert ActBlockClipStep()(problem, weight_only_blocks) is weight_only_blocks
    step = ActBlockClipStep.from_space(SearchSpace(act_clip_candidates=(0.6, 0.9), act_coarse_tokens=128, act_refine=3))
    assert step == ActBlockClipStep((0.6, 0.9), 128, 3)
    with pytest.raises(ValueError, match="positive"):
        SearchSpace(act_clip_candidates=(0.0, 1.0))


# QuantLinear, the parameter file, configs, shared ranges.

def _searched_module_state(fmt=NVFP4):
    problem, x, w = _outlier_problem(8, out=6)
    state = ActBlockClipStep((0.6, 0.8, 1.0), coarse_tokens=0)(problem, minmax_state(problem, fmt, fmt, True))
    assert state.act_block_clip is not None and float(state.act_block_clip) < 1
    return state, x, w


def _model(w):
    net = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    net[0].weight.data.copy_(w)
    net[0] = QuantLinear(net[0])
    return net


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4, NVFP4_46], ids=lambda f: f.name)
def test_quantlinear_honours_the_block_clip(fmt):
    state, x, w = _searched_module_state(fmt)
    module = _model(w)[0]
    module.set_quant_params(state)
    expected = quantize(x, fmt, state.act_max_value, clip=state.act_block_clip) @ \
        quantize(w, fmt, state.weight_max_value.view(-1, 1)).T
    assert torch.equal(module.quantize_input(x), quantize(x, fmt, state.act_max_value, clip=state.act_block_clip))
    torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(module.quantize_input(x), quantize(x, fmt, state.act_max_value))
    plain = QuantParams(fp_format(2, 1), state.weight_max_value, fp_format(2, 1), state.act_max_value,
                        act_block_clip=torch.tensor(0.8))
    with pytest.raises(ValueError, match="block-scaled"):
        _model(w)[0].set_quant_params(plain)


def test_params_round_trip_of_the_block_clip(tmp_path):
    state, x, w = _searched_module_state()
    direct = _model(w)
    direct[0].set_quant_params(state)
    save_params(tmp_path / "p.pt", {"0": state}, {})
    for path in (tmp_path / "p.pt", tmp_path / "p.safetensors"):
        layers, _ = load_params(path)
        assert layers["0"].act_block_clip.dtype == torch.float32 and layers["0"].act_block_clip.shape == ()
        loaded = _model(w)
        apply_params(loaded, layers)
        assert torch.equal(loaded(x), direct(x))
    older = dataclasses.replace(state, act_block_clip=None)  # a file without it: unclipped block maxima
    save_params(tmp_path / "old.pt", {"0": older}, {})
    layers, _ = load_params(tmp_path / "old.pt")
    assert layers["0"].act_block_clip is None
    for bad, words in ((torch.tensor([0.8, 0.9]), "shape"), (torch.tensor(-0.5), "positive"),
                       (torch.tensor(float("nan")), "positive")):
        save_params(tmp_path / "bad.pt", {"0": dataclasses.replace(state, act_block_clip=bad)}, {})
        with pytest.raises(ParamFileError, match="activation block clip"):
            apply_params(_model(w), load_params(tmp_path / "bad.pt")[0])
    plain = dataclasses.replace(state, act_format=fp_format(2, 1))
    save_params(tmp_path / "plain.pt", {"0": plain}, {})
    with pytest.raises(ParamFileError, match="block-scaled activation format"):
        apply_params(_model(w), load_params(tmp_path / "plain.pt")[0])


def test_configs_accept_search_on_tensor_scaled_blocks_only():
    common = dict(format_kind="fp", act_channel_shift=False, weight_granularity="per_tensor")
    QuantConfig(name="nv", search=True, block=NVFP4_BLOCKS, **common)
    QuantConfig(name="nv46", search=True, block=NVFP4_4OVER6_BLOCKS, **common)
    with pytest.raises(ValueError, match="no range"):
        QuantConfig(name="mx", search=True, block=MX_BLOCKS, **common)
    with pytest.raises(ValueError, match="channel shifts"):
        QuantConfig(name="nv", search=False, block=NVFP4_BLOCKS, **{**common, "act_channel_shift": True})
    plain = QuantConfig(name="nv", search=False, block=NVFP4_BLOCKS, **common).to_dict()["block"]
    assert set(plain) == {"size", "scale_format", "tensor_scale"}  # as written before maxima existed
    assert QuantConfig(name="nv46", search=False, block=NVFP4_4OVER6_BLOCKS, **common).to_dict()["block"][
        "maxima"] == (6.0, 4.0)


def test_calibration_searches_nvfp4_tensor_scales():
    """search=True with NVFP4 blocks through calibrate: every Linear keeps NVFP4 (not an unblocked format of its
    width) with one weight range per tensor, and never ends above MinMax; the embedding keeps its blocks too."""
    from conftest import make_llama
    from quant_layers.modules import swap_modules
    from utils.quant_calib import CalibSettings, calibrate

    config = QuantConfig(name="nv", format_kind="fp", search=True, act_channel_shift=False,
                         weight_granularity="per_tensor", block=NVFP4_BLOCKS)
    model = make_llama(120, layers=1)
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    layers = calibrate(model, ids, CalibSettings(config, QBits.parse([4, 4, 4, 2, 2, 2]),
                                                 SearchSpace((0.5, 1.2, 4), search_round=1)))
    for name, p in layers.items():
        assert p.weight_format == NVFP4, name
        if p.kind == "linear":
            assert p.act_format == NVFP4 and (p.weight_max_value == p.weight_max_value[0]).all(), name
            assert p.mse <= p.mse_minmax * (1 + 1e-6), name


def test_shared_tensor_ranges():
    problem, x, w = _outlier_problem(9)
    states = []
    for scale in (1.0, 0.5, 2.0):
        s = minmax_state(LinearProblem(x, w * scale, Budget(1 << 16)), NVFP4, NVFP4, per_tensor_weight=True)
        states.append(dataclasses.replace(s, act_block_clip=torch.tensor(0.7 * scale) if scale < 2 else None))
    shared = share_tensor_ranges(states)
    top = max(float(s.weight_max_value[0]) for s in states)
    for s in shared:
        assert (s.weight_max_value == top).all() and s.act_max_value == states[0].act_max_value
        assert float(s.act_block_clip) == 1.0 and math.isnan(s.mse)  # None counts as 1: the least clipping
    tensor_scales = {float(encode(w, NVFP4, s.weight_max_value.view(-1, 1)).tensor_scale[0]) for s in shared}
    assert len(tensor_scales) == 1  # one float32 tensor scale for the fused weight
    assert share_tensor_ranges(states[:2])[0].act_block_clip == _f32(0.7)
    with pytest.raises(ValueError, match="per-tensor"):
        share_tensor_ranges([minmax_state(problem, NVFP4, NVFP4)] * 2)
    with pytest.raises(ValueError, match="formats"):
        share_tensor_ranges([states[0], dataclasses.replace(states[1], act_format=MXFP4)])
    with pytest.raises(ValueError, match="block scales"):
        share_tensor_ranges([dataclasses.replace(states[0], weight_block_scale=torch.ones(12, 4))])


def test_block_scale_step_on_four_over_six():
    """BlockScaleStep's max-based baseline is the format's own per-block choice (6 or 4): its data scales reproduce
    quantize, and the search never ends above them."""
    from utils.search.block_scales import BlockScaleStep

    problem, x, w = _outlier_problem(11, out=6)
    start = minmax_state(problem, NVFP4_46, NVFP4_46, per_tensor_weight=True)
    _, max_based = BlockScaleStep().candidates(NVFP4_46, w, start.weight_max_value)
    ranges = start.weight_max_value.view(-1, 1)
    assert torch.equal(quantize(w, NVFP4_46, ranges, max_based), quantize(w, NVFP4_46, ranges))
    searched = BlockScaleStep()(problem, start)
    assert searched.mse <= start.mse and searched.weight_block_scale is not None


def test_clip_step_as_a_config_step_calibrates_and_replays(tmp_path):
    """ActBlockClipStep built by calibration from a config's steps (from_space): clips are found and saved, and the
    parameter file rebuilds the same model."""
    from conftest import calibrate_and_replay

    config = QuantConfig(name="clip_test", format_kind="fp", search=False, act_channel_shift=False,
                         weight_granularity="per_tensor", block=NVFP4_BLOCKS, embedding=False,
                         steps=(ActBlockClipStep,))
    layers = calibrate_and_replay(config, QBits.parse([4, 4, 16, 2, 2, 2]), SearchSpace(act_coarse_tokens=0), tmp_path)
    linears = [p for p in layers.values() if getattr(p, "kind", None) == "linear"]
    assert all(p.mse <= p.mse_minmax for p in linears)
    assert any(p.act_block_clip is not None and float(p.act_block_clip) < 1 for p in linears)


def _shared_nvfp4(**changes) -> QuantConfig:
    fields = dict(name="shared_test", format_kind="fp", search=False, act_channel_shift=False,
                  weight_granularity="per_tensor", block=NVFP4_BLOCKS, embedding=False, lm_head=False,
                  share_input_ranges=True)
    return QuantConfig(**{**fields, **changes})


def test_shared_input_ranges_in_calibration(tmp_path):
    """share_input_ranges: q/k/v and gate/up each end with one weight range, the largest |W| among them (MinMax: no
    range search), and one input range, |x|'s maximum; o_proj and down_proj keep their own. Saved and replayed
    identically (calibrate_and_replay); with the range search and the further steps too."""
    from conftest import calibrate_and_replay, make_tiny

    weights = {name: m.weight.detach().abs().max() for name, m in make_tiny("llama").named_modules()
               if isinstance(m, nn.Linear) and ".layers." in name}  # the model calibrate_and_replay builds
    layers = calibrate_and_replay(_shared_nvfp4(), QBits.parse([4, 4, 16, 2, 2, 2]), SearchSpace(), tmp_path)
    groups = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))
    for block in sorted({name.rsplit(".", 2)[0] for name in weights}):
        for group in groups:
            names = [f"{block}.{'self_attn' if g[0] in 'qkvo' else 'mlp'}.{g}" for g in group]
            top = max(float(weights[n]) for n in names)
            for name in names:
                assert torch.equal(layers[name].weight_max_value, torch.full_like(layers[name].weight_max_value, top))
            assert len({float(layers[n].act_max_value) for n in names}) == 1
    searched = calibrate_and_replay(_shared_nvfp4(search=True, steps=(ActBlockClipStep,)),
                                    QBits.parse([4, 4, 16, 2, 2, 2]), SearchSpace((0.5, 1.2, 4), search_round=1),
                                    tmp_path)
    qkv = [p for name, p in searched.items() if name.endswith(("q_proj", "k_proj", "v_proj")) and ".0." in name]
    assert len({float(p.weight_max_value[0]) for p in qkv}) == 1 and len({float(p.act_max_value) for p in qkv}) == 1
    assert all(math.isfinite(p.mse) for p in qkv)


@pytest.mark.parametrize("changes", [dict(weight_granularity="per_channel"), dict(block=MX_BLOCKS)])
def test_shared_input_ranges_refuse_what_has_no_one_range(changes):
    with pytest.raises(ValueError, match="shared input ranges"):
        _shared_nvfp4(**changes)
