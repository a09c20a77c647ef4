"""utils.search.transforms.BlockHadamard and utils.search.residual_rotation.ResidualRotation on tiny random llama,
qwen2 and gemma3 models (gemma3 refused by ResidualRotation), float32 and float64: full-precision logits are kept,
the block Hadamard's transformed inputs are what the quantizer reads, saved params replay to identical weights (through
a parameter file for the block transform), SmoothQuant composes with both, bad settings are a one-line ValueError."""

import pytest
import torch

from conftest import make_tiny, one_line_value_error
from quant_layers.hadamard import hadamard_matrix, random_signs
from quant_layers.modules import swap_modules, untie_head
from utils.data.architecture import architecture_of, head_architecture
from utils.params import TransformParams, apply_params, load_params, save_params
from utils.search import transforms
from utils.search.residual_rotation import ResidualRotation, model_transform_from_dict
from utils.search.transforms import BlockHadamard, SmoothQuant, apply_saved, transform_from_dict

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
# Hugging Face's RMSNorm normalises in float32 even in a float64 model: a rotated residual stream changes that rounding
RESIDUAL_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}


def tiny(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """make_tiny, swapped to QuantLinear (full precision), norms moved off their init, outlier channels."""
    model = make_tiny(name).to(dtype)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=generator).to(dtype))
        model.get_input_embeddings().weight[:, :4] *= 20
    swap_modules(model)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def capture(model: torch.nn.Module, block: torch.nn.Module, rotated: bool = False) -> dict[str, torch.Tensor]:
    """{Linear name in block: its input [tokens, in]} (rotated: what its input rotation hands the quantizer); Linears
    reading one tensor share one captured tensor."""
    seen, inputs = {}, {}

    def hook(name):
        def record(_module, args, output=None):
            x = args[0] if output is None else output
            if id(x) not in seen:
                seen[id(x)] = (x, x.detach().reshape(-1, x.shape[-1]).clone())
            inputs[name] = seen[id(x)][1]
        return record

    linears = {n: m for n, m in block.named_modules() if hasattr(m, "input_rotation")}
    handles = [m.input_rotation.register_forward_hook(hook(n)) if rotated else m.register_forward_pre_hook(hook(n))
               for n, m in linears.items()]
    logits(model)
    for handle in handles:
        handle.remove()
    return inputs


def fit_blocks(model: torch.nn.Module, transform) -> dict[str, torch.Tensor]:
    """fit + apply on every block in order; the params keyed by full module names."""
    arch, saved = architecture_of(model), {}
    for index, block in enumerate(model.model.layers):
        params = transform.fit(block, capture(model, block), arch)
        transform.apply(block, params, arch)
        saved.update({f"model.layers.{index}.{name}": value.clone() for name, value in params.items()})
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, size, linears", [("llama", 16, None), ("qwen2", 32, None), ("gemma3", 32, None),
                                                 ("llama", 64, ("mlp.down_proj", "self_attn.o_proj"))])


