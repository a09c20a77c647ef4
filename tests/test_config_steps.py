"""A config's further search steps (QuantConfig.steps): built from the run's SearchSpace, run on every Linear after
the range search (or MinMax), recorded in the parameter file's metadata, replayed by --only_eval."""

import dataclasses

import pytest
import torch

from conftest import make_tiny, one_line_value_error
from configs import QBits, QuantConfig, get_config
from configs.recipes import RECIPES, recipe
from quant_layers.formats import NVFP4_BLOCKS
from quant_layers.modules import QuantLinear, swap_modules
from quant_layers.quantize import quantize
from utils.params import apply_params, load_params, save_params
from utils.quant_calib import CalibSettings, calibrate, linear_steps
from utils.search.block_scales import BlockScaleStep
from utils.search.gptq import GPTQStep
from utils.search.transforms import TransformError
from utils.search.space import SearchSpace
from utils.search.steps import ActRangeStep, WeightRangeStep

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
QBITS = QBits.parse([4, 4, 16, 2, 2, 2])
W4A4 = QBits.parse([4, 4, 4, 2, 2, 2])
NVFP4_SEARCHED = QuantConfig(name="steps_test", format_kind="fp", search=False, act_channel_shift=False,
                             weight_granularity="per_tensor", block=NVFP4_BLOCKS, embedding=False,
                             steps=(BlockScaleStep,))


def _model():
    model = make_tiny("llama")
    swap_modules(model, embedding=False)
    return model


def test_steps_follow_the_range_search_and_are_built_from_the_space():
    space = SearchSpace((0.5, 1.2, 3), search_round=2)
    fpq = get_config("FPQ_config_llama")
    weight, act, _ = QBITS.formats(fpq)
    steps = linear_steps(CalibSettings(fpq, QBITS, space), weight, act)
    assert [type(s) for s in steps] == [type(steps[0])] + [WeightRangeStep, ActRangeStep] * 2  # shifts, 2 rounds
    with_block_step = QuantConfig(name="x", format_kind="fp", search=True, act_channel_shift=False,
                                  steps=(BlockScaleStep,))
    assert type(linear_steps(CalibSettings(with_block_step, QBITS, space), weight, act)[-1]) is BlockScaleStep
    assert linear_steps(CalibSettings(NVFP4_SEARCHED, QBITS, space), weight, act) == (BlockScaleStep(),)
    assert linear_steps(CalibSettings(NVFP4_SEARCHED, QBITS, None), weight, act) == ()
    assert NVFP4_SEARCHED.uses_search_space and not get_config("NVFP4_config_llama").uses_search_space
    assert NVFP4_SEARCHED.to_dict()["steps"] == ["BlockScaleStep"]
    assert "steps" not in fpq.to_dict()  # files written before steps existed keep matching


def test_block_scale_step_in_calibration_lowers_the_error_and_replays(tmp_path):
    settings = CalibSettings(NVFP4_SEARCHED, QBITS, SearchSpace())
    calibrated = _model()
    layers = calibrate(calibrated, IDS, settings)
    linears = {n: p for n, p in layers.items() if getattr(p, "kind", None) == "linear"}
    assert linears and all(p.weight_block_scale is not None for p in linears.values())
    assert all(p.mse <= p.mse_minmax for p in linears.values())
    assert sum(p.mse < p.mse_minmax for p in linears.values()) >= len(linears) // 2
    # a searched module's weight differs from round to nearest under the data's own block scales
    name, params = next(iter(linears.items()))
    module = calibrated.get_submodule(name)
    assert isinstance(module, QuantLinear)
    rtn = quantize(_model().get_submodule(name).weight.detach(), params.weight_format,
                   params.weight_max_value.view(-1, 1))
    assert not torch.equal(module.weight, rtn)
    save_params(tmp_path / "p.pt", layers, {})
    fresh = _model()
    apply_params(fresh, load_params(tmp_path / "p.pt")[0])
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, calibrated(IDS).logits)


def _recipe_model(architecture: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if architecture == "llama":
        return make_tiny("llama")
    if architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=4,
                                              layer_types=["full_attention"])).eval()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_calibrates_and_replays(tmp_path, name):
    """Each recipe on the tiny llama: every swapped module gets parameters, no Linear ends above MinMax (unless its
    ranges are shared), the steps it lists leave their mark (clips, block scales, codes), and the saved file replays
    identical logits."""
    config = get_config(name)
    assert config is RECIPES[name] and name.split("_")[0] in ("NVFP4", "MXFP4", "FPQ")
    model = _recipe_model("llama")
    swapped = swap_modules(model, config.linear, config.lm_head, config.embedding)
    layers = calibrate(model, IDS, CalibSettings(config, W4A4, SearchSpace((0.5, 1.2, 4), search_round=1)))
    modules = {n: p for n, p in layers.items() if n in swapped}
    assert set(modules) == set(swapped)
    linears = [p for p in modules.values() if p.kind == "linear"]
    # a shared range is a constraint: a Linear whose own MinMax range was smaller may end above its own MinMax
    # (tests/test_act_blocks.py checks the sharing itself)
    assert config.share_input_ranges or all(p.mse <= p.mse_minmax * (1 + 1e-5) for p in linears)
    if GPTQStep in config.steps:
        assert any(p.weight_codes is not None for p in linears)
    if BlockScaleStep in config.steps:
        assert any(p.weight_block_scale is not None for p in linears)
    assert ("model.embed_tokens" in layers) == config.embedding
    save_params(tmp_path / "p.pt", layers, {})
    fresh = _recipe_model("llama")
    swap_modules(fresh, config.linear, config.lm_head, config.embedding)
    apply_params(fresh, load_params(tmp_path / "p.pt")[0])
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("architecture", ["qwen2", "gemma3"])
@pytest.mark.parametrize("name", ["NVFP4_4over6_search_gptq_rot_config_llama", "MXFP4_search_gptq_config_llama",
                                  "FPQ_gptq_rot_fpends_config_llama"])
