"""What quantizing the output head alone costs, and what SmoothQuant's migration at the head would win back.

Every module but the head stays in full precision: h [N, d] = the final norm's output on held-out windows of the
Wikipedia excerpt (the text of --heldout_ppl), W [vocab, d] the head's weight, and the perplexity of the logits
    Q_a(h / s) Q_w(W diag(s))^T,   Q = round-to-nearest `quantize` with the tensor range amax|.| (dynamic blocks),
with s = 1 (no migration) or SmoothQuant's s_j = max|h_j|^alpha / max|W_j|^(1-alpha) (`migration_scales`, what the
`smooth` component folds into the blocks' norms; the head's final norm could absorb 1 / s the same way), or of
Q_a(h R) Q_w(W R)^T with R the block Hadamard of --hadamards' sizes (what `had16` / `had32` do to the blocks'
Linears), beside the head with only its weight or only its input quantized. The recipes quantize the head with the
block Linears' steps (search, GPTQ); `smooth` and the block Hadamards stop at the blocks (only `rot`'s residual
rotation reaches the head). This measures the head alone under round to nearest.
Writes one JSON (--output); a model is --model (a .gguf or folder; default the embedded SmolLM2-135M).

    python bench/head_probe.py --windows 8 --seqlen 512 --output docs/results/SmolLM2-135M/head_probe_cpu/NVFP4.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.run.reproducible import pin_cpu_numerics  # noqa: E402

pin_cpu_numerics()  # before torch loads
import torch  # noqa: E402

from bench.common import captured_inputs, environment, git_commit  # noqa: E402
from quant_layers.formats import parse_format  # noqa: E402
from quant_layers.hadamard import block_hadamard  # noqa: E402
from quant_layers.quantize import quantize  # noqa: E402
from utils.data.calib_data import heldout_text  # noqa: E402
from utils.data.models import load_model  # noqa: E402
from utils.report.evaluation import heldout_windows  # noqa: E402
from utils.run.fileio import write_bytes_atomic  # noqa: E402
from utils.search.transforms import migration_scales  # noqa: E402


def perplexity(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 512) -> float:
    """exp(mean cross-entropy) of the logits h weight^T against labels (-100: not scored), chunk rows at a time."""
    nll = sum(torch.nn.functional.cross_entropy(h[i:i + chunk] @ weight.T, labels[i:i + chunk], ignore_index=-100,
                                                reduction="sum").item() for i in range(0, h.shape[0], chunk))
    return math.exp(nll / int((labels != -100).sum()))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file or model folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--format", default="NVFP4", help="the head's weight and input format (default NVFP4)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--hadamards", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    fmt = parse_format(args.format)
    model, tokenizer, _ = load_model(args.model, device="cpu", dtype="float32")
    text, source = heldout_text()
    ids = heldout_windows(tokenizer, text, windows=args.windows, seqlen=args.seqlen)
    modules = dict(model.named_modules())
    head_name = next(name for name, module in modules.items() if module is model.get_output_embeddings())
    h = captured_inputs(model, modules, [head_name], ids)[head_name].float()
    labels = torch.cat([torch.cat([w[1:], torch.tensor([-100])]) for w in ids])
    weight = modules[head_name].weight.detach().float()

    def q(x: torch.Tensor) -> torch.Tensor:
        return quantize(x, fmt, x.abs().max())

    rows = {"full_precision": perplexity(h, weight, labels), "round_to_nearest": perplexity(q(h), q(weight), labels),
            "weight_only": perplexity(h, q(weight), labels), "input_only": perplexity(q(h), weight, labels)}
    for alpha in args.alphas:
        s = migration_scales(h.abs().amax(0), [weight], alpha).float()
        rows[f"smooth_{alpha}"] = perplexity(q(h / s), q(weight * s), labels)
    for size in args.hadamards:
        rows[f"hadamard_{size}"] = perplexity(q(block_hadamard(h, size)), q(block_hadamard(weight, size)), labels)
    for name, value in rows.items():
        print(f"{name}: {value:.4f}", flush=True)
    record = {"what": "held-out perplexity with only the head quantized", "format": fmt.name,
              "heldout_tokens": args.windows * args.seqlen, "heldout_text": source, "perplexity": rows,
              "input_channel_peak_over_median": float(h.abs().amax(0).max() / h.abs().amax(0).median()),
              **environment(), "commit": git_commit()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(args.output), (json.dumps(record, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