def test_block_hadamard_keeps_the_logits(name, size, linears, dtype):
    model = tiny(name, dtype)
    reference = logits(model)
    saved = fit_blocks(model, BlockHadamard(size, linears))
    assert len(saved) == 2 * (len(linears) if linears else 7)
    assert relative_error(logits(model), reference) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_block_hadamard_inputs_are_what_the_quantizer_reads(name, monkeypatch):
    monkeypatch.setattr(transforms, "INPUT_ROWS", 5)  # several row chunks, the last one short
    model, rotation = tiny(name), BlockHadamard(16, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "mlp.down_proj"))
    arch = architecture_of(model)
    for block in model.model.layers:
        inputs = capture(model, block)
        params = rotation.fit(block, inputs, arch)
        rotation.apply(block, params, arch)
        before = {n: x.clone() for n, x in inputs.items()}
        rotation.transform_inputs(params, inputs, arch)
        recaptured = capture(model, block, rotated=True)
        assert inputs.keys() == recaptured.keys()
        for linear_name, x in inputs.items():
            assert relative_error(x, recaptured[linear_name]) < 1e-5, linear_name
            assert torch.equal(x, before[linear_name]) == (linear_name in ("self_attn.o_proj", "mlp.gate_proj",
                                                                           "mlp.up_proj")), linear_name


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_block_hadamard_with_smoothquant_replays_from_a_parameter_file(name, tmp_path):
    """SmoothQuant then BlockHadamard, saved as TransformParams, loaded and replayed by utils.params with the
    transforms' default settings: identical weights and buffers."""
    fitted, fresh = tiny(name), tiny(name)
    fresh.load_state_dict(fitted.state_dict())
    layers = {}
    for index, block in enumerate(fitted.model.layers):
        arch, prefix = architecture_of(block), f"model.layers.{index}."
        for transform in (SmoothQuant(0.5), BlockHadamard(16)):
            params = transform.fit(block, capture(fitted, block), arch)
            transform.apply(block, params, arch)
            layers.update({prefix + n: TransformParams(transform.to_dict(), v.clone()) for n, v in params.items()})
    save_params(tmp_path / "p.pt", layers, {})
    loaded, _ = load_params(tmp_path / "p.pt")
    apply_params(fresh, loaded)
    fitted_state, fresh_state = fitted.state_dict(), fresh.state_dict()
    assert fitted_state.keys() == fresh_state.keys()
    assert sum(k.endswith("input_rotation.inner") for k in fresh_state) == 14
    assert all(torch.equal(fitted_state[k], fresh_state[k]) for k in fitted_state)


def test_block_hadamard_before_smoothquant_is_refused():
    model = tiny("llama")
    fit_blocks(model, BlockHadamard(16))
    block = model.model.layers[0]
    message = one_line_value_error(lambda: SmoothQuant().fit(block, capture(model, block), architecture_of(block)))
    assert "SmoothQuant must come before BlockHadamard" in message


def test_block_hadamard_bad_settings_are_a_one_line_value_error():
    for size in (0, 1, 24, 48.0):
        assert "power of two" in one_line_value_error(lambda s=size: BlockHadamard(s))
    assert "at least one" in one_line_value_error(lambda: BlockHadamard(16, ()))
    assert "sizes" in one_line_value_error(lambda: transform_from_dict({"name": "block_hadamard", "sizes": 2}))
    model = tiny("llama")
    block, arch = model.model.layers[0], architecture_of(model)
    inputs = capture(model, block)
    assert "does not divide" in one_line_value_error(lambda: BlockHadamard(128).fit(block, inputs, arch))
    assert "rotate both or neither" in one_line_value_error(
        lambda: BlockHadamard(16, ("self_attn.q_proj",)).fit(block, inputs, arch))
    assert "'mlp.fc1'" in one_line_value_error(lambda: BlockHadamard(16, ("mlp.fc1",)).fit(block, inputs, arch))
    x = torch.ones(2, 96)
    message = one_line_value_error(lambda: apply_saved(model, BlockHadamard(), {"model.layers.0.mlp.up_proj": x}))
    assert "input_rotation" in message
    not_hadamard = {"mlp.down_proj.input_rotation": hadamard_matrix(16)}  # normalised: not the saved +-1 matrix
    assert "not a +-1 Hadamard" in one_line_value_error(lambda: BlockHadamard().apply(block, not_hadamard, arch))
    signs = {"mlp.down_proj.input_rotation": hadamard_matrix(16, normalized=False)}
    BlockHadamard().apply(block, signs, arch)
    assert "already rotates" in one_line_value_error(lambda: BlockHadamard().apply(block, signs, arch))
    plain_block = make_tiny("llama").model.layers[0]
    assert "swap_modules" in one_line_value_error(lambda: BlockHadamard(16).fit(plain_block, {}, arch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, rotation", [
    ("llama", ResidualRotation(seed=1)),
    ("qwen2", ResidualRotation(seed=2)),
    ("llama", ResidualRotation(seed=3, hidden_block=16, down_proj_block=32)),
    ("qwen2", ResidualRotation(seed=4, online_down_proj=False)),
])


