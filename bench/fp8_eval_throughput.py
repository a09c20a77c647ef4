"""FP8 execution's evaluation throughput / bfloat16's (lm-eval loglikelihood on hellaswag), one run on CUDA (sm89+),
with the simulated W4A4 beside it: the mirror of bench/eval_throughput.py for --execution fp8.

Qwen2.5-Coder-1.5B in bfloat16 (--model: an HF folder or its GGUF), timed unquantized, then quantized (FPQ W4A4E4:
swap_modules and the parameters) with the simulated forward, then the same model with use_fp8_execution (weights
as E4M3 codes). Parameters: --param_file (a calibration of this model: its accuracies are the table's), else a
quick FPQ search (1 round, 4 candidates) on 256 random tokens (timing only). Each timing follows a 20-document
warm-up (Triton's autotuning included). value: bf16 seconds / fp8 seconds on the first --limit documents; target
>= 1.25; the simulated ratio and the three accuracies are recorded (fp8 within 0.1 points of simulated). Beside
each evaluation, the model's forward alone on FORWARD_BATCH random sequences of FORWARD_TOKENS tokens (median of 10
CUDA-event timings after warm-up): what the GEMMs change where lm-eval's per-request work does not dominate; with
it the host's time to issue that forward (median of 10, the GPU idle at each start: a forward whose host time is
near its GPU time is bound by its launches, not its GEMMs) and, in fp8_forward_profile.txt beside the JSON, the
profiler's table of one forward of each model (the kernels by CUDA time, and the host's time per operator).

    python bench/fp8_eval_throughput.py --model PATH [--param_file FILE] [--limit 1000] [--batch_size 64]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from torch.profiler import ProfilerActivity, profile

from common import git_commit, median_ms, results_folder, write_result
from eval_throughput import timed_eval
from fp8_gemm import cuda_refusal
from configs import QBits, get_config
from quant_layers.modules import swap_modules
from utils.data.models import load_model
from utils.execution import layer_codes, use_fp8_execution
from utils.params import apply_params, load_params
from utils.quant_calib import CalibSettings, calibrate
from utils.search.space import SearchSpace

TARGET = 1.25
FORWARD_BATCH, FORWARD_TOKENS = 4, 1024  # 4096 tokens a forward: LLaMA-7B's M = 4096 of bench/fp8_gemm.py


def forward_ms(model, ids: torch.Tensor) -> float:
    """Median ms of one forward of ids [batch, tokens] (logits included), after 5 untimed ones."""
    with torch.no_grad():
        return median_ms(lambda: model(ids), 10)


def forward_host_ms(model, ids: torch.Tensor) -> float:
    """Median ms the host takes to issue one forward of ids (the call's return, not the GPU's end), each call
    started with the GPU idle."""
    times = []
    with torch.no_grad():
        for _ in range(10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids)
            times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def forward_profile(model, ids: torch.Tensor, name: str) -> str:
    """torch.profiler's tables of one forward: the 15 operators with the most CUDA time, the 15 with the most host
    time."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(ids)
        torch.cuda.synchronize()
    table = prof.key_averages()
    return (f"== {name}: by CUDA time\n{table.table(sort_by='device_time_total', row_limit=15)}\n"
            f"== {name}: by host time\n{table.table(sort_by='self_cpu_time_total', row_limit=15)}\n")


def time_forward(model, ids: torch.Tensor, name: str, forward: dict, host: dict, profiles: list) -> None:
    """forward[name], host[name] and the profile of one forward of model on ids."""
    forward[name] = forward_ms(model, ids)
    host[name] = forward_host_ms(model, ids)
    profiles.append(forward_profile(model, ids, name))


def quantize(model, param_file: str | None) -> tuple[dict, str]:
    """Swap and apply FPQ W4A4E4 parameters (the file's, or a quick search's); returns (layers, where from)."""
    config = get_config("FPQ_config_llama")
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    if param_file:
        layers = load_params(param_file)[0]
        apply_params(model, layers)
        return layers, param_file
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    space = SearchSpace((0.5, 1.2, 4), search_round=1)
    layers = calibrate(model, ids, CalibSettings(config, QBits.parse([4, 4, 4, 2, 2, 2]), space))
    return layers, "quick FPQ search (1 round, 4 candidates) on 256 random tokens: timing only"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Qwen2.5-Coder-1.5B: an HF folder or its .gguf file")
    parser.add_argument("--param_file", default=None, help="an FPQ_config_llama W4A4E4 parameter file of this model")
    parser.add_argument("--limit", type=int, default=1000, help="hellaswag documents timed")
    parser.add_argument("--batch_size", default="64")
    args = parser.parse_args()
    refusal = cuda_refusal()
    if refusal:
        sys.exit(f"bench/fp8_eval_throughput.py: {refusal}")
    model, tokenizer, info = load_model(args.model, device="cuda", dtype="bfloat16")
    ids = torch.randint(0, model.config.vocab_size, (FORWARD_BATCH, FORWARD_TOKENS),
                        generator=torch.Generator().manual_seed(1)).cuda()
    runs = {"bf16": timed_eval(model, tokenizer, args.limit, args.batch_size)}
    forward, host, profiles = {}, {}, []
    time_forward(model, ids, "bf16", forward, host, profiles)
    layers, params = quantize(model, args.param_file)
    memory = {"simulated": torch.cuda.memory_allocated()}
    runs["simulated"] = timed_eval(model, tokenizer, args.limit, args.batch_size)
    time_forward(model, ids, "simulated", forward, host, profiles)
    print(use_fp8_execution(model, layer_codes(layers)), flush=True)
    gc.collect()
    memory["fp8"] = torch.cuda.memory_allocated()
    runs["fp8"] = timed_eval(model, tokenizer, args.limit, args.batch_size)
    time_forward(model, ids, "fp8", forward, host, profiles)
    (results_folder() / "fp8_forward_profile.txt").write_text("".join(profiles))
    seconds = {name: run[0] for name, run in runs.items()}
    acc = {name: run[2].get("acc,none") for name, run in runs.items()}
    documents_apart = round(abs(acc["fp8"] - acc["simulated"]) * args.limit)  # accuracies are counts / limit
    rows = {"requests": runs["bf16"][1], "seconds": seconds, "acc": acc,
            "fp8_ratio": seconds["bf16"] / seconds["fp8"], "simulated_ratio": seconds["bf16"] / seconds["simulated"],
            "fp8_acc_within_0.1_points_of_simulated": documents_apart <= 0.001 * args.limit,
            "forward_ms": forward, "forward_host_ms": host, "forward_tokens": [FORWARD_BATCH, FORWARD_TOKENS],
            "forward_fp8_ratio": forward["bf16"] / forward["fp8"],
            "forward_simulated_ratio": forward["bf16"] / forward["simulated"],
            "allocated_gpu_bytes_before_timing": memory}
    print(rows, flush=True)
    value = rows["fp8_ratio"]
    write_result("fp8_eval_throughput_ratio", value, "fp8 W4A4 throughput / bf16 throughput", f">= {TARGET}",
                 value >= TARGET, {"model": info.source, "batch_size": args.batch_size, "limit": args.limit,
                                   "task": "hellaswag"},
                 {"rows": rows, "params": params, "commit": git_commit()})


if __name__ == "__main__":
    main()
