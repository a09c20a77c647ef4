"""utils.data.architecture on tiny random Llama, Qwen2, Mistral and Gemma3 models: modules found by identity,
norms that absorb a division exactly, and one-line errors."""

import copy

import pytest
import torch

from conftest import make_tiny
from utils.data.architecture import (GEMMA3, LLAMA, ArchitectureError, architecture_of, decoder_layers, final_norm,
                                     norm_linear_pairs)

EXPECTED = {"llama": LLAMA, "qwen2": LLAMA, "mistral": LLAMA, "gemma3": GEMMA3}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_finds_blocks_final_norm_and_pairs(name):
    model = make_tiny(name)
    assert architecture_of(model) is EXPECTED[name]
    assert decoder_layers(model) is model.model.layers
    assert final_norm(model) is model.model.norm
    for block in model.model.layers:
        assert architecture_of(block) is EXPECTED[name]
        attn, mlp = block.self_attn, block.mlp
        mlp_norm = block.pre_feedforward_layernorm if name == "gemma3" else block.post_attention_layernorm
        expected = [(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                    (mlp_norm, [mlp.gate_proj, mlp.up_proj])]
        found = [(block.get_submodule(norm), [block.get_submodule(n) for n in linears])
                 for norm, linears in norm_linear_pairs(block)]
        assert len(found) == len(expected)
        for (norm, linears), (norm_ref, linears_ref) in zip(found, expected):
            assert norm is norm_ref
            assert all(a is b for a, b in zip(linears, linears_ref, strict=True))
        unnormed = [block.get_submodule(n) for n in EXPECTED[name].unnormed_linears]
        assert unnormed[0] is attn.o_proj and unnormed[1] is mlp.down_proj


def test_gemma3_embedding_scale_is_recorded():
    model = make_tiny("gemma3")
    assert GEMMA3.embedding_scale == "sqrt(hidden_size)" and LLAMA.embedding_scale == ""
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(64 ** 0.5)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_scale_norm_divides_the_output(name):
    """norm_new(x) == norm(x) / s for random x, with the norm's weight away from its init."""
    model = make_tiny(name)
    arch = architecture_of(model)
    generator = torch.Generator().manual_seed(1)
    for block in model.model.layers:
        for norm_name, _ in arch.norm_linear_pairs:
            norm = block.get_submodule(norm_name)
            with torch.no_grad():
                norm.weight.add_(0.3 * torch.randn(norm.weight.shape, generator=generator))
            x = torch.randn(5, 7, 64, generator=generator) * 3
            scale = torch.exp2(torch.empty(64).uniform_(-2, 2, generator=generator))
            with torch.no_grad():
                expected = copy.deepcopy(norm)(x) / scale
                arch.scale_norm(norm, scale)
                got = norm(x)
            assert norm.weight.dtype == torch.float32
            assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_scale_norm_keeps_the_dtype():
    model = make_tiny("gemma3").to(torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    GEMMA3.scale_norm(norm, torch.full((64,), 2.0))
    assert norm.weight.dtype == torch.bfloat16
    assert torch.equal(norm.weight, torch.full((64,), -0.5, dtype=torch.bfloat16))  # (1 + 0) / 2 - 1


def test_unknown_models_and_blocks_are_one_line_errors():
    for module in (torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2)])):
        with pytest.raises(ValueError) as caught:
            architecture_of(module)
        message = str(caught.value)
        assert "\n" not in message and type(module).__name__ in message and "LlamaDecoderLayer" in message
    with pytest.raises(ArchitectureError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
