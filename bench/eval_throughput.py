"""Simulated W4A4 evaluation throughput / bfloat16 evaluation throughput (lm-eval loglikelihood), same run.

SmolLM2-135M: full hellaswag, unquantized bf16 vs quantized with a saved FPQ parameter file. A LLaMA-7B
shape (random weights, SmolLM2's tokenizer, W4A4 E2M1 MinMax ranges with channel shifts): the first
--slice hellaswag documents. Each model is warmed up on a few documents before timing; the ratio is
quantized requests/s over unquantized requests/s.

    python bench/eval_throughput.py --param_file PATH
"""

from __future__ import annotations

import argparse
import time

import torch

from common import llama_7b_shape, synchronize, write_result
from configs import QBits, get_config
from quant_layers.modules import swap_modules
from utils.report.evaluation import evaluate
from utils.data.models import load_model
from utils.params import apply_params, load_params
from utils.quant_calib import CalibSettings, calibrate
from utils.data.task_data import get_task_specs


def timed_eval(model, tokenizer, limit, batch_size: str) -> tuple[float, int, dict]:
    tasks = get_task_specs(["hellaswag"])
    evaluate(model, tokenizer, tasks, batch_size=batch_size, num_fewshot=0, limit=20, seed=0)  # warm-up
    synchronize()
    start = time.perf_counter()
    results = evaluate(model, tokenizer, tasks, batch_size=batch_size, num_fewshot=0, limit=limit, seed=0)
    synchronize()
    seconds = time.perf_counter() - start
    requests = 4 * results["n-samples"]["hellaswag"]["effective"]
    return seconds, requests, results["results"]["hellaswag"]


def compare(name: str, make_fp, quantize, limit, batch_size: str) -> dict:
    model, tokenizer = make_fp()
    fp_seconds, requests, fp_metrics = timed_eval(model, tokenizer, limit, batch_size)
    quantize(model)
    q_seconds, _, q_metrics = timed_eval(model, tokenizer, limit, batch_size)
    row = {"requests": requests, "bf16_seconds": fp_seconds, "w4a4_seconds": q_seconds,
           "ratio": fp_seconds / q_seconds, "bf16_acc": fp_metrics.get("acc,none"), "w4a4_acc": q_metrics.get("acc,none")}
    print(name, row, flush=True)
    del model
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--param_file", required=True, help="an FPQ parameter file of the embedded SmolLM2-135M")
    parser.add_argument("--slice", type=int, default=200, help="hellaswag documents for the 7B shape")
    parser.add_argument("--batch_size", default="64")
    args = parser.parse_args()

    def smollm2():
        model, tokenizer, _ = load_model(None, device="cuda", dtype="bfloat16")
        return model, tokenizer

    def smollm2_quantize(model):
        swap_modules(model)
        apply_params(model, load_params(args.param_file)[0])

    def llama7b():
        _, tokenizer, _ = load_model(None, device="cpu", dtype="float32")
        return llama_7b_shape(32, "cuda", vocab_size=len(tokenizer)), tokenizer

    def llama7b_quantize(model):
        swap_modules(model)
        ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
        calibrate(model, ids, CalibSettings(get_config("FPQ_config_llama"), QBits.parse([4, 4, 4, 2, 2, 2]), None))
        for module in model.modules():  # MinMax has no shifts: give the FPQ path its channel scales too
            if hasattr(module, "act_channel_scale") and module.act_format is not None:
                module.act_channel_scale = torch.ones(module.in_features, device="cuda")

    rows = {"SmolLM2-135M, full hellaswag": compare("smollm2", smollm2, smollm2_quantize, None, args.batch_size),
            f"LLaMA-7B shape, hellaswag first {args.slice}": compare("llama7b", llama7b, llama7b_quantize, args.slice,
                                                                     args.batch_size)}
    worst = min(r["ratio"] for r in rows.values())
    write_result("eval_throughput_ratio", worst, "W4A4 throughput / bf16 throughput", ">= 0.8", worst >= 0.8,
                 {"batch_size": args.batch_size, "models": list(rows)},
                 {"rows": rows, "param_file": args.param_file, "value_is": "the worse of the two models"})


if __name__ == "__main__":
    main()
