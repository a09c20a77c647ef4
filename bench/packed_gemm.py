"""Packed NVFP4 / MXFP4 execution against bfloat16 on one GPU, side by side in one run (issue 21: weight memory
<= 0.3x bf16, whole-model throughput >= 0.9x bf16).

1. GEMM: y = x @ W^T through packed_matmul (quant_layers/packed_linear.py: what the model runs, the decode-then-GEMM
   path from DEQUANTIZE_MIN_ROWS rows) and through the fused kernel alone (autotuned), against torch's bfloat16
   matmul, at LLaMA-7B's and Qwen2.5-Coder-1.5B's Linear shapes for several token counts M; both packed paths are
   first checked against the reference (the tests' tolerance). Times from triton.testing.do_bench.
2. Whole model, Qwen2.5-Coder-1.5B (the GGUF of complete_scripts/Qwen2.5-Coder-1.5B, or --model_args): hellaswag's
   first --limit documents evaluated as lm-eval does (mirrors bench/eval_throughput.py: a 20-document warm-up, then
   the timed run) in bfloat16, simulated (--config, MinMax ranges from random calibration tokens: no search, so no
   accuracy claim), then with `use_execution(model, "packed", ...)` after every kernel shape's autotuning. Weight
   memory: torch.cuda.memory_allocated before and after the conversion (the float Linear weights freed) against the
   Linears' bfloat16 bytes.

Writes bench/results/packed_weight_memory_ratio.json (packed / bf16 bytes of the Linear weights, target <= 0.3),
packed_eval_throughput_ratio.json (packed / bf16 requests per second, target >= 0.9) and
packed_gemm_speedup_vs_bf16.json (the GEMM table; no target: informative).

    python bench/packed_gemm.py [--model_args pretrained=PATH] [--config NVFP4_config_llama] [--limit 400]
                                [--parts gemm model]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import LLAMA_7B, QWEN_1_5B, git_commit, synchronize, write_result

TOKENS = (16, 256, 4096, 16384)  # M: a few tokens (generation-like) to long prefills (the 4096, 16384)
QWEN_GGUF = "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"  # under the cache, as complete_scripts/ fetches it


def linear_shapes(sizes: dict) -> dict[str, tuple[int, int]]:
    """{name: (N, K)} of a Llama/Qwen2 decoder's Linears and its head."""
    hidden, inter, heads, kv = (sizes[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_key_value_heads"))
    kv_out = hidden // heads * kv
    shapes = {"q_proj / o_proj": (hidden, hidden), "k_proj / v_proj": (kv_out, hidden), "gate / up": (inter, hidden),
              "down": (hidden, inter), "lm_head": (sizes["vocab_size"], hidden)}
    return {name: shape for name, shape in shapes.items() if not (kv_out == hidden and name == "k_proj / v_proj")}


def gemm_rows(fmt_name: str) -> list[dict]:
    """Packed kernel vs bf16 F.linear per (model, Linear, M): milliseconds, TFLOP/s, speedup; ValueError if a packed
    result leaves the reference's tolerance."""
    from triton.testing import do_bench

    from quant_layers.codes import decode, encode
    from quant_layers.formats import parse_format
    from quant_layers.packed_linear import PackedWeight, packed_matmul, packed_matmul_reference

    fmt = parse_format(fmt_name)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for model_name, sizes in (("LLaMA-7B", LLAMA_7B), ("Qwen2.5-Coder-1.5B", QWEN_1_5B)):
        for linear, (n, k) in linear_shapes(sizes).items():
            weight = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
            encoded = encode(weight, fmt, weight.float().abs().amax())
            simulated = decode(encoded)
            packed = PackedWeight.from_encoded(encoded, simulated)
            check = torch.randn(64, k, device="cuda", generator=g).to(torch.bfloat16)
            want = packed_matmul_reference(check, packed)
            bound = (2 * k * 2.0**-24 * (check.float().abs() @ packed.unit_scaled(torch.float32).abs().T)  # sums
                     * (1.0 if packed.tensor_scale is None else packed.tensor_scale)
                     + want.float().abs() * 2.0**-7)  # each rounds to bfloat16 on its own: one ulp apart at most
            for dequantize in (False, True):
                got = packed_matmul(check, packed, use_kernel=True, dequantize=dequantize)
                if not bool(((got.float() - want.float()).abs() <= bound + 1e-30).all()):
                    raise ValueError(f"{model_name} {linear} [{n}, {k}]: packed_matmul (dequantize={dequantize}) "
                                     "leaves the reference's tolerance")
            for m in TOKENS:
                x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
                packed_ms = do_bench(lambda: packed_matmul(x, packed, use_kernel=True))  # what the model runs
                fused_ms = do_bench(lambda: packed_matmul(x, packed, use_kernel=True, dequantize=False))
                bf16_ms = do_bench(lambda: torch.nn.functional.linear(x, weight))
                row = {"model": model_name, "linear": linear, "M": m, "N": n, "K": k, "packed_ms": packed_ms,
                       "fused_kernel_ms": fused_ms, "bf16_ms": bf16_ms, "speedup": bf16_ms / packed_ms,
                       "fused_kernel_speedup": bf16_ms / fused_ms,
                       "packed_tflops": 2e-9 * m * n * k / packed_ms, "bf16_tflops": 2e-9 * m * n * k / bf16_ms}
                rows.append(row)
                print(f"{model_name:19s} {linear:16s} M={m:6d} N={n:6d} K={k:6d}  packed {packed_ms:8.4f} ms  fused "
                      f"{fused_ms:8.4f} ms  bf16 {bf16_ms:8.4f} ms  x{row['speedup']:.2f}", flush=True)
    return rows


def timed_eval(model, tokenizer, limit: int, batch_size: str) -> tuple[float, int, float | None]:
    """(seconds, requests, accuracy) of hellaswag's first `limit` documents after a 20-document warm-up."""
    from utils.data.task_data import get_task_specs
    from utils.report.evaluation import evaluate

    tasks = get_task_specs(["hellaswag"])
    evaluate(model, tokenizer, tasks, batch_size=batch_size, num_fewshot=0, limit=20, seed=0)
    synchronize()
    start = time.perf_counter()
    results = evaluate(model, tokenizer, tasks, batch_size=batch_size, num_fewshot=0, limit=limit, seed=0)
    synchronize()
    seconds = time.perf_counter() - start
    return seconds, 4 * results["n-samples"]["hellaswag"]["effective"], results["results"]["hellaswag"].get("acc,none")


def tune_kernels(model, tokens: int) -> int:
    """Run every packed Linear's kernel once per autotuner M bucket up to `tokens` rows, so that no timed run tunes;
    returns the distinct (N, K, bias) shapes tuned."""
    from quant_layers.modules import QuantLinear
    from quant_layers.packed_linear import m_bucket

    shapes = {}
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.executor is not None:
            key = (module.out_features, module.in_features, module.bias is not None)
            shapes.setdefault(key, module)
    buckets = sorted({m_bucket(2**i) for i in range(4, max(tokens, 16).bit_length() + 1)})
    with torch.no_grad():
        for module in shapes.values():
            for m in buckets:
                x = torch.randn(m, module.in_features, device="cuda", dtype=torch.bfloat16)
                module.executor(module, x)
    synchronize()
    return len(shapes)


def linear_weight_bytes(model) -> int:
    from quant_layers.modules import QuantLinear

    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, QuantLinear))