def test_residual_rotation_keeps_the_logits(name, rotation, dtype):
    model = tiny(name, dtype)
    reference = logits(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rotation.apply(model, rotation.fit(model))
    assert relative_error(logits(model), reference) < RESIDUAL_TOLERANCE[dtype]
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert all(bool((norm.weight == 1).all()) for n, norm in model.named_modules() if n.endswith("norm"))
    assert (model.model.layers[0].mlp.down_proj.input_rotation.inner is not None) == rotation.online_down_proj
    if tied:  # lm-eval calls tie_weights(): it must not join the rotated head and table again
        model.tie_weights()
        assert relative_error(logits(model), reference) < RESIDUAL_TOLERANCE[dtype]


def test_residual_rotation_of_widths_that_are_not_powers_of_two():
    """hidden 48 = 12 x 4 and intermediate 80 = 20 x 4: Paley Hadamards of full width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    swap_modules(model)
    reference = logits(model)
    rotation = ResidualRotation(seed=5)
    rotation.apply(model, rotation.fit(model))
    assert model.model.layers[0].mlp.down_proj.input_rotation.outer.shape == (20, 20)
    assert relative_error(logits(model), reference) < 1e-4


def test_residual_rotation_replays_exactly():
    fitted, fresh = tiny("llama"), tiny("llama")
    fresh.load_state_dict(fitted.state_dict())
    rotation = ResidualRotation(seed=7, down_proj_block=64)
    params = rotation.fit(fitted)
    rotation.apply(fitted, params)
    model_transform_from_dict(rotation.to_dict()).apply(fresh, {k: v.clone() for k, v in params.items()})
    fitted_state, fresh_state = fitted.state_dict(), fresh.state_dict()
    assert fitted_state.keys() == fresh_state.keys()
    assert all(torch.equal(fitted_state[k], fresh_state[k]) for k in fitted_state)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_residual_rotation_and_smoothquant_in_either_order_keep_the_logits(name):
    rotated_first, smoothed_first = tiny(name), tiny(name)
    smoothed_first.load_state_dict(rotated_first.state_dict())
    reference = logits(rotated_first)
    rotation = ResidualRotation(seed=1)
    rotation.apply(rotated_first, rotation.fit(rotated_first))
    fit_blocks(rotated_first, SmoothQuant(0.5))
    fit_blocks(rotated_first, BlockHadamard(16, ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")))
    fit_blocks(smoothed_first, SmoothQuant(0.5))
    rotation.apply(smoothed_first, rotation.fit(smoothed_first))
    assert relative_error(logits(rotated_first), reference) < 1e-4
    assert relative_error(logits(smoothed_first), reference) < 1e-4


def test_residual_rotation_bad_settings_are_a_one_line_value_error():
    assert "hidden_block" in one_line_value_error(lambda: ResidualRotation(hidden_block=12))
    assert "seeds" in one_line_value_error(lambda: model_transform_from_dict({"name": "residual_rotation", "seeds": 1}))
    model = tiny("llama")
    assert "does not divide" in one_line_value_error(lambda: ResidualRotation(hidden_block=128).fit(model))
    assert "down_proj_block" in one_line_value_error(lambda: ResidualRotation(down_proj_block=256).fit(model))
    assert "signs" in one_line_value_error(lambda: ResidualRotation().apply(model, {"signs": torch.ones(63)}))
    signs = {"mlp.down_proj.input_rotation": hadamard_matrix(16, normalized=False)}
    BlockHadamard().apply(model.model.layers[1], signs, architecture_of(model))
    assert "already rotates" in one_line_value_error(lambda: ResidualRotation().fit(model))
    assert "gemma3" in one_line_value_error(lambda: ResidualRotation().fit(tiny("gemma3")))
    plain = make_tiny("llama")
    reference = logits(plain)
    assert "swap_modules" in one_line_value_error(lambda: ResidualRotation().apply(plain, {"signs": torch.ones(64)}))
    assert torch.equal(logits(plain), reference)  # refused before any change
    ResidualRotation(online_down_proj=False).apply(plain, {"signs": random_signs(64, 0)})
    assert relative_error(logits(plain), reference) < 1e-4


def test_config_with_a_model_rotation_calibrates_replays_and_resumes(tmp_path):
    """A config listing ResidualRotation first and block transforms after: calibrate() folds the rotation in before
    anything is calibrated and saves its signs; apply_params on a fresh model (model transform, block transforms,
    modules) gives identical logits, and so does a run interrupted after block 0 and resumed from its checkpoint."""
    from configs import QBits, QuantConfig
    from utils.params import Checkpoint, load_checkpoint
    from utils.quant_calib import CalibSettings, calibrate
    from utils.search.space import SearchSpace

    class StopAfterBlock0(Checkpoint):
        def save(self, layers, next_block):
            super().save(layers, next_block)
            if next_block == 1:
                raise KeyboardInterrupt

    config = QuantConfig(name="rotation_test", format_kind="fp", search=True, act_channel_shift=True,
                         transforms=(ResidualRotation(seed=3), SmoothQuant(0.5),
                                     BlockHadamard(16, ("self_attn.o_proj",))))
    settings = CalibSettings(config, QBits.parse([4, 4, 4, 2, 2, 2]), SearchSpace((0.5, 1.2, 3), search_round=1))
    calibrated = tiny("llama")
    layers = calibrate(calibrated, IDS, settings)
    assert torch.equal(layers["residual_rotation"].value, random_signs(64, 3))
    assert sum(isinstance(p, TransformParams) for p in layers.values()) == 1 + 2 * 3  # signs; 2 norms + o_proj x 2
    save_params(tmp_path / "p.pt", layers, {})
    fresh = tiny("llama")
    apply_params(fresh, load_params(tmp_path / "p.pt")[0])
    assert torch.equal(logits(fresh), logits(calibrated))
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny("llama"), IDS, settings, StopAfterBlock0(tmp_path / "c.partial.pt", {}))
    saved_layers, saved = load_checkpoint(tmp_path / "c.partial.pt")
    resumed = tiny("llama")
    calibrate(resumed, IDS, settings, Checkpoint(tmp_path / "c.partial.pt", {}, saved_layers, saved["next_block"]))
    assert torch.equal(logits(resumed), logits(calibrated))
    with pytest.raises(ValueError, match="model-wide transforms come first"):
        QuantConfig(name="bad", format_kind="fp", search=False, act_channel_shift=False,
                    transforms=(SmoothQuant(0.5), ResidualRotation()))


def test_calibration_with_rotations_replays_from_its_parameter_file(tmp_path):
    """The route proposed for utils/quant_calib.py: ResidualRotation after swap_modules and before calibrate(), the
    block transforms from the config; replay = the model transform, then apply_params. Identical logits."""
    from configs import QBits, QuantConfig
    from utils.quant_calib import CalibSettings, calibrate

    config = QuantConfig(name="rotation_test", format_kind="int", search=False, act_channel_shift=False,
                         transforms=(SmoothQuant(0.5), BlockHadamard(16, ("self_attn.o_proj",))))
    settings = CalibSettings(config, QBits.parse([4, 4, 4, 2, 2, 2]), None)
    calibrated, fresh = tiny("llama"), tiny("llama")
    fresh.load_state_dict(calibrated.state_dict())
    rotation = ResidualRotation(seed=0)
    saved_signs = rotation.fit(calibrated)
    rotation.apply(calibrated, saved_signs)
    layers = calibrate(calibrated, IDS, settings)
    assert sum(isinstance(p, TransformParams) for p in layers.values()) == 2 * 3  # 2 norms + o_proj, 2 blocks
    save_params(tmp_path / "p.pt", layers, {})
    model_transform_from_dict(rotation.to_dict()).apply(fresh, saved_signs)
    apply_params(fresh, load_params(tmp_path / "p.pt")[0])
    assert torch.equal(logits(fresh), logits(calibrated))


def test_calibration_reads_down_proj_inputs_after_the_online_hadamard():
    """ResidualRotation folds K into down_proj's weight and rotates its input online: calibration must range and
    search the input the weight multiplies, z K, not z. Block 0's z is the plain model's (its inputs are the rotated
    embedding, unquantized at 16 bits); K from scipy's Sylvester matrix, the MinMax range amax|z K|."""
    from scipy.linalg import hadamard

    from configs import QBits
    from configs.recipes import RECIPES
    from utils.quant_calib import CalibSettings, calibrate

    plain = tiny("llama")
    down_proj = plain.model.layers[0].mlp.down_proj
    z = capture(plain, plain.model.layers[0])["mlp.down_proj"].double()
    width = down_proj.in_features
    expected = (z @ torch.tensor(hadamard(width), dtype=torch.float64) / width**0.5).abs().max()
    assert not torch.isclose(expected, z.abs().max(), rtol=0.05)  # the test tells the two apart
    settings = CalibSettings(RECIPES["NVFP4_rot_config_llama"], QBits.parse([4, 4, 16, 2, 2, 2]), None)
    layers = calibrate(tiny("llama"), IDS, settings)
    got = layers["model.layers.0.mlp.down_proj"].act_max_value.double()
    assert torch.isclose(got, expected, rtol=1e-5), (float(got), float(expected), float(z.abs().max()))


def head_input(model: torch.nn.Module) -> torch.Tensor:
    """The output head's input [tokens, hidden] (the final norm's output), captured before any input rotation."""
    captured = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone()))
    logits(model)
    handle.remove()
    return captured[0]


