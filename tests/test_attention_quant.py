"""Quantized attention (KV cache, Q, P) on tiny Llama, Qwen2 and Gemma3 models, eager and SDPA, against attention
computed by hand in this file with quantize-dequantize inserted where configured."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from configs import QBits, get_config
from configs.attention import AttentionPolicy
from conftest import make_tiny, one_line_value_error
from quant_layers.attention import ATTRIBUTE, AttentionQuantError
from quant_layers.formats import parse_format
from quant_layers.modules import swap_modules
from quant_layers.quantize import quantize
from utils.attention import attention_modules, calibrate_attention, prepare, recording
from utils.params import AttentionParams, apply_params, load_params, save_params
from utils.quant_calib import CalibSettings, calibrate
from utils.search.attention_ranges import reference_outputs, search_kv_ranges
from utils.search.space import SearchSpace

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
ARCHITECTURES = ("llama", "qwen2", "gemma3")
IMPLEMENTATIONS = ("eager", "sdpa")
POLICIES = {
    "kv_static": AttentionPolicy("E2M1", "per_channel", "per_head"),
    "kv_tensor_int": AttentionPolicy("INT4", "per_tensor", "per_tensor"),
    "kv_dynamic": AttentionPolicy("E3M0", "per_token", "per_token"),
    "kv_nvfp4": AttentionPolicy("NVFP4", "per_token", "per_head"),
    "q_only": AttentionPolicy(q_format="E2M1"),
    "p_only": AttentionPolicy(p_format="UE3M1"),
    "kv_q_p": AttentionPolicy("E2M1", "per_head", "per_token", "E2M1", "UE3M1"),
}


def tiny(architecture: str, implementation: str):
    model = make_tiny(architecture)
    model.set_attn_implementation(implementation)
    return model


# --- the independent reference: attention by hand, its own mask, quantizers with ranges computed here ----------

def _by_hand(spec, x: torch.Tensor, static_range: torch.Tensor | None) -> torch.Tensor:
    if spec is None:
        return x
    fmt = parse_format(spec["format"])
    if spec["granularity"] == "per_token":
        return quantize(x, fmt, x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30))
    return quantize(x, fmt, static_range)


def hand_attention(module, query, key, value, attention_mask, **kwargs):
    """q k^T * scaling + causal (and sliding-window) mask, softmax, @ v, with the test's quantizers."""
    spec = module.hand_spec
    key = _by_hand(spec.get("key"), key, spec.get("key_range"))
    value = _by_hand(spec.get("value"), value, spec.get("value_range"))
    query = _by_hand(spec.get("query"), query, None)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    positions = torch.arange(query.shape[2])
    allowed = positions[None, :] <= positions[:, None]
    window = getattr(module, "sliding_window", None)
    if window is not None:
        allowed &= positions[:, None] - positions[None, :] < window
    scores = query @ key.transpose(2, 3) * module.scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if spec.get("probs"):
        probs = quantize(probs, parse_format(spec["probs"]), 1.0)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("hand_reference", hand_attention)
AttentionMaskInterface.register("hand_reference", sdpa_mask)  # passed, never read


def hand_specs(model, policy: AttentionPolicy) -> None:
    """Give each attention module the reference's settings, the static ranges copied from its calibrated state."""
    for module in attention_modules(model).values():
        state = getattr(module, ATTRIBUTE)
        spec = {}
        if policy.kv_format:
            spec["key"] = {"format": policy.kv_format, "granularity": policy.key_granularity}
            spec["value"] = {"format": policy.kv_format, "granularity": policy.value_granularity}
            spec["key_range"] = state.key.max_value
            spec["value_range"] = state.value.max_value
        if policy.q_format:
            spec["query"] = {"format": policy.q_format, "granularity": "per_token"}
        spec["probs"] = policy.p_format
        module.hand_spec = spec


def calibrated(model, policy: AttentionPolicy, space: SearchSpace | None = None) -> dict:
    modules = prepare(model, policy)
    with recording(modules) as records, torch.no_grad():
        model(IDS)
    return {name: calibrate_attention(m, records[name], policy, space) for name, m in modules.items()}


