"""How far a W4A4 model moves when only the order of its GEMMs' sums changes: the noise floor of issue 21's "fp8
execution within 0.1 points of the simulated row".

One parameter file (--param_file, its model: --model, default the embedded SmolLM2-135M), held-out perplexity on
--windows x 1024 tokens, three ways that compute the same products of the same 4-bit codes:
  simulated             QuantLinear's forward: F.linear(Q_a(x 2^k), W_fold) in the model's dtype
  float64_accumulation  the same operands, summed in float64, rounded once to the model's dtype
  fp8                   --execution fp8 (utils/execution.py): E4M3 codes, torch._scaled_mm on CUDA, else the float32
                        reference GEMM; the scales applied after the sum
A 4-bit activation quantizer turns a last-bit change of its input into a whole grid step wherever the input lies
near a rounding boundary, and every later layer sees it, so the three differ by more than rounding. Writes
bench/results/accumulation_noise_<device>.json (informative: no target).

    python bench/accumulation_noise.py --param_file FILE [--model PATH] [--device cpu] [--dtype float32] [--windows 4]
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import git_commit, write_result
from configs import get_config
from quant_layers.modules import QuantLinear, swap_modules
from utils.data.calib_data import heldout_text
from utils.data.models import load_model
from utils.execution import layer_codes, quantized_linears, use_fp8_execution
from utils.params import apply_params, load_params
from utils.report.evaluation import heldout_perplexity


def float64_accumulation(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear's product with its sums in float64: y = dtype(Q_a(x 2^k) @ W_fold^T + bias)."""
    y = module.quantize_input(x).double() @ module.weight.double().t()
    return (y if module.bias is None else y + module.bias.double()).to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--param_file", required=True, help="an FPQ_config_llama parameter file of --model")
    parser.add_argument("--model", default=None, help="an HF folder or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--windows", type=int, default=4, help="held-out windows of 1024 tokens")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/accumulation_noise.py: --device cuda, but no CUDA device here")
    model, tokenizer, info = load_model(args.model, device=args.device, dtype=args.dtype)
    config = get_config("FPQ_config_llama")
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    layers = load_params(args.param_file)[0]
    apply_params(model, layers)
    text, _ = heldout_text()
    ppl = {}

    def measure(name: str) -> None:
        ppl[name] = heldout_perplexity(model, tokenizer, text, windows=args.windows, seqlen=1024)
        print(f"{name}: held-out perplexity {ppl[name]:.3f}", flush=True)

    measure("simulated")
    for module in quantized_linears(model).values():
        module.executor = float64_accumulation
    measure("float64_accumulation")
    for module in quantized_linears(model).values():
        module.executor = None
    print(use_fp8_execution(model, layer_codes(layers)), flush=True)
    measure("fp8")
    spread = max(ppl.values()) / min(ppl.values()) - 1
    write_result(f"accumulation_noise_{args.device}", 100 * spread, "% held-out perplexity spread (largest / "
                 "smallest - 1) over the three summation orders", "informative (no target)", True,
                 {"model": info.source, "dtype": args.dtype, "windows": args.windows, "seqlen": 1024},
                 {"heldout_perplexity": ppl, "param_file": args.param_file, "commit": git_commit()})


if __name__ == "__main__":
    main()