HEAD_TRANSFORMS = [SmoothQuant(0.5, at_head=True), BlockHadamard(16, at_head=True), BlockHadamard(32, at_head=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("transform", HEAD_TRANSFORMS, ids=["smooth", "had16", "had32"])
def test_head_transforms_keep_the_logits_and_the_tied_embedding(name, transform, dtype):
    """SmoothQuant / BlockHadamard at the head (model as block, head_architecture): logits kept, the embedding a tied
    head shared keeps its values (the head gets its own weight), the transformed input is what the head's quantizer
    reads, and the saved params replay (apply_saved) to identical weights on a fresh model."""
    model = tiny(name, dtype)
    fresh = tiny(name, dtype)
    fresh.load_state_dict(model.state_dict())
    if name == "llama":
        assert model.lm_head.weight is model.model.embed_tokens.weight  # the case untying is for
    embedding = model.get_input_embeddings().weight.detach().clone()
    reference, x = logits(model), head_input(model)
    arch = head_architecture(model)
    assert arch.norm_linear_pairs == (("model.norm", ("lm_head",)),) and arch.unnormed_linears == ()
    untie_head(model)
    params = transform.fit(model, {"lm_head": x}, arch)
    transform.apply(model, params, arch)
    transform.transform_inputs(params, {"lm_head": x}, arch)
    tolerance = RESIDUAL_TOLERANCE if isinstance(transform, SmoothQuant) else TOLERANCE  # its fold is float32 math
    assert relative_error(logits(model), reference) < tolerance[dtype]
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    quantizer_input = []
    handle = model.lm_head.input_rotation.register_forward_hook(
        lambda _m, _a, out: quantizer_input.append(out.detach().reshape(-1, out.shape[-1])))
    logits(model)
    handle.remove()
    assert relative_error(x, quantizer_input[0]) < 1e-5
    apply_saved(fresh, transform_from_dict(transform.to_dict()), {k: v.clone() for k, v in params.items()})
    state, fresh_state = model.state_dict(), fresh.state_dict()
    assert state.keys() == fresh_state.keys() and all(torch.equal(state[k], fresh_state[k]) for k in state)


def test_head_transforms_are_the_formulas():
    """At the head of the tied tiny llama, float64: SmoothQuant's s_j = max|x_j|^0.5 / max|W_j|^0.5, the final norm's
    w / s and W s (folded in float32); BlockHadamard(32)'s W diag(H, H) with H scipy's Sylvester matrix / sqrt(32),
    online the same H."""
    from scipy.linalg import hadamard

    model = tiny("llama", torch.float64)
    x, weight, gain = head_input(model), model.lm_head.weight.detach().clone(), model.model.norm.weight.detach().clone()
    arch = head_architecture(model)
    smoothing = SmoothQuant(0.5, at_head=True)
    s = smoothing.fit(model, {"lm_head": x}, arch)["model.norm"]
    expected = x.abs().max(dim=0).values.clamp(min=1e-5) ** 0.5 / weight.abs().max(dim=0).values.clamp(min=1e-5) ** 0.5
    torch.testing.assert_close(s.double(), expected, rtol=1e-6, atol=0)
    smoothing.apply(model, {"model.norm": s}, arch)
    torch.testing.assert_close(model.model.norm.weight, gain / s.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(model.lm_head.weight, weight * s.double(), rtol=1e-6, atol=0)  # float32 math
    weight = model.lm_head.weight.detach().clone()
    rotation = BlockHadamard(32, at_head=True)
    rotation.apply(model, rotation.fit(model, {"lm_head": x}, arch), arch)
    h = torch.tensor(hadamard(32), dtype=torch.float64) / 32 ** 0.5
    torch.testing.assert_close(model.lm_head.weight, weight @ torch.block_diag(h, h), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.lm_head.input_rotation.inner, h, rtol=0, atol=1e-15)


@pytest.mark.parametrize("recipe_name", ["NVFP4_headsmooth", "MXFP4_headsmooth_headhad32"])
def test_head_recipes_calibrate_the_transformed_head_and_replay(recipe_name, tmp_path):
    """calibrate() with a head recipe: the head's parameters are searched on the transformed input (NVFP4's tensor
    range is max|x / s| from the formula on the plain model's head input), the embedding's quantized table is the one
    the recipe without head transforms gives (the tied embedding is untouched), and the parameter file replays to
    identical logits."""
    from configs import QBits, get_config
    from configs.recipes import RECIPES
    from utils.quant_calib import CalibSettings, calibrate

    config, qbits = RECIPES[f"{recipe_name}_config_llama"], QBits.parse([4, 4, 4, 2, 2, 2])
    x = head_input(tiny("llama"))
    model = tiny("llama")
    layers = calibrate(model, IDS, CalibSettings(config, qbits, None))
    assert {n for n, p in layers.items() if isinstance(p, TransformParams)} == (
        {"model.norm"} | ({"lm_head.input_rotation"} if "headhad32" in recipe_name else set()))
    if recipe_name == "NVFP4_headsmooth":
        s = layers["model.norm"].value.double()
        expected = x.double().abs().max(dim=0).values ** 0.5 / tiny("llama").lm_head.weight.double().abs().max(
            dim=0).values ** 0.5
        torch.testing.assert_close(s, expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(layers["lm_head"].act_max_value.double(), (x.double() / s).abs().max(), rtol=1e-5,
                                   atol=0)
    plain = tiny("llama")  # the family's round to nearest: the same embedding search, no head transform
    calibrate(plain, IDS, CalibSettings(get_config(recipe_name.split("_")[0] + "_config_llama"), qbits, None))
    assert torch.equal(model.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    save_params(tmp_path / "p.pt", layers, {})
    fresh = tiny("llama")
    apply_params(fresh, load_params(tmp_path / "p.pt")[0])
    assert torch.equal(logits(fresh), logits(model))
    assert not torch.equal(logits(fresh), logits(plain))


def test_head_transforms_settings_and_bad_input():
    """to_dict keeps block transforms' dicts as before (no at_head key) and round-trips at_head; a config with a head
    transform and an unquantized head, a second rotation of the head, SmoothQuant after it, or a head transform on a
    model without an adapter is one line."""
    from configs import QuantConfig

    assert "at_head" not in SmoothQuant(0.5).to_dict() and "at_head" not in BlockHadamard(16).to_dict()
    for transform in HEAD_TRANSFORMS:
        assert transform_from_dict(transform.to_dict()) == transform and transform.scope == "head"
    assert SmoothQuant(0.5).scope == BlockHadamard(16).scope == "block"
    message = one_line_value_error(lambda: QuantConfig(name="bad", format_kind="fp", search=False,
                                                       act_channel_shift=False, lm_head=False,
                                                       transforms=(SmoothQuant(at_head=True),)))
    assert "lm_head" in message
    model = tiny("llama")
    arch = head_architecture(model)
    signs = {"lm_head.input_rotation": hadamard_matrix(16, torch.float32, normalized=False)}
    BlockHadamard(16, at_head=True).apply(model, signs, arch)
    assert "already rotates" in one_line_value_error(lambda: BlockHadamard(16, at_head=True).apply(model, signs, arch))
    assert "before BlockHadamard" in one_line_value_error(
        lambda: SmoothQuant(at_head=True).fit(model, {"lm_head": head_input(model)}, arch))
    assert "no architecture adapter" in one_line_value_error(lambda: head_architecture(torch.nn.Linear(2, 2)))