def whole_model(pretrained: str, config_name: str, limit: int, batch_size: str) -> dict:
    """bf16, simulated and packed evaluation of one model, and its Linear weights' memory before and after packing."""
    from configs import QBits, get_config
    from quant_layers.modules import swap_modules
    from utils.data.models import load_model
    from utils.execution import executed_weight_bytes, layer_codes, use_execution
    from utils.quant_calib import CalibSettings, calibrate

    model, tokenizer, info = load_model(pretrained, device="cuda", dtype="bfloat16")
    bf16_seconds, requests, bf16_acc = timed_eval(model, tokenizer, limit, batch_size)
    config = get_config(config_name)
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    ids = torch.randint(0, model.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    layers = calibrate(model, ids, CalibSettings(config, QBits.parse([4, 4, 4, 2, 2, 2]), None))
    simulated_seconds, _, simulated_acc = timed_eval(model, tokenizer, limit, batch_size)
    bf16_bytes = linear_weight_bytes(model)
    synchronize()
    before = torch.cuda.memory_allocated()
    print(use_execution(model, "packed", layer_codes(layers)), flush=True)
    summary = executed_weight_bytes(model)
    synchronize()
    packed_bytes = bf16_bytes - (before - torch.cuda.memory_allocated())
    tuned = tune_kernels(model, 16384)
    packed_seconds, _, packed_acc = timed_eval(model, tokenizer, limit, batch_size)
    return {"model": info.source, "config": config_name, "requests": requests, "bf16_seconds": bf16_seconds,
            "simulated_seconds": simulated_seconds, "packed_seconds": packed_seconds,
            "packed_ratio": bf16_seconds / packed_seconds, "simulated_ratio": bf16_seconds / simulated_seconds,
            "bf16_acc": bf16_acc, "simulated_acc": simulated_acc, "packed_acc": packed_acc,
            "linear_bf16_bytes": bf16_bytes, "linear_packed_bytes_allocated": packed_bytes,
            "linear_packed_bytes_counted": summary["weight_bytes"], "memory_ratio": packed_bytes / bf16_bytes,
            "packed_linears": summary["modules"], "tuned_shapes": tuned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_args", default="", help="pretrained=PATH (default: the cache's Qwen2.5-Coder GGUF)")
    parser.add_argument("--config", default="NVFP4_config_llama", choices=["NVFP4_config_llama", "MXFP4_config_llama"])
    parser.add_argument("--limit", type=int, default=400, help="hellaswag documents timed")
    parser.add_argument("--batch_size", default="64")
    parser.add_argument("--parts", nargs="+", choices=["gemm", "model"], default=["gemm", "model"],
                        help="the GEMM table, the whole-model measures (each writes its results; one GPU call each)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/packed_gemm.py measures the packed kernel on a GPU: no CUDA device here")
    from utils.data.cache import cache_dir

    pretrained = dict(a.split("=", 1) for a in args.model_args.split(",") if "=" in a).get("pretrained")
    pretrained = pretrained or str(cache_dir() / QWEN_GGUF)
    fmt_name = args.config.split("_")[0]
    extra = {"commit": git_commit()}
    if "gemm" in args.parts:
        gemm = gemm_rows(fmt_name)
        worst = min(r["speedup"] for r in gemm)
        write_result("packed_gemm_speedup_vs_bf16", worst, "bf16 GEMM time / packed GEMM time, the lowest row",
                     "informative (no target)", True, {"format": fmt_name, "tokens": list(TOKENS)},
                     {"rows": gemm, **extra})
    if "model" in args.parts:
        row = whole_model(pretrained, args.config, args.limit, args.batch_size)
        print(row, flush=True)
        shapes = {"model": row["model"], "config": args.config, "hellaswag_documents": args.limit,
                  "batch_size": args.batch_size}
        write_result("packed_weight_memory_ratio", row["memory_ratio"], "x bf16 bytes of the Linear weights on the "
                     "GPU", "<= 0.3", row["memory_ratio"] <= 0.3, shapes, {"row": row, **extra})
        write_result("packed_eval_throughput_ratio", row["packed_ratio"], "packed throughput / bf16 throughput",
                     ">= 0.9", row["packed_ratio"] >= 0.9, shapes, {"row": row, **extra})


if __name__ == "__main__":
    main()
