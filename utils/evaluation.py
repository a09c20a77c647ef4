"""Zero-shot evaluation through lm-evaluation-harness 0.4, used as a library.

The (possibly quantized) model is wrapped in lm-eval's own `HFLM`; tasks are lm-eval's own task
definitions, with the data read from a local build when the hub is unreachable (utils/task_data.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from utils.fileio import write_bytes_atomic


def evaluate(model: nn.Module, tokenizer, task_specs: list, *, batch_size: str, num_fewshot: int,
             limit: int | float | None, seed: int) -> dict:
    """lm_eval.simple_evaluate on HFLM(model); returns lm-eval's results dict (without samples)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer,
              batch_size=batch_size if batch_size == "auto" else int(batch_size))
    results = lm_eval.simple_evaluate(
        model=lm, tasks=task_specs, num_fewshot=num_fewshot, limit=limit, log_samples=False,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    results.pop("samples", None)
    return results


def results_table(results: dict) -> str:
    """lm-eval's markdown table."""
    from lm_eval.utils import make_table

    return make_table(results)


def write_results(path: str | Path, results: dict) -> None:
    """Write results as JSON atomically (non-JSON values as strings)."""
    text = json.dumps(results, indent=2, default=str)
    write_bytes_atomic(path, text.encode())