# --- tests ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prepared_but_unquantized_attention_keeps_the_logits(architecture, implementation):
    model = tiny(architecture, implementation)
    with torch.no_grad():
        reference = model(IDS).logits
        prepare(model, POLICIES["kv_static"])  # states stay full precision until calibrated or loaded
        assert model.config._attn_implementation == f"llmfp4_{implementation}"
        assert torch.equal(model(IDS).logits, reference)


@pytest.mark.parametrize("case", sorted(POLICIES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_quantized_attention_matches_attention_by_hand(architecture, implementation, case):
    policy = POLICIES[case]
    model = tiny(architecture, implementation)
    with torch.no_grad():
        full = model(IDS).logits
        calibrated(model, policy)
        quantized = model(IDS).logits
        expected_impl = "eager" if policy.p_format or implementation == "eager" else "sdpa"
        assert model.config._attn_implementation == f"llmfp4_{expected_impl}"
        hand_specs(model, policy)
        model.set_attn_implementation("hand_reference")
        by_hand = model(IDS).logits
    torch.testing.assert_close(quantized, by_hand, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(quantized, full, rtol=1e-4, atol=1e-4)  # the quantizers did something


def test_static_ranges_are_minmax_over_the_calibration_calls():
    model = tiny("llama", "sdpa")
    params = calibrated(model, POLICIES["kv_static"])
    entry = params["model.layers.0.self_attn"]
    assert isinstance(entry, AttentionParams) and entry.key_max_value.shape == (1, 2, 1, 16)  # per KV head, channel
    assert entry.value_max_value.shape == (1, 2, 1, 1)
    module = model.model.layers[0].self_attn
    with recording({"a": module}) as records, torch.no_grad():
        model(IDS)
    keys = torch.cat([r.key for r in records["a"]], dim=0)
    assert torch.equal(entry.key_max_value, keys.abs().amax(dim=(0, 2), keepdim=True))


@pytest.mark.parametrize("policy", [POLICIES["kv_static"], POLICIES["kv_tensor_int"], POLICIES["kv_q_p"]])
def test_range_search_never_ends_above_minmax(policy):
    model = tiny("qwen2", "sdpa")
    modules = prepare(model, policy)
    with recording(modules) as records, torch.no_grad():
        model(IDS)
    name, module = next(iter(modules.items()))
    calibrate_attention(module, records[name], policy, None)  # MinMax state
    state = getattr(module, ATTRIBUTE)
    with torch.no_grad():
        searched, start, end = search_kv_ranges(module, state, records[name], SearchSpace((0.3, 1.2, 9)))
    assert end <= start
    assert len(reference_outputs(module, state, records[name])) == len(records[name])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_calibration_saves_ranges_and_replay_gives_identical_logits(architecture, tmp_path):
    policy = POLICIES["kv_q_p"]
    config = get_config("FPQ_config_llama")
    qbits = QBits.parse([4, 8, 16, 2, 4, 2])
    space = SearchSpace((0.3, 1.2, 4), search_round=1)
    model = tiny(architecture, "sdpa")
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    prepare(model, policy)
    layers = calibrate(model, IDS, CalibSettings(config, qbits, space, attention=policy, attention_space=space))
    assert {n for n, p in layers.items() if p.kind == "attention"} == set(attention_modules(model))
    with torch.no_grad():
        logits = model(IDS).logits
    save_params(tmp_path / "p.pt", layers, {"attention": policy.to_dict()})
    loaded, metadata = load_params(tmp_path / "p.pt")
    assert metadata["attention"] == policy.to_dict()
    fresh = tiny(architecture, "sdpa")
    swap_modules(fresh, config.linear, config.lm_head, config.embedding)
    prepare(fresh, policy)
    apply_params(fresh, loaded)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, logits)


def test_configs_without_attention_calibrate_as_before():
    config = get_config("MinMax_config_llama")
    qbits = QBits.parse([4, 4, 4, 2, 2, 2])
    results = []
    for attention in (None, AttentionPolicy()):
        model = tiny("llama", "sdpa")
        swap_modules(model)
        layers = calibrate(model, IDS, CalibSettings(config, qbits, None, attention=attention if attention and
                                                     attention.enabled else None))
        assert not any(p.kind == "attention" for p in layers.values())
        with torch.no_grad():
            results.append(model(IDS).logits)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(*results)


@pytest.mark.parametrize("make, words", [
    (lambda: AttentionPolicy("E2M1", "per_channel", "per_channel"), "per_channel is for keys only"),
    (lambda: AttentionPolicy("UE3M1"), "unsigned format cannot hold them"),
    (lambda: AttentionPolicy("E5M10"), "at most 8 bits"),
    (lambda: AttentionPolicy("E9M2"), "exponent bits"),
    (lambda: AttentionPolicy("NVFP4", "per_channel", "per_token"), "per_channel ranges do not combine"),
    (lambda: AttentionPolicy("E2M1", "per_row", "per_token"), "is not one of"),
    (lambda: AttentionPolicy(q_format="E2M9X"), "unknown format name"),
    (lambda: prepare(tiny("llama", "sdpa"), AttentionPolicy("MXFP4", "per_token", "per_token")),
     "do not tile the attention head dimension 16"),
])
def test_bad_attention_settings_are_one_line_errors(make, words):
    assert words in one_line_value_error(make)


def test_an_architecture_without_support_is_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    message = one_line_value_error(lambda: prepare(model, POLICIES["kv_static"]))
    assert "GPT2" in message


def test_a_flash_or_flex_model_is_one_line():
    model = tiny("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(AttentionQuantError) as caught:
        prepare(model, POLICIES["kv_static"])
    assert "\n" not in str(caught.value) and "flex_attention" in str(caught.value)


@pytest.mark.parametrize("argv, words", [
    (["--kv_format", "E2M1"], "add --quant_config"),
    (["--quant_config", "MinMax_config_llama", "--kv_format", "UE3M1"], "unsigned"),
    (["--quant_config", "MinMax_config_llama", "--kv_granularity", "per_channel", "per_channel", "--kv_format",
      "E2M1"], "keys only"),
    (["--quant_config", "MinMax_config_llama", "--attn_p_format", "E2M1", "--export_dir", "x"], "packed exports"),
])
def test_bad_attention_flags_are_one_line(argv, words):
    from utils.run.cli import UsageError, parse_args

    with pytest.raises(UsageError) as caught:
        parse_args(argv)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_main_records_and_replays_attention_settings(tiny_llama_dir, calib_text_file, tmp_path):
    from utils.data.models import load_model
    from utils.run.cli import parse_args
    from utils.run.pipeline import quantize_model

    base = ["--model_args", f"pretrained={tiny_llama_dir}", "--tasks", "piqa", "--device", "cpu"]
    calibrate_argv = [*base, "--quant_config", "MinMax_config_llama", "--qbits", "16", "16", "16", "2", "2", "2",
                      "--calib_data", str(calib_text_file), "--calib_size", "2", "--calib_seqlen", "16",
                      "--search_result_dir", str(tmp_path), "--kv_format", "INT8", "--attn_p_format", "UE3M1"]
    logits = []
    blocks = []
    for argv in (calibrate_argv, None):
        if argv is None:  # the file alone: its config, qbits and attention settings
            argv = [*base, "--only_eval", "--ptq_param_path", blocks[0]["param_file"]]
        args = parse_args(argv)
        model, tokenizer, info = load_model(args.model_args.pretrained, device="cpu")
        blocks.append(quantize_model(model, tokenizer, info, args))
        with torch.no_grad():
            logits.append(model(IDS[:, :8] % 200).logits)
    assert "KV-INT8-per_channel-per_token_P-UE3M1" in blocks[0]["param_file"]
    for block in blocks:
        assert block["kv_cache"] == {"format": "INT8", "key_granularity": "per_channel",
                                     "value_granularity": "per_token", "ranges": {"key": "static", "value": "dynamic"}}
        assert block["attention"] == {"query_format": None, "query_granularity": None, "probs_format": "UE3M1",
                                      "probs_range": 1.0}
    assert torch.equal(*logits)


def test_unsigned_format_names_read_back_and_p_grid():
    fmt = parse_format("UE3M1")
    assert (fmt.name, fmt.signed, fmt.bits, fmt.exponent_bits) == ("UE3M1", False, 4, 3)
    grid = torch.unique(quantize(torch.linspace(0, 1, 20001), fmt, 1.0))
    assert len(grid) == 16 and grid[0] == 0 and grid[-1] == 1 and torch.isclose(grid[1], torch.tensor(1 / 192))
