"""utils.search.transforms: SmoothQuant keeps every architecture's logits, its inputs match the transformed block,
saved parameters replay exactly, the math is today's formula, and bad input is a one-line ValueError."""

import copy

import pytest
import torch

from conftest import make_tiny, one_line_value_error
from utils.data.architecture import LLAMA, architecture_of
from utils.search import transforms
from utils.search.transforms import SmoothQuant, apply_saved, transform_from_dict

ARCHITECTURES = ["llama", "qwen2", "gemma3"]
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny(name: str) -> torch.nn.Module:
    """make_tiny with every norm weight moved off its init (ones, or zeros for Gemma3) and outlier channels."""
    model = make_tiny(name)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=generator))
        model.get_input_embeddings().weight[:, :4] *= 20
    return model


def capture(model: torch.nn.Module, block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{Linear name in block: its input [tokens, in]}, one tensor object for Linears reading the same tensor."""
    seen, inputs = {}, {}

    def hook(name):
        def record(_module, args):
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, x.detach().reshape(-1, x.shape[-1]).clone())
            inputs[name] = seen[id(x)][1]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in block.named_modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(IDS)
    for handle in handles:
        handle.remove()
    return inputs


def smooth_all(model: torch.nn.Module, smoothing: SmoothQuant) -> dict[str, dict[str, torch.Tensor]]:
    """fit + apply on every block in order; {block index: params}."""
    arch, fitted = architecture_of(model), {}
    for index, block in enumerate(model.model.layers):
        fitted[index] = smoothing.fit(block, capture(model, block), arch)
        smoothing.apply(block, fitted[index], arch)
    return fitted


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_smoothquant_keeps_the_logits(name):
    model = tiny(name)
    with torch.no_grad():
        reference = model(IDS).logits
    fitted = smooth_all(model, SmoothQuant(0.5))
    assert all(len(params) == 2 for params in fitted.values())
    assert max(float(s.max() / s.min()) for params in fitted.values() for s in params.values()) > 2  # not ~1
    with torch.no_grad():
        assert relative_error(model(IDS).logits, reference) < 1e-4


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_transformed_inputs_are_what_the_transformed_block_reads(name, monkeypatch):
    monkeypatch.setattr(transforms, "INPUT_ROWS", 5)  # several row chunks, the last one short
    model, smoothing = tiny(name), SmoothQuant(0.6)
    arch = architecture_of(model)
    for block in model.model.layers:
        inputs = capture(model, block)
        untouched = {n: x.clone() for n, x in inputs.items() if n in arch.unnormed_linears}
        params = smoothing.fit(block, inputs, arch)
        smoothing.apply(block, params, arch)
        smoothing.transform_inputs(params, inputs, arch)
        recaptured = capture(model, block)
        assert inputs.keys() == recaptured.keys()
        for linear_name, x in inputs.items():
            assert relative_error(x, recaptured[linear_name]) < 1e-5, linear_name
        for linear_name, x in untouched.items():
            assert torch.equal(inputs[linear_name], x), linear_name


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_saved_params_replay_exactly(name):
    fitted_model = tiny(name)
    fresh = copy.deepcopy(fitted_model)
    smoothing = SmoothQuant(0.5)
    fitted = smooth_all(fitted_model, smoothing)
    saved = {f"model.layers.{index}.{norm}": s.clone() for index, params in fitted.items() for norm, s in params.items()}
    apply_saved(fresh, transform_from_dict(smoothing.to_dict()), saved)
    fitted_weights, fresh_weights = fitted_model.state_dict(), fresh.state_dict()
    assert fitted_weights.keys() == fresh_weights.keys()
    assert all(torch.equal(fitted_weights[k], fresh_weights[k]) for k in fitted_weights)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_llama_scales_and_fold_are_the_formula(alpha):
    """s_j = max_n |X_nj|^a / max_{i,o} |W_i[o,j]|^(1-a) (float64 here, clamps at 1e-5); fold: w / s, W * s."""
    model = tiny("llama")
    block = model.model.layers[0]
    inputs = capture(model, block)
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    params = SmoothQuant(alpha).fit(block, inputs, LLAMA)
    for norm, linears in LLAMA.norm_linear_pairs:
        x_max = inputs[linears[0]].double().abs().max(dim=0).values
        w_max = torch.stack([before[f"{n}.weight"].double().abs().max(dim=0).values for n in linears]).max(dim=0)
        expected = x_max.clamp(min=1e-5) ** alpha / w_max.values.clamp(min=1e-5) ** (1 - alpha)
        assert params[norm].dtype == torch.float32
        torch.testing.assert_close(params[norm], expected.clamp(min=1e-5).float(), rtol=1e-6, atol=0)
    SmoothQuant(alpha).apply(block, params, LLAMA)
    for norm, linears in LLAMA.norm_linear_pairs:
        s = params[norm]
        assert torch.equal(block.get_submodule(norm).weight, before[f"{norm}.weight"] / s)
        for n in linears:
            assert torch.equal(block.get_submodule(n).weight, before[f"{n}.weight"] * s)


def test_to_dict_round_trip():
    assert SmoothQuant(0.3).to_dict() == {"name": "smoothquant", "alpha": 0.3}
    assert transform_from_dict({"name": "smoothquant", "alpha": 0.3}) == SmoothQuant(0.3)


def test_bad_input_is_a_one_line_value_error():
    assert "rotate" in one_line_value_error(lambda: transform_from_dict({"name": "rotate"}))
    assert "beta" in one_line_value_error(lambda: transform_from_dict({"name": "smoothquant", "beta": 1}))
    for alpha in (0.0, 1.0, -0.5, 1.5, float("nan")):
        assert "alpha" in one_line_value_error(lambda a=alpha: SmoothQuant(a))
    model = tiny("gemma3")
    gemma_block = model.model.layers[0]
    inputs = capture(model, gemma_block)
    message = one_line_value_error(lambda: SmoothQuant().fit(gemma_block, inputs, LLAMA))
    assert "Gemma3DecoderLayer" in message
    message = one_line_value_error(lambda: SmoothQuant().fit(torch.nn.Linear(2, 2), {}, architecture_of(model)))
    assert "Linear" in message
    assert "Linear" in one_line_value_error(lambda: architecture_of(torch.nn.Linear(2, 2)))
    wrong_norm = {"post_attention_layernorm": torch.ones(64)}  # normalises attention's output in Gemma3
    message = one_line_value_error(lambda: SmoothQuant().apply(gemma_block, wrong_norm, architecture_of(model)))
    assert "post_attention_layernorm" in message
    message = one_line_value_error(lambda: apply_saved(model, SmoothQuant(), {"model.norm": torch.ones(64)}))
    assert "model.norm" in message


def formula_scales(x: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s in float64 (the test above's formula), returned in float32."""
    x_max = x.double().abs().max(dim=0).values.clamp(min=1e-5)
    w_max = torch.stack([w.double().abs().max(dim=0).values for w in weights]).max(dim=0).values.clamp(min=1e-5)
    return (x_max ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5).float()


@pytest.mark.parametrize("preferred", [None, 0.3, 0.8])
def test_fitted_strength_takes_the_candidate_the_loss_scores_lowest(preferred):
    """search_alphas: of s = 1 and s(alpha) for each alpha, fit keeps the one whose summed loss(X / s, W_i s) is
    lowest. The loss here knows nothing of quantization: it scores a migrated weight by its distance from the
    weight migrated with `preferred` (None: no migration), so the candidate fit must return is known."""
    model = tiny("llama")
    block = model.model.layers[0]
    inputs = capture(model, block)
    targets = {}
    for norm, linears in LLAMA.norm_linear_pairs:
        weights = [block.get_submodule(n).weight.detach() for n in linears]
        s = torch.ones(weights[0].shape[1]) if preferred is None else formula_scales(inputs[linears[0]], weights,
                                                                                      preferred)
        for n, w in zip(linears, weights):
            targets[n] = w.float() * s
    calls = []

    def loss(x, weight):
        calls.append(x.shape)
        return min(float((weight.float() - target).abs().max()) for target in targets.values()
                   if target.shape == weight.shape)

    params = SmoothQuant(search_alphas=(0.3, 0.5, 0.8)).fit(block, inputs, LLAMA, loss)
    for norm, linears in LLAMA.norm_linear_pairs:
        weights = [block.get_submodule(n).weight.detach() for n in linears]
        expected = torch.ones(weights[0].shape[1]) if preferred is None else formula_scales(
            inputs[linears[0]], weights, preferred)
        torch.testing.assert_close(params[norm], expected, rtol=1e-6, atol=0)
    linears_scored = sum(len(linears) for _, linears in LLAMA.norm_linear_pairs)
    assert len(calls) == 4 * linears_scored  # no migration and three strengths, each Linear after each norm


def test_fitted_strength_never_ends_above_no_migration_and_replays():
    """The fitted strength in NVFP4 on a tiny Llama block: each norm's fitted scales give a round-to-nearest output
    error no higher than no migration or alpha 0.5 (the loss the calibration hands the transform); the scales, folded
    into a fresh copy through the transform's saved settings, give identical logits (tests/test_config_steps.py
    replays whole NVFP4_smoothfit parameter files)."""
    from quant_layers.formats import BLOCK_ALIASES
    from utils.search.problem import Budget
    from utils.search.steps import round_to_nearest_loss
    from utils.search.transforms import migrated_loss

    model = tiny("llama")
    block = model.model.layers[0]
    inputs = capture(model, block)
    fmt = BLOCK_ALIASES["NVFP4"]
    loss = round_to_nearest_loss(fmt, fmt, True, Budget(2**28))
    fitted = SmoothQuant(search_alphas=(0.2, 0.5, 0.8)).fit(block, inputs, LLAMA, loss)
    for norm, linears in LLAMA.norm_linear_pairs:
        weights = [block.get_submodule(n).weight for n in linears]
        x = inputs[linears[0]]
        chosen = migrated_loss(x, weights, fitted[norm], loss)
        assert chosen <= migrated_loss(x, weights, torch.ones_like(fitted[norm]), loss)
        assert chosen <= migrated_loss(x, weights, formula_scales(x, weights, 0.5), loss) * (1 + 1e-6)
    smoothing = SmoothQuant(search_alphas=(0.2, 0.5, 0.8))
    assert smoothing.to_dict() == {"name": "smoothquant", "alpha": 0.5, "search_alphas": (0.2, 0.5, 0.8)}
    assert transform_from_dict({"name": "smoothquant", "alpha": 0.5, "search_alphas": [0.2, 0.5, 0.8]}) == smoothing
    fresh = copy.deepcopy(model)
    smoothing.apply(block, fitted, LLAMA)
    saved = {f"model.layers.0.{norm}": s.clone() for norm, s in fitted.items()}
    apply_saved(fresh, transform_from_dict(smoothing.to_dict()), saved)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, fresh(IDS).logits)


def test_fitted_strength_without_a_loss_or_with_a_bad_alpha_is_one_line():
    model = tiny("llama")
    block = model.model.layers[0]
    message = one_line_value_error(lambda: SmoothQuant(search_alphas=(0.5,)).fit(block, capture(model, block), LLAMA))
    assert "search_alphas" in message
    assert "alpha" in one_line_value_error(lambda: SmoothQuant(search_alphas=(0.5, 1.0)))
