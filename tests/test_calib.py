"""Block-by-block calibration on tiny generated models of several architectures."""

import pytest
import torch

from configs import CONFIG_FILES, QBits, get_config
from conftest import make_llama
from quant_layers.modules import QuantEmbedding, QuantLinear, swap_modules
from quant_layers.quantize import quantize
from utils.params import TransformParams
from utils.quant_calib import CalibrationError, CalibSettings, _check_finite, calibrate
from utils.search.space import SearchSpace

IDS = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(0))
W4A4 = QBits.parse([4, 4, 4, 2, 2, 2])


def tiny(architecture: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if architecture == "llama":
        return make_llama(96)
    if architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).eval()
    config = Gemma3TextConfig(**common, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


def settings(config_name="FPQ_config_llama", qbits=W4A4, sequential=False, space="max"):
    config = get_config(config_name)
    search = SearchSpace((0.2, 1.2, 5), search_round=2, search_space=space) if config.search else None
    return config, CalibSettings(config, qbits, search, sequential=sequential)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("config_name", CONFIG_FILES)
def test_every_config_on_every_architecture(architecture, config_name):
    model = tiny(architecture)
    with torch.no_grad():
        reference = model(IDS).logits
    config, setting = settings(config_name)
    swapped = swap_modules(model, config.linear, config.lm_head, config.embedding)
    layers = calibrate(model, IDS, setting)
    transforms = {n for n, p in layers.items() if isinstance(p, TransformParams)}
    assert set(layers) - transforms == set(swapped)  # every swapped module got parameters
    assert len(transforms) == 2 * 2 * len(config.transforms)  # SmoothQuant: two norms in each of the two blocks
    assert all(m.is_quantized for m in swapped.values())
    for name, p in layers.items():
        if name not in transforms and p.kind == "linear":
            assert p.mse <= p.mse_minmax * (1 + 1e-4), name
            if not config.act_channel_shift:
                assert p.act_channel_shift is None
    if config.act_channel_shift:  # FPQ may keep the shift-free MinMax state where shifts lose, but not everywhere
        assert any(p.act_channel_shift is not None for n, p in layers.items()
                   if n not in transforms and p.kind == "linear")
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, reference)


def test_tied_embedding_and_head_are_quantized_separately():
    model = make_llama(96, tied=True)
    original = model.model.embed_tokens.weight.detach().clone()
    _, setting = settings()
    swap_modules(model)
    layers = calibrate(model, IDS, setting)
    embedding = layers["model.embed_tokens"]
    expected = quantize(original, embedding.weight_format, embedding.weight_max_value.view(-1, 1))
    assert torch.equal(model.model.embed_tokens.weight, expected)
    assert not torch.equal(model.lm_head.weight, expected)


def test_sixteen_bits_leave_that_part_in_full_precision():
    model = make_llama(96)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    _, setting = settings(qbits=QBits.parse([16, 4, 16, 2, 2, 2]))
    swap_modules(model)
    layers = calibrate(model, IDS, setting)
    assert not isinstance(model.get_input_embeddings(), QuantEmbedding) or "model.embed_tokens" not in layers
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert module.weight_format is None and module.act_format is not None
            assert torch.equal(module.weight, weights[name])


def test_sequential_calibration_sees_quantized_inputs():
    _, independent = settings()
    _, sequential = settings(sequential=True)
    ranges = []
    for setting in (independent, sequential):
        model = make_llama(96)
        swap_modules(model)
        layers = calibrate(model, IDS, setting)
        ranges.append(layers["model.layers.1.self_attn.q_proj"].act_max_value)
        first = layers["model.layers.0.self_attn.q_proj"]
        if setting.sequential:
            # Block 0 sees the quantized embedding in sequential mode: its input range differs.
            assert not torch.equal(first.act_max_value, first_independent)
        first_independent = first.act_max_value
    assert not torch.equal(ranges[0], ranges[1])


def test_bias_search_space_runs_and_never_loses_to_minmax():
    model = make_llama(96)
    _, setting = settings(space="bias")
    swap_modules(model)
    layers = calibrate(model, IDS, setting)
    assert all(p.mse <= p.mse_minmax * (1 + 1e-4) for p in layers.values() if p.kind == "linear")


def test_non_finite_activations_stop_and_name_the_layer():
    model = make_llama(96)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    _, setting = settings()
    swap_modules(model)
    with pytest.raises(CalibrationError, match=r"model.layers.1.mlp.down_proj|block 1"):
        calibrate(model, IDS, setting)


def test_non_finite_check_tells_nan_from_inf():
    x = torch.zeros(3, 4, dtype=torch.bfloat16)
    _check_finite("the input of L", x)
    x[1, 2] = -float("inf")
    with pytest.raises(CalibrationError, match="^Inf in the input of L during calibration"):
        _check_finite("the input of L", x)
    x[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="^NaN in the input of L during calibration"):
        _check_finite("the input of L", x)


