"""Diagnostic (GPU): memory allocated and peak after each stage of a 7B-shaped calibration with offload.

Wraps calibration's stages (embedding search, capture of block 0's inputs, each block, the output head) and
writes one line per stage to $OUT (or .)/mem_L<layers>_S<calib_size>.txt: allocated memory after the stage
and the stage's own peak. Memory that stays allocated from block to block is memory the calibration keeps.
This trace found the candidate shifts kept per block (bench/results/NOTES.md).

    python bench/mem_trace.py --layers 32 --calib_size 8
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


def traced(name: str, stage, log):
    """stage, with the allocated memory after it and its own peak written to log."""
    def run(*args, **kwargs):
        torch.cuda.reset_peak_memory_stats()
        out = stage(*args, **kwargs)
        torch.cuda.synchronize()
        label = f"block {args[1]}" if name == "block" else name
        print(f"{label}: allocated {torch.cuda.memory_allocated() / GIB:.3f} GiB, "
              f"peak {torch.cuda.max_memory_allocated() / GIB:.3f} GiB", file=log, flush=True)
        return out
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calib_size", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: mem_trace.py measures GPU memory: run it on a CUDA machine")
    model = llama_7b_shape(args.layers, "cuda")
    for block in decoder_layers(model):
        block.to("cpu")
    swap_modules(model)
    out = Path(os.environ.get("OUT", ".")) / f"mem_L{args.layers}_S{args.calib_size}.txt"
    with open(out, "w") as log:
        for attribute, name in (("_calibrate_embedding", "embedding"), ("_first_block_inputs", "first_block_inputs"),
                                ("_calibrate_block", "block"), ("_calibrate_head", "head")):
            setattr(quant_calib, attribute, traced(name, getattr(quant_calib, attribute), log))
        ids = torch.randint(0, model.config.vocab_size, (args.calib_size, 1024),
                            generator=torch.Generator().manual_seed(0))
        settings = quant_calib.CalibSettings(get_config("FPQ_config_llama"), QBits.parse([4, 4, 4, 2, 2, 2]),
                                             SearchSpace(0.01, 1.2, 100, coarse_tokens=4096), 3, offload_device="cuda")
        print(f"before: allocated {torch.cuda.memory_allocated() / GIB:.3f} GiB", file=log, flush=True)
        quant_calib.calibrate(model, ids, settings)
        print(f"after: allocated {torch.cuda.memory_allocated() / GIB:.3f} GiB", file=log, flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