def test_full_recipes_on_other_architectures(architecture, name):
    """Qwen2 and Gemma3 calibrate the recipes; the residual rotation is refused on Gemma3 with one line."""
    config = get_config(name)
    model = _recipe_model(architecture)
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    settings = CalibSettings(config, W4A4, SearchSpace((0.5, 1.2, 4), search_round=1))
    if architecture == "gemma3" and config.transforms:
        with pytest.raises(TransformError, match="does not support gemma3"):
            calibrate(model, IDS, settings)
        return
    calibrate(model, IDS, settings)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("family, size", [("MXFP4", 32), ("NVFP4", 16)])
def test_block_hadamard_recipes_put_one_blocks_hadamard_on_every_decoder_linear_in_place_of_rot(family, size):
    """MXFP4's had32 and NVFP4's had16 recipes, with every combination of search and gptq (NVFP4: also with 4over6 or
    tensor): BlockHadamard of one block's width on every Linear, no residual rotation, the other components kept; the
    recipes that were there before keep their names and transforms."""
    from quant_layers.formats import MX_BLOCKS, NVFP4_4OVER6_BLOCKS, NVFP4_BLOCKS
    from utils.search.act_blocks import ActBlockClipStep
    from utils.search.residual_rotation import ResidualRotation
    from utils.search.transforms import BlockHadamard

    search = (ActBlockClipStep, BlockScaleStep)
    extras = {"": (MX_BLOCKS if family == "MXFP4" else NVFP4_BLOCKS, False)}
    if family == "NVFP4":
        extras.update({"_4over6": (NVFP4_4OVER6_BLOCKS, False), "_tensor": (NVFP4_BLOCKS, True)})
    expected = {f"{family}{extra}{components}_had{size}{ends}_config_llama": (steps, not ends, *extras[extra])
                for extra in extras
                for components, steps in (("", ()), ("_search", search), ("_gptq", (GPTQStep,)),
                                          ("_search_gptq", search + (GPTQStep,)))
                for ends in ("", "_fpends")}
    block_only = {n for n in RECIPES if n.startswith(family) and "had" in n and "gptqout" not in n and "head" not in n}
    assert block_only == set(expected)
    for name, (steps, ends, block, searched) in expected.items():
        config = RECIPES[name]
        assert config.transforms == (BlockHadamard(size),) and config.block == block and config.search == searched
        assert config.steps == steps and config.lm_head == config.embedding == ends
    assert RECIPES[f"{family}_search_gptq_rot_config_llama"].transforms == (ResidualRotation(),)
    model = _model()
    calibrate(model, IDS, CalibSettings(RECIPES[f"{family}_had{size}_config_llama"], QBITS, None))
    rotated = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_rotation.inner is not None]
    assert len(rotated) == 2 * 7 and "lm_head" not in rotated
    for name in rotated:
        inner = model.get_submodule(name).input_rotation.inner
        assert torch.allclose(inner @ inner.T, torch.eye(size), atol=1e-6) and inner.shape == (size, size)


def test_recipe_refuses_an_unknown_family_or_component():
    """recipe() names what it knows instead of dropping a component it does not (a probe's misspelt base recipe)."""
    assert "MXFP4" in one_line_value_error(lambda: recipe("NVFP5", ("gptq",)))
    message = one_line_value_error(lambda: recipe("NVFP4", ("4over6", "gptqq")))
    assert "NVFP4_4over6_gptqq" in message and "gptq" in message
    assert recipe("NVFP4", ("gptq", "4over6")).name == "NVFP4_4over6_gptq_config_llama"  # COMPONENTS' order


def test_gptqout_recipes_are_their_gptq_twins_aimed_at_the_output():
    """Each recipe with gptqout is the recipe with gptq in its place, the same in every field but the GPTQ step
    (GPTQOutputStep for GPTQStep) and the name; the step records itself by its own name."""
    from utils.search.gptq import GPTQOutputStep

    named = [n for n in RECIPES if "_gptqout" in n]
    assert {n.removesuffix("_config_llama") for n in named} == {
        "NVFP4_gptqout", "NVFP4_4over6_search_gptqout", "NVFP4_4over6_search_gptqout_smooth", "MXFP4_gptqout",
        "MXFP4_gptqout_had32", "FPQ_gptqout_rot"}
    for name in named:
        twin = RECIPES.get(name.replace("_gptqout", "_gptq")) or recipe(
            name.split("_")[0], tuple(name.removesuffix("_config_llama").replace("gptqout", "gptq").split("_")[1:]))
        config = RECIPES[name]
        assert GPTQOutputStep in config.steps and GPTQStep not in config.steps
        assert config.steps == tuple(GPTQOutputStep if s is GPTQStep else s for s in twin.steps)
        assert dataclasses.replace(config, name=twin.name, steps=twin.steps) == twin
        assert config.to_dict()["steps"][-1] == "GPTQOutputStep"

