"""Diagnostic: memory in use and peak after each stage of a calibration, per GPU or (on the CPU) per process.

Wraps calibration's stages (embedding search, capture of block 0's inputs, each block, the output head) and
writes one line per stage to $OUT (or .)/mem_<placement>_<shape>_L<layers>_S<calib_size>.txt: memory in use
after the stage and the stage's own peak. Memory that stays in use from block to block is memory the
calibration keeps; a block's peak above the resident model, against its captured inputs (the `formula` line:
S*T*(3*hidden + intermediate + 2*hidden)*2 bytes), is the search's working memory. This trace found the
candidate shifts kept per block and the |X| copies of captured inputs (bench/results/NOTES.md). Within a block,
indented lines give the peak of the input capture, of the block's transforms and of every search step of every
Linear (the step's class and the weight's shape), so a recipe's (--quant_config) peak is found at its step.
--placement: offload (blocks on the CPU, one on the GPU at a time), single (whole model on cuda:0), split
(accelerate's balanced map over every GPU, as bench/multi_gpu.py) or cpu (whole model in CPU memory; memory is
the process's resident set from /proc, with glibc told to return every freed buffer over 64 KiB at once).

    python bench/mem_trace.py --layers 32 --calib_size 8 --placement offload
    python bench/mem_trace.py --placement cpu --shape qwen1.5b --vocab 1000 --layers 2 --calib_size 8 \\
        --candidates 8 --rounds 1
    python bench/mem_trace.py --placement cpu --layers 1 --calib_size 2 --vocab 1000 --candidates 8 --rounds 1 \\
        --quant_config NVFP4_4over6_search_gptq_smooth_headsmooth_config_llama
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from common import LLAMA_7B, QWEN_1_5B, llama_7b_shape  # first: puts the project root on sys.path
import utils.quant_calib as quant_calib  # noqa: E402
from configs import QBits, get_config
from quant_layers.modules import swap_modules
from utils.data.architecture import decoder_layers
from utils.search.space import SearchSpace

GIB = 1 << 30
SHAPES = {"llama7b": LLAMA_7B, "qwen1.5b": QWEN_1_5B}
MMAP_THRESHOLD = "65536"
PAPER_CONFIG = "FPQ_config_llama"  # the default config; other configs tag the trace file's name


class GpuMemory:
    """torch.cuda's allocated bytes and peaks, per GPU."""

    def now(self) -> list[float]:
        return [torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())]

    def reset(self) -> None:
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)

    def peak(self) -> list[float]:
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
        return [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]


class RssMemory:
    """The process's resident set (VmRSS) and its high-water mark (VmHWM, reset through clear_refs)."""

    @staticmethod
    def _status(key: str) -> list[float]:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return [int(line.split()[1]) * 1024]
        raise SystemExit(f"error: /proc/self/status has no {key}: the cpu placement needs Linux")

    def now(self) -> list[float]:
        return self._status("VmRSS")

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> list[float]:
        return self._status("VmHWM")