def test_capture_shares_one_buffer_per_distinct_input():
    """q/k/v read one tensor and gate/up another: one buffer each; o_proj and down_proj get their own, equal to
    what a plain hook sees (no buffer is matched by a reused memory address)."""
    from quant_layers.modules import swap_modules
    from utils.data.architecture import decoder_layers
    from utils.quant_calib import capture_inputs, first_block_inputs

    model = make_llama(300, layers=2)
    swap_modules(model)
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    blocks = decoder_layers(model)
    hidden, kwargs = first_block_inputs(model, blocks, ids, None)
    block = blocks[0]
    linears = {n: m for n, m in block.named_modules() if hasattr(m, "set_quant_params")}
    seen = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in linears.items()]
    _, inputs = capture_inputs(block, hidden, kwargs[0], linears)
    for h in handles:
        h.remove()
    assert inputs["self_attn.q_proj"] is inputs["self_attn.k_proj"] is inputs["self_attn.v_proj"]
    assert inputs["mlp.gate_proj"] is inputs["mlp.up_proj"]
    assert len({id(t) for t in inputs.values()}) == 4
    for name, chunks in seen.items():
        assert torch.equal(inputs[name], torch.cat(chunks)), name


def test_smoothquant_keeps_the_function_and_flattens_the_inputs():
    """Folding s into the norm and the Linears leaves the block's output unchanged (up to float32 rounding)
    and divides each input channel's maximum by s: the channel maxima become max|X|^(1-a) max|W|^(1-a)."""
    from utils.data.architecture import LLAMA
    from utils.search.transforms import SmoothQuant, migration_scales

    model = make_llama(96, layers=1)
    block = model.model.layers[0]
    x = torch.randn(2, 8, 64) * torch.exp2(torch.randint(-3, 4, (64,)).float())
    position = torch.arange(8).unsqueeze(0).expand(2, 8)
    rotary = model.model.rotary_emb(x, position)
    with torch.no_grad():
        before = block(x, position_embeddings=rotary)
        normed = block.input_layernorm(x).reshape(-1, 64)
        linears = [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]
        scales = migration_scales(normed.abs().amax(0), [m.weight for m in linears], 0.5)
        SmoothQuant().apply(block, {"input_layernorm": scales}, LLAMA)
        after = block(x, position_embeddings=rotary)
        smoothed = block.input_layernorm(x).reshape(-1, 64)
    before = before[0] if isinstance(before, tuple) else before
    after = after[0] if isinstance(after, tuple) else after
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(smoothed, normed / scales, rtol=1e-5, atol=1e-6)


def test_smoothquant_file_round_trip(tmp_path):
    """The saved scales are folded again by apply_params: a fresh model gives the calibrated model's logits."""
    from utils.params import apply_params, load_params, save_params

    config, setting = settings("SmoothQuant_config_llama")
    calibrated, fresh = make_llama(96), make_llama(96)
    for model in (calibrated, fresh):
        swap_modules(model, config.linear, config.lm_head, config.embedding)
    layers = calibrate(calibrated, IDS, setting)
    path = tmp_path / "smooth.pt"
    save_params(path, layers, {"note": "test"})
    apply_params(fresh, load_params(path)[0])
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, calibrated(IDS).logits)


def test_a_model_without_an_adapter_calibrates_its_head_unless_asked_for_head_transforms():
    """OPT's layout is in LAYOUTS but has no Architecture: round-to-nearest NVFP4 calibrates it, head included (its
    MinMax input range is amax of the final norm's output); a recipe with a head transform is one line, with the
    model unchanged."""
    from transformers import OPTConfig, OPTForCausalLM

    from conftest import one_line_value_error
    from configs.recipes import RECIPES

    def opt():
        torch.manual_seed(0)
        config = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                           word_embed_proj_dim=32, max_position_embeddings=64)
        model = OPTForCausalLM(config).eval()
        swap_modules(model)
        return model

    model, captured = opt(), []
    model.lm_head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().reshape(-1, 32)))
    with torch.no_grad():
        model(IDS)
    layers = calibrate(model, IDS, CalibSettings(get_config("NVFP4_config_llama"), W4A4, None))
    torch.testing.assert_close(layers["lm_head"].act_max_value, captured[0].abs().max(), rtol=1e-5, atol=0)
    refused = opt()
    before = {k: v.clone() for k, v in refused.state_dict().items()}
    message = one_line_value_error(
        lambda: calibrate(refused, IDS, CalibSettings(RECIPES["NVFP4_headsmooth_config_llama"], W4A4, None)))
    assert "no architecture adapter" in message
    assert all(torch.equal(before[k], v) for k, v in refused.state_dict().items())
