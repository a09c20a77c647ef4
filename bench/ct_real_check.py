"""The compressed-tensors export of a real model, loaded by transformers, against the project's simulation (issue 21,
item 3; the CPU test suite does the same on a tiny model: tests/test_compressed_tensors_export.py).

For NVFP4_config_llama and MXFP4_config_llama W4A4 (`--qbits 4 4 4 2 2 2`, MinMax ranges on --calib_size x 512
tokens of the C4 excerpt: the layout is checked, not the search): the model (--model: an HF folder or a .gguf) in
bfloat16 is quantized and written with `export_compressed_tensors` (shared global scales; --head quantized, the
default, or dense as vLLM serves it, which drops the head's input quantization),
`AutoModelForCausalLM.from_pretrained(DIR)` with the compressed-tensors package loads that folder, and both score
the same inputs: per-token log-likelihoods on --windows x 512 held-out tokens (Wikipedia excerpt; max and mean
|difference| in nats, held-out perplexities) and hellaswag accuracy on --limit documents. Not zero: the library
quantizes the inputs by its own rules (MXFP4's block maximum rounded up from significand 1.75, NVFP4's
scale code from amax / 6 in bfloat16) and shared global scales re-encode some fused weights; the tiny model's test
bounds these. Writes bench/results/compressed_tensors_real_check.json (informative: no target).

    python bench/ct_real_check.py [--model PATH] [--device cuda] [--limit 200] [--windows 8] [--head dense]
"""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from common import git_commit, write_result
from eval_throughput import timed_eval
from configs import QBits, get_config
from quant_layers.modules import swap_modules
from utils.data.calib_data import get_calib_data, heldout_text
from utils.data.models import load_model
from utils.export.compressed_tensors import export_compressed_tensors
from utils.quant_calib import CalibSettings, calibrate
from utils.report.evaluation import heldout_windows

CONFIGS = ("NVFP4_config_llama", "MXFP4_config_llama")
SEQLEN = 512


@torch.no_grad()
def token_logp(model, windows: torch.Tensor) -> torch.Tensor:
    """log p of every next token, float32 [windows, SEQLEN - 1]; windows: int64 [windows, SEQLEN]."""
    device = model.get_input_embeddings().weight.device
    rows = []
    for window in windows:
        logits = model(input_ids=window.view(1, -1).to(device), use_cache=False).logits[0, :-1].float()
        rows.append(logits.log_softmax(-1).gather(-1, window[1:].to(device).view(-1, 1)).squeeze(-1).cpu())
    return torch.stack(rows)


def check(path: str, config_name: str, args) -> dict:
    """Quantize, export, reload and compare one config; returns the row."""
    model, tokenizer, info = load_model(path, device=args.device, dtype="bfloat16")
    windows = heldout_windows(tokenizer, heldout_text()[0], windows=args.windows, seqlen=SEQLEN)
    config = get_config(config_name)
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    calib = get_calib_data(tokenizer, calib_size=args.calib_size, seqlen=SEQLEN, source="c4_excerpt")
    layers = calibrate(model, calib, CalibSettings(config, QBits.parse([4, 4, 4, 2, 2, 2]), None))
    simulated = token_logp(model, windows)
    simulated_eval = timed_eval(model, tokenizer, args.limit, args.batch_size) if args.limit else None
    with tempfile.TemporaryDirectory() as scratch:
        folder = f"{scratch}/export"
        start = time.perf_counter()
        report = export_compressed_tensors(model, layers, folder, config_name, tokenizer=tokenizer, head=args.head)
        export_seconds = time.perf_counter() - start
        del model
        gc.collect()
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(args.device).eval()
        served = token_logp(loaded, windows)
        served_eval = timed_eval(loaded, tokenizer, args.limit, args.batch_size) if args.limit else None
    del loaded
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    difference = (served - simulated).abs()
    row = {"model": info.source, "config": config_name, "compression_format": report.compression_format,
           "packed_linears": len(report.packed), "reencoded_linears": len(report.reencoded),
           "weight_mismatch_elements": sum(report.weight_mismatches.values()),
           "input_quantization_dropped": list(report.input_quantization_dropped), "export_seconds": export_seconds,
           "logp_max_abs_difference": float(difference.max()), "logp_mean_abs_difference": float(difference.mean()),
           "mean_logp_simulated": float(simulated.mean()), "mean_logp_loaded": float(served.mean()),
           "heldout_ppl_simulated": math.exp(-float(simulated.mean())),
           "heldout_ppl_loaded": math.exp(-float(served.mean()))}
    if args.limit:
        row.update({"hellaswag_documents": args.limit, "acc_simulated": simulated_eval[2].get("acc,none"),
                    "acc_loaded": served_eval[2].get("acc,none")})
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="an HF folder or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--calib_size", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens compared")
    parser.add_argument("--limit", type=int, default=200, help="hellaswag documents (0: none)")
    parser.add_argument("--batch_size", default="32")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--head", default="quantized", choices=["quantized", "dense"],
                        help="quantized: the head packed too, so only the input quantizers differ (transformers runs "
                             "it); dense: as vLLM serves it, the head's simulated input quantization dropped")
    args = parser.parse_args()
    rows = [check(args.model, name, args) for name in args.configs]
    worst = max(row["logp_max_abs_difference"] for row in rows)
    write_result("compressed_tensors_real_check", worst, "nats, the largest per-token log p difference (loaded - "
                 "simulated) over the configs", "informative (no target)", True,
                 {"model": rows[0]["model"], "windows": args.windows, "seqlen": SEQLEN, "device": args.device,
                  "head": args.head},
                 {"rows": rows, "commit": git_commit()})


if __name__ == "__main__":
    main()