def rss_memory() -> RssMemory:
    """RssMemory of this process, which is first run again (once, at once: glibc reads the variable at start) with
    MALLOC_MMAP_THRESHOLD_ at MMAP_THRESHOLD, so that every freed buffer over 64 KiB leaves the resident set."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    return RssMemory()


def gib(values: list[float]) -> str:
    return " / ".join(f"{v / GIB:.3f}" for v in values)


class Peaks:
    """Stage peaks that nest: a stage's peak is the largest of its own since its start and its inner stages' (an
    inner stage resets the high-water mark)."""

    def __init__(self, memory) -> None:
        self.memory, self.inner = memory, []

    def measure(self, stage, *args, **kwargs):
        """(stage's result, its peak per device)."""
        self.memory.reset()
        self.inner.append([0.0] * len(self.memory.now()))
        out = stage(*args, **kwargs)
        own = [max(a, b) for a, b in zip(self.memory.peak(), self.inner.pop())]
        if self.inner:
            self.inner[-1] = [max(a, b) for a, b in zip(self.inner[-1], own)]
        self.memory.reset()
        return out, own


def traced(name: str, stage, peaks: Peaks, log):
    """stage, with the memory in use after it and its own peak (GiB) written to log."""
    def run(*args, **kwargs):
        out, peak = peaks.measure(stage, *args, **kwargs)
        label = f"block {args[1]}" if name == "block" else name
        print(f"{label}: in use {gib(peaks.memory.now())} GiB, peak {gib(peak)} GiB", file=log, flush=True)
        return out
    return run


def traced_steps(search_linear, peaks: Peaks, log):
    """search_linear with each search step's peak written to log ("  step <class>: peak ..."): which step of a
    recipe holds the block's peak."""
    def run(problem, state, steps):
        def step_of(step):
            def measured(problem, state):
                out, peak = peaks.measure(step, problem, state)
                print(f"  step {type(step).__name__} {tuple(problem.weight.shape)}: peak {gib(peak)} GiB", file=log,
                      flush=True)
                return out
            return measured
        return search_linear(problem, state, [step_of(step) for step in steps])
    return run


def build(args):
    if args.placement == "split":
        from multi_gpu import build as build_split

        return build_split(args.layers, split=True)
    device = "cpu" if args.placement == "cpu" else "cuda"
    overrides = {**SHAPES[args.shape], **({"vocab_size": args.vocab} if args.vocab else {})}
    model = llama_7b_shape(args.layers, device, **overrides)
    swap_modules(model)
    if args.placement == "offload":
        for block in decoder_layers(model):
            block.to("cpu")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calib_size", type=int, default=8)
    parser.add_argument("--placement", choices=("offload", "single", "split", "cpu"), default="offload")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama7b", help="model sizes (not with split)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size instead of the shape's")
    parser.add_argument("--candidates", type=int, default=100, help="search candidates per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quant_config", default=PAPER_CONFIG, help="a config or recipe (configs/recipes.py)")
    args = parser.parse_args()
    try:
        quant_config = get_config(args.quant_config)  # before the model is built: a wrong name fails at once
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.placement == "cpu":
        memory = rss_memory()
    elif not torch.cuda.is_available():
        raise SystemExit("error: this placement measures GPU memory: run it on a CUDA machine, or use --placement cpu")
    else:
        memory = GpuMemory()
    model = build(args)
    shape = "llama7b" if args.placement == "split" else args.shape
    tag = "" if args.quant_config == PAPER_CONFIG else f"_{args.quant_config}"
    out = Path(os.environ.get("OUT", ".")) / f"mem_{args.placement}_{shape}_L{args.layers}_S{args.calib_size}{tag}.txt"
    config = model.config
    tokens = args.calib_size * 1024
    formula = tokens * (5 * config.hidden_size + config.intermediate_size) * 2
    with open(out, "w") as log:
        print(f"shape {shape} (hidden {config.hidden_size}, intermediate {config.intermediate_size}, vocab "
              f"{config.vocab_size}), {args.layers} blocks, {args.calib_size} x 1024 tokens, {args.rounds} rounds x "
              f"{args.candidates} candidates, placement {args.placement}, {args.quant_config}", file=log)
        print(f"formula: one block's captured inputs {formula / GIB:.3f} GiB", file=log)
        peaks = Peaks(memory)
        for attribute, name in (("_calibrate_embedding", "embedding"), ("first_block_inputs", "first_block_inputs"),
                                ("_calibrate_block", "block"), ("_calibrate_head", "head"),
                                ("capture_inputs", "  capture_inputs"), ("_transform_block", "  transforms")):
            setattr(quant_calib, attribute, traced(name, getattr(quant_calib, attribute), peaks, log))
        quant_calib.search_linear = traced_steps(quant_calib.search_linear, peaks, log)
        ids = torch.randint(0, config.vocab_size, (args.calib_size, 1024), generator=torch.Generator().manual_seed(0))
        settings = quant_calib.CalibSettings(quant_config, QBits.parse([4, 4, 4, 2, 2, 2]),
                                             SearchSpace((0.01, 1.2, args.candidates), act_coarse_tokens=4096,
                                                         search_round=args.rounds),
                                             offload_device="cuda" if args.placement == "offload" else None)
        print(f"before: in use {gib(memory.now())} GiB", file=log, flush=True)
        quant_calib.calibrate(model, ids, settings)
        print(f"after: in use {gib(memory.now())} GiB", file=log, flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
