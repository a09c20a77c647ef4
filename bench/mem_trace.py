"""Diagnostic (GPU): memory allocated and peak after each stage of a 7B-shaped calibration, per GPU.

Wraps calibration's stages (embedding search, capture of block 0's inputs, each block, the output head) and
writes one line per stage to $OUT (or .)/mem_<placement>_L<layers>_S<calib_size>.txt: allocated memory after
the stage and the stage's own peak, per GPU. Memory that stays allocated from block to block is memory the
calibration keeps. This trace found the candidate shifts kept per block (bench/results/NOTES.md).
--placement: offload (blocks on the CPU, one on the GPU at a time), single (whole model on cuda:0) or split
(accelerate's balanced map over every GPU, as bench/multi_gpu.py).

    python bench/mem_trace.py --layers 32 --calib_size 8 --placement offload
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from common import llama_7b_shape  # first: puts the project root on sys.path
import utils.quant_calib as quant_calib  # noqa: E402
from configs import QBits, get_config
from quant_layers.modules import swap_modules
from utils.models import decoder_layers
from utils.search import SearchSpace

GIB = 1 << 30


def allocated() -> str:
    return " / ".join(f"{torch.cuda.memory_allocated(i) / GIB:.3f}" for i in range(torch.cuda.device_count()))


def traced(name: str, stage, log):
    """stage, with the allocated memory after it and its own peak (GiB per GPU) written to log."""
    def run(*args, **kwargs):
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
        out = stage(*args, **kwargs)
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
        label = f"block {args[1]}" if name == "block" else name
        peaks = " / ".join(f"{torch.cuda.max_memory_allocated(i) / GIB:.3f}" for i in range(torch.cuda.device_count()))
        print(f"{label}: allocated {allocated()} GiB, peak {peaks} GiB", file=log, flush=True)
        return out
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calib_size", type=int, default=8)
    parser.add_argument("--placement", choices=("offload", "single", "split"), default="offload")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: mem_trace.py measures GPU memory: run it on a CUDA machine")
    if args.placement == "split":
        from multi_gpu import build

        model = build(args.layers, split=True)
    else:
        model = llama_7b_shape(args.layers, "cuda")
        swap_modules(model)
    if args.placement == "offload":
        for block in decoder_layers(model):
            block.to("cpu")
    out = Path(os.environ.get("OUT", ".")) / f"mem_{args.placement}_L{args.layers}_S{args.calib_size}.txt"
    with open(out, "w") as log:
        for attribute, name in (("_calibrate_embedding", "embedding"), ("_first_block_inputs", "first_block_inputs"),
                                ("_calibrate_block", "block"), ("_calibrate_head", "head")):
            setattr(quant_calib, attribute, traced(name, getattr(quant_calib, attribute), log))
        ids = torch.randint(0, model.config.vocab_size, (args.calib_size, 1024),
                            generator=torch.Generator().manual_seed(0))
        settings = quant_calib.CalibSettings(get_config("FPQ_config_llama"), QBits.parse([4, 4, 4, 2, 2, 2]),
                                             SearchSpace(0.01, 1.2, 100, coarse_tokens=4096), 3,
                                             offload_device="cuda" if args.placement == "offload" else None)
        print(f"before: allocated {allocated()} GiB", file=log, flush=True)
        quant_calib.calibrate(model, ids, settings)
        print(f"after: allocated {allocated()} GiB", file=log, flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
