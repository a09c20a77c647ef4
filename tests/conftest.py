"""Shared fixtures: tiny generated models and tokenizers (no network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A goal is a dream with a deadline, and a plan makes it real.",
    "Question: What do plants need to grow? Answer: water, light and air.",
    "She opened the door, looked at the rain and went back to her book.",
] * 20


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`: the payload of a malicious parameter file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_main(*argv, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """main.py as a subprocess, offline (HF_HUB_OFFLINE=1), with text stdout/stderr captured."""
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def one_line_value_error(call) -> str:
    """The message of the ValueError that call() raises, checked to be one non-empty line."""
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def make_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300) trained here, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_llama(vocab_size: int, seed: int = 0, tied: bool = True, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def make_tiny(architecture: str, vocab_size: int = 300, seed: int = 0):
    """A random 2-layer causal LM (hidden 64, float32, eval mode): "llama", "qwen2", "mistral" or "gemma3"."""
    import transformers as tf

    if architecture == "llama":
        return make_llama(vocab_size, seed)
    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if architecture == "gemma3":
        config = tf.Gemma3TextConfig(**sizes, head_dim=16, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"])
        return tf.Gemma3ForCausalLM(config).eval()
    config_class, model_class = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                                 "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[architecture]
    return model_class(config_class(**sizes)).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved random 2-layer Llama (hidden 64, tied embedding) with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_llama(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def calib_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(CORPUS * 5))
    return path


def calibrate_and_replay(config, qbits, space, tmp_path, ids=None) -> dict:
    """Calibrate make_tiny("llama") (swapped as config says) under config, save the parameters, apply them to a
    fresh copy and assert its logits equal the calibrated model's; returns the layers."""
    import torch

    from quant_layers.modules import swap_modules
    from utils.params import apply_params, load_params, save_params
    from utils.quant_calib import CalibSettings, calibrate

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0)) if ids is None else ids

    def model():
        tiny = make_tiny("llama")
        swap_modules(tiny, config.linear, config.lm_head, config.embedding)
        return tiny

    calibrated = model()
    layers = calibrate(calibrated, ids, CalibSettings(config, qbits, space))
    save_params(tmp_path / "replay.pt", layers, {})
    fresh = model()
    apply_params(fresh, load_params(tmp_path / "replay.pt")[0])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, calibrated(ids).logits)
    return layers
