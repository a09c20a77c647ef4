"""Shared helpers of the bench/ scripts: a 7B-shaped random Llama and one JSON file per measure."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.run.fileio import code_fingerprint  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                 vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6)  # Qwen2.5-1.5B's sizes
TINY_SHAPE = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def results_folder() -> Path:
    """bench/results, or $BENCH_RESULTS (the GPU machine writes into $OUT)."""
    return Path(os.environ.get("BENCH_RESULTS", RESULTS))


def environment() -> dict:
    """Where and how a measure was taken."""
    return {"device": device_name(), "torch": torch.__version__, "triton": triton_version(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "code_fingerprint": code_fingerprint()}


def git_commit() -> str | None:
    """The short commit of the code that ran, or None outside a git checkout (the GPU machine's copy)."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def write_result(name: str, value: float, unit: str, target: str, met: bool, shapes: dict, extra: dict | None = None,
                 folder: Path | None = None, env: dict | None = None) -> Path:
    """<results folder>/<name>.json with the keys the performance issue asks for, and print one line.
    env: the environment() of the run that measured it (default: this process)."""
    folder = folder or results_folder()
    folder.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "value": value, "unit": unit, "target": target, "met": bool(met),
              **(env or environment()), "shapes": shapes, **(extra or {})}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{name}: {value:.4g} {unit} (target {target}) -> {'met' if met else 'MISSED'}", flush=True)
    return path


def captured_inputs(model, modules: dict, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input rows [tokens, in] of each named Linear (modules: model's {name: module}) over windows [S, T] (one
    forward pass per window)."""
    missing = [name for name in names if name not in modules]
    if missing:
        raise SystemExit(f"error: no module {missing[0]!r} in the model")
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [modules[name].register_forward_hook(
        lambda _m, args, _o, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]).detach()))
        for name in names]
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window.view(1, -1), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


def llama_7b_shape(layers: int, device: str, dtype: torch.dtype = torch.bfloat16, **overrides):
    """LlamaForCausalLM with LLaMA-7B sizes and `layers` blocks, random weights (seed 0), on device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_7B, **overrides}, num_hidden_layers=layers)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, calls: int = 1) -> float:
    """Median over `repeats` CUDA-event timings of `calls` back-to-back calls of fn, divided by `calls` (ms per
    call), after 5 untimed calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def first_block(model, ids: torch.Tensor):
    """Block 0 of model, its Linears {name: module}, and the hidden states [S, T, H] and keyword arguments
    entering it for the token ids [S, T] (what calibration captures the block's inputs from)."""
    from utils.data.architecture import decoder_layers
    from utils.quant_calib import first_block_inputs

    blocks = decoder_layers(model)
    linears = {n: m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    hidden, kwargs = first_block_inputs(model, blocks, ids, None)
    return blocks[0], linears, hidden, kwargs[0]


def warm_up_search(linears: dict, inputs: dict, budget) -> None:
    """Run a tiny FPQ search once per Linear (in + 64 input rows, 4 candidates, 1 round, with the exact weight
    step and with the proxy-ranked one) before anything is timed: Triton compiles and autotunes our kernels once
    per process, channel count and mode (it times each tile shape, a few seconds), which no timed run should pay.
    More rows than the Linear has inputs make the weight step go the quadratic-form way (the weight-residual
    kernel) as the timed runs do; fewer would warm up only the direct path.
    inputs: {name: captured input [N, in], N >= in + 64}."""
    from quant_layers.formats import fp_format
    from utils.search.problem import LinearProblem
    from utils.search.space import SearchSpace
    from utils.search.steps import fpq_search

    for name, module in linears.items():
        rows = module.weight.shape[1] + 64
        if inputs[name].shape[0] < rows:
            raise ValueError(f"warm_up_search needs {rows} input rows for {name}, got {inputs[name].shape[0]}")
        problem = LinearProblem(inputs[name][:rows], module.weight.detach(), budget)
        for weight_refine in (0, 2):  # the exact weight step, then the proxy-ranked one (--weight_refine)
            space = SearchSpace((0.5, 1.2, 4), weight_refine=weight_refine)
            fpq_search(problem, fp_format(2, 1), fp_format(2, 1), space, True)


def warm_up_model(model, seqlen: int, budget) -> None:
    """`warm_up_search` on block 0 of model, from just enough random sequences of seqlen tokens to give its widest
    Linear in + 64 input rows."""
    from utils.quant_calib import capture_inputs

    widest = max(model.config.hidden_size, model.config.intermediate_size)
    ids = torch.randint(0, model.config.vocab_size, (-(-(widest + 64) // seqlen), seqlen),
                        generator=torch.Generator().manual_seed(1))
    block, linears, hidden, kwargs = first_block(model, ids)
    _, inputs = capture_inputs(block, hidden, kwargs, linears)
    warm_up_search(linears, inputs, budget)
