"""Packed checkpoint size against the bf16 checkpoint (issue 21: `packed_checkpoint_size_ratio`, target <= 0.3 for W4
recipes), measured from the files: main.py calibrates the model with tiny settings (sizes do not depend on the
calibration) and writes `--export_dir`; the bf16 reference is the original model saved by `save_pretrained` in
bfloat16 (a tied head stored once, as the model ships). Writes bench/results/packed_checkpoint_size_ratio.json (the
largest ratio over the configs, the W4 recipes' verdict) with every config's bytes.

    python bench/packed_size.py [--model_args pretrained=PATH] [--configs FPQ_config_llama NVFP4_config_llama ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, write_result


def bf16_checkpoint_bytes(model_args: str) -> tuple[int, int]:
    """(bytes of model.safetensors as save_pretrained writes the model in bfloat16, parameters), tied tensors once."""
    import torch

    from utils.data.models import load_model

    pretrained = dict(a.split("=", 1) for a in model_args.split(",") if "=" in a).get("pretrained")
    model = load_model(pretrained, dtype=torch.bfloat16)[0]  # as main.py loads it (GGUF: dequantized once)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    return size, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_args", default="")
    parser.add_argument("--configs", nargs="+", default=["FPQ_config_llama", "NVFP4_config_llama",
                                                           "MXFP4_config_llama", "NVFP4_fpends_config_llama"])
    args = parser.parse_args()
    reference, parameters = bf16_checkpoint_bytes(args.model_args)
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for config in args.configs:
            out = Path(work) / config
            command = [sys.executable, "main.py", "--tasks", "piqa", "--limit", "1", "--device", "cpu",
                       "--batch_size", "1", "--quant_config", config, "--calib_size", "1", "--calib_seqlen", "64",
                       "--search_round", "1", "--search_intervals", "0.5", "1.2", "4",
                       "--search_result_dir", str(out / "params"), "--output_path", str(out / "run.json"),
                       "--export_dir", str(out / "export")]
            command += ["--model_args", args.model_args] if args.model_args else []
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            weights = (out / "export" / "model.safetensors").stat().st_size
            rows[config] = {"model_safetensors_bytes": weights, "ratio_to_bf16": weights / reference,
                            "export_size": json.loads((out / "run.json").read_text())["quantization"]["export"]["size"]}
            print(f"{config}: {weights} bytes, {weights / reference:.3f} of bf16 ({reference} bytes)", flush=True)
    w4 = [c for c in rows if "fpends" not in c]
    worst = max(rows[c]["ratio_to_bf16"] for c in w4)
    write_result("packed_checkpoint_size_ratio", worst, "x bf16 checkpoint bytes", "<= 0.3", worst <= 0.3,
                 {"model_args": args.model_args or "embedded SmolLM2-135M-Instruct", "parameters": parameters,
                  "bf16_checkpoint_bytes": reference},
                 extra={"configs": rows, "value_is": "the largest ratio over the W4 configs (fpends ones are "
                                                     "listed, not judged: their head and embedding stay 16-bit)"})


if __name__ == "__main__":
    main()
