"""Tests for utils.data.calib_data: offline C4 excerpt, GPTQ-style hub sampling (faked shard), user files, errors."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

import utils.data.calib_data as cd
from utils.data.calib_data import CalibDataError, get_calib_data, load_calib_set
from utils.data.models import load_model


@pytest.fixture(scope="module")
def tok():
    """SmolLM2-135M tokenizer (embedded default model, via the user cache)."""
    return load_model(None, device="cpu")[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _text(n: int = 400) -> str:
    return " ".join(f"Sentence number {i} talks about topic {i % 7} and colour {i % 5}." for i in range(n))


def _is_slice(row: torch.Tensor, stream: list[int]) -> bool:
    r = row.tolist()
    return any(stream[s:s + len(r)] == r for s in range(len(stream) - len(r) + 1) if stream[s] == r[0])


def test_offline_excerpt_default_shape_and_vocab(tok):
    calib = load_calib_set(tok)
    assert calib.tokens.shape == (32, 1024) and calib.tokens.dtype == torch.long
    assert int(calib.tokens.min()) >= 0 and int(calib.tokens.max()) < len(tok)
    assert calib.description.startswith("c4 excerpt (exllamav2 0.3.2") and "118 docs" in calib.description
    assert (calib.tokens == tok.eos_token_id).any()  # documents are joined by EOS


def test_determinism(tok):
    a = get_calib_data(tok, calib_size=4, seqlen=256, seed=0, source="c4_excerpt")
    b = get_calib_data(tok, calib_size=4, seqlen=256, seed=0, source="c4_excerpt")
    c = get_calib_data(tok, calib_size=4, seqlen=256, seed=1, source="c4_excerpt")
    assert a.shape == (4, 256) and torch.equal(a, b) and not torch.equal(a, c)


def test_c4_needs_hub(tok):
    with pytest.raises(CalibDataError, match="unreachable"):
        get_calib_data(tok, calib_size=2, seqlen=16, source="c4")


def test_hub_path_matches_gptq_get_c4(tok, tmp_path, monkeypatch):
    rng = random.Random(5)
    docs = [_text(rng.randint(1, 40)) for _ in range(60)]
    shard = tmp_path / "c4.json.gz"
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs)
    monkeypatch.setattr(cd, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(cd, "_download_c4_shard", lambda: shard)
    calib = load_calib_set(tok, calib_size=6, seqlen=128, seed=3)
    assert calib.description.startswith("c4 (allenai/c4")
    random.seed(3)  # GPTQ's get_c4, verbatim in spirit
    rows = []
    for _ in range(6):
        while True:
            enc = tok(docs[random.randint(0, len(docs) - 1)], return_tensors="pt")
            if enc.input_ids.shape[1] > 128:
                break
        i = random.randint(0, enc.input_ids.shape[1] - 128 - 1)
        rows.append(enc.input_ids[:, i:i + 128])
    assert torch.equal(calib.tokens, torch.cat(rows))


def test_auto_falls_back_when_download_fails(tok, monkeypatch):
    def fail():
        raise OSError("no route")

    monkeypatch.setattr(cd, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(cd, "_download_c4_shard", fail)
    with pytest.warns(UserWarning, match="offline C4 excerpt"):
        calib = load_calib_set(tok, calib_size=2, seqlen=32)
    assert calib.description.startswith("c4 excerpt")


def test_bad_exllamav2_wheel_env(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FP4_EXLLAMAV2_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(CalibDataError, match="LLM_FP4_EXLLAMAV2_WHEEL"):
        get_calib_data(tok, calib_size=2, seqlen=32, source="c4_excerpt")


def test_txt_file(tok, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(_text(), encoding="utf-8")
    calib = load_calib_set(tok, calib_size=5, seqlen=64, seed=2, source=str(path))
    assert calib.tokens.shape == (5, 64) and str(path) in calib.description
    stream = tok(_text(), add_special_tokens=False).input_ids
    assert all(_is_slice(row, stream) for row in calib.tokens)
    assert torch.equal(calib.tokens, get_calib_data(tok, calib_size=5, seqlen=64, seed=2, source=str(path)))


def test_jsonl_file_joins_docs_with_eos(tok, tmp_path):
    docs = [_text(3), _text(4), _text(5)]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n", "utf-8")
    total = sum(len(tok(d, add_special_tokens=False).input_ids) for d in docs) + 2  # two EOS separators
    tokens = get_calib_data(tok, calib_size=3, seqlen=total, source=str(path))
    assert tokens.shape == (3, total) and torch.equal(tokens[0], tokens[1])
    assert int((tokens[0] == tok.eos_token_id).sum()) == 2
    with pytest.raises(CalibDataError, match=f"only {total} tokens"):
        get_calib_data(tok, calib_size=1, seqlen=total + 1, source=str(path))


@pytest.mark.parametrize("calib_size, seqlen", [(0, 16), (-1, 16), (2, 0), (2, -5)])
def test_bad_sizes(tok, calib_size, seqlen):
    with pytest.raises(CalibDataError, match="positive integer"):
        get_calib_data(tok, calib_size=calib_size, seqlen=seqlen, source="c4_excerpt")


def _one_line_error(tok, source, match: str) -> None:
    with pytest.raises(CalibDataError, match=match) as err:
        get_calib_data(tok, calib_size=2, seqlen=16, source=str(source))
    assert "\n" not in str(err.value)


def test_file_errors(tok, tmp_path):
    _one_line_error(tok, tmp_path / "missing.txt", "cannot read")
    _one_line_error(tok, tmp_path / "data.csv", "not 'c4', 'c4_excerpt' or an existing .txt/.jsonl")
    (tmp_path / "dir.txt").mkdir()
    _one_line_error(tok, tmp_path / "dir.txt", "cannot read")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    _one_line_error(tok, tmp_path / "latin1.txt", "UTF-8")
    (tmp_path / "empty.txt").write_text("  \n")
    _one_line_error(tok, tmp_path / "empty.txt", "contains no text")
    (tmp_path / "short.txt").write_text("Just a few words.")
    _one_line_error(tok, tmp_path / "short.txt", "--calib_seqlen 16 needs at least 16")
    lines = [json.dumps({"text": _text(5)}), json.dumps({"text": _text(5)}), json.dumps({"body": "x"})]
    (tmp_path / "notext.jsonl").write_text("\n".join(lines))
    _one_line_error(tok, tmp_path / "notext.jsonl", "line 3 has no string 'text' field")
    (tmp_path / "badjson.jsonl").write_text(lines[0] + "\n\n{oops\n")
    _one_line_error(tok, tmp_path / "badjson.jsonl", "line 3 is not valid JSON")


def test_heldout_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_tokenizer):
    """A model whose logits are all equal predicts every token with probability 1/V: perplexity V exactly."""
    import torch

    from conftest import make_llama
    from utils.report.evaluation import heldout_perplexity

    model = make_llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    value = heldout_perplexity(model, tiny_tokenizer, text, windows=3, seqlen=16)
    assert value == pytest.approx(len(tiny_tokenizer), rel=1e-5)
    with pytest.raises(ValueError, match="windows"):
        heldout_perplexity(model, tiny_tokenizer, "too short", windows=3, seqlen=16)


@pytest.fixture(scope="module")
def bos_tok(tok):
    """SmolLM2's tokenizer made to start every text with BOS, as Gemma's does."""
    import copy

    from tokenizers.processors import TemplateProcessing

    bos = copy.deepcopy(tok)
    bos.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos.bos_token} $A", special_tokens=[(bos.bos_token, bos.bos_token_id)])
    return bos


def test_leading_special_ids(tok, bos_tok, tiny_tokenizer):
    assert cd.leading_special_ids(tok) == [] and cd.leading_special_ids(tiny_tokenizer) == []
    assert bos_tok("a").input_ids == [bos_tok.bos_token_id] + tok("a").input_ids
    assert cd.leading_special_ids(bos_tok) == [bos_tok.bos_token_id]


def test_stream_rows_start_with_the_tokenizers_bos(tok, bos_tok, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(_text(), encoding="utf-8")
    stream = tok(_text(), add_special_tokens=False).input_ids
    plain = get_calib_data(tok, calib_size=5, seqlen=64, seed=2, source=str(path))
    rows = get_calib_data(bos_tok, calib_size=5, seqlen=64, seed=2, source=str(path))
    assert rows.shape == (5, 64) and (rows[:, 0] == bos_tok.bos_token_id).all()
    assert all(_is_slice(row[1:], stream) for row in rows) and all(_is_slice(row, stream) for row in plain)
    with pytest.raises(CalibDataError, match="no room"):
        get_calib_data(bos_tok, calib_size=1, seqlen=1, source=str(path))


def test_heldout_windows_begin_with_bos_only_where_the_tokenizer_adds_it(tok, bos_tok):
    from utils.report.evaluation import heldout_windows

    text = _text()
    ids = tok(text, add_special_tokens=False).input_ids
    plain = heldout_windows(tok, text, windows=3, seqlen=32)
    assert plain.tolist() == [ids[i * 32:(i + 1) * 32] for i in range(3)]
    with_bos = heldout_windows(bos_tok, text, windows=3, seqlen=32)
    assert with_bos.tolist() == [[bos_tok.bos_token_id] + ids[i * 31:(i + 1) * 31] for i in range(3)]
