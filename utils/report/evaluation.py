"""Zero-shot evaluation through lm-evaluation-harness 0.4, used as a library.

The (possibly quantized) model is wrapped in lm-eval's own `HFLM`; tasks are lm-eval's own task
definitions, with the data read from a local build when the hub is unreachable (utils/data/task_data.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from utils.data.calib_data import leading_special_ids
from utils.run.fileio import write_bytes_atomic

CPU_AUTO_BATCH_SIZE = 8  # what --batch_size auto means on the CPU, where lm-eval's probe takes minutes


def data_parallel_processes() -> int:
    """How many processes evaluate together (`accelerate launch`, torchrun set WORLD_SIZE); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_local_rank() -> int | None:
    """This process's rank on its machine when launched as several processes (`accelerate launch`, torchrun),
    else None."""
    if data_parallel_processes() <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_batch_size(batch_size: str, device: torch.device | str) -> int | str:
    """The batch size to give lm-eval's HFLM for --batch_size on `device` (the model's): an integer as int; 'auto'
    as is on a GPU (lm-eval probes the largest that fits), but CPU_AUTO_BATCH_SIZE on the CPU, said in one line
    on stderr, because there the probe takes minutes."""
    if batch_size != "auto":
        return int(batch_size)
    if torch.device(device).type != "cpu":
        return "auto"
    print(f"--batch_size auto on CPU: using {CPU_AUTO_BATCH_SIZE} (lm-eval's probe takes minutes here); "
          "pass an integer to choose", file=sys.stderr, flush=True)
    return CPU_AUTO_BATCH_SIZE


def model_device(model: nn.Module) -> torch.device:
    """The device lm-eval's HFLM takes the model to be on: `model.device` (Hugging Face models), else the device
    of its first parameter."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def evaluate(model: nn.Module, tokenizer, task_specs: list, *, batch_size: str, num_fewshot: int,
             limit: int | float | None, seed: int) -> dict | None:
    """lm_eval.simple_evaluate on HFLM(model); returns lm-eval's results dict (without samples).

    Launched as several processes (data_parallel_local_rank), each process holds the whole model and scores its
    share of the documents; rank 0 gathers and gets the results, the other ranks get None.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=resolve_batch_size(batch_size, model_device(model)))
    if data_parallel_local_rank() is not None:  # HFLM keeps a model instance single-process: join the group
        from accelerate import Accelerator

        lm.accelerator = Accelerator()
        lm._rank, lm._world_size = lm.accelerator.process_index, lm.accelerator.num_processes
    results = lm_eval.simple_evaluate(
        model=lm, tasks=task_specs, num_fewshot=num_fewshot, limit=limit, log_samples=False,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    if results is not None:
        results.pop("samples", None)
    return results


def heldout_windows(tokenizer, text: str, *, windows: int, seqlen: int) -> torch.Tensor:
    """int64 [windows, seqlen]: each row the tokenizer's leading special ids (`leading_special_ids`: Gemma's BOS, none
    for SmolLM2 or Qwen2) followed by the next non-overlapping run of `text`'s tokens; ValueError if the text holds
    fewer."""
    lead = torch.tensor(leading_special_ids(tokenizer), dtype=torch.long)
    body = seqlen - lead.numel()
    if body < 1:
        raise ValueError(f"held-out windows of {seqlen} tokens leave no room after {lead.numel()} special token(s)")
    prefix = text[: windows * seqlen * 8]  # about 4 characters a token: enough text, not all of it tokenized
    ids = tokenizer(prefix, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // body
    if available < windows:
        raise ValueError(f"the held-out text holds {available} windows of {seqlen} tokens, {windows} asked")
    return torch.cat([lead.expand(windows, -1), ids[: windows * body].view(windows, body)], dim=1)


@torch.no_grad()
def heldout_perplexity(model: nn.Module, tokenizer, text: str, *, windows: int, seqlen: int) -> float:
    """exp(mean next-token negative log-likelihood) over the first `windows` non-overlapping windows of
    `seqlen` tokens of `text` (each window scored on its own, every token but the first predicted)."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for window in heldout_windows(tokenizer, text, windows=windows, seqlen=seqlen):
        logits = model(input_ids=window.view(1, -1).to(device), use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, window[1:].to(logits.device), reduction="sum"))
        count += seqlen - 1
    return math.exp(total / count)


def results_table(results: dict) -> str:
    """lm-eval's markdown table."""
    from lm_eval.utils import make_table

    return make_table(results)


def write_results(path: str | Path, results: dict) -> None:
    """Write results as JSON atomically (non-JSON values as strings)."""
    text = json.dumps(results, indent=2, default=str)
    write_bytes_atomic(path, text.encode())
