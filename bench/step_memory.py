"""Diagnostic: which source line of a search step holds its peak memory, on one of LLaMA-7B's Linear shapes.

The best recipe's steps (bench/step_costs.py's block_steps: activation block clip, weight block scales, GPTQ) run in
order from MinMax on `bench/step_costs.py`'s problem (x [--tokens, in] bfloat16, random weight, the device's default
budget). While they run, every line executed in the project's own modules (quant_layers/, utils/) is charged with the
memory peak reached while it ran, as GiB above the memory in use when its step began, read and reset at every line
(bench/mem_trace.py's readers: CUDA's allocator peak on GPU 0; on the CPU the process's resident-set high-water mark,
glibc told to return every freed buffer over 64 KiB). The peak is charged to the innermost project line running (a
torch operator's temporaries count for the line that called it) and to every project line above it on the call
stack (the calls in progress), so a step's own line shows which call holds the peak and the lines under it, indented,
where inside. Writes $OUT (or bench/results)/step_memory_<device>_<linear>.txt: per step its peak and the --top lines
by peak.

    python bench/step_memory.py --device cuda --linear down_proj
    python bench/step_memory.py --device cpu --linear down_proj --tokens 8192
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from common import ROOT, results_folder
from mem_trace import GpuMemory, rss_memory
from quant_layers.formats import parse_format
from step_costs import LLAMA_7B_LINEARS, block_steps, llama_7b_problem
from utils.search.space import SearchSpace
from utils.search.steps import minmax_state

GIB = 1 << 30
WATCHED = (str(ROOT / "quant_layers"), str(ROOT / "utils"))


class LinePeaks:
    """sys.settrace tracer: the largest peak (bytes) while each project line ran, charged to the line and to every
    project line up its call stack (the calls in progress), with its depth there (0: the step's own method)."""

    def __init__(self, memory) -> None:
        self.memory, self.frame, self.line, self.peaks, self.caller = memory, None, None, {}, None

    def _charge(self) -> None:
        peak = self.memory.peak()[0]
        self.memory.reset()
        chain, frame, line = [], self.frame, self.line
        while frame is not None and frame is not self.caller:  # up to run()'s frame: depth 0 is the call's own
            if frame.f_code.co_filename.startswith(WATCHED):
                chain.append((frame.f_code, line))
            frame = frame.f_back
            line = None if frame is None else frame.f_lineno
        for depth, (code, line) in enumerate(reversed(chain)):
            key = (code.co_filename, line, code.co_name)
            if peak > self.peaks.get(key, (0, 0))[0]:
                self.peaks[key] = (peak, depth)

    def trace(self, frame, event, arg):
        return self._local if frame.f_code.co_filename.startswith(WATCHED) else None

    def _local(self, frame, event, arg):
        if event in ("line", "return"):
            self._charge()
            if event == "line":
                self.frame, self.line = frame, frame.f_lineno
            else:  # back in the caller's line (a project line or not: the chain skips those)
                self.frame = frame.f_back
                self.line = None if frame.f_back is None else frame.f_back.f_lineno
        return self._local

    def run(self, call, *args):
        self.memory.reset()
        self.frame, self.line, self.peaks, self.caller = None, None, {}, sys._getframe()
        sys.settrace(self.trace)
        try:
            return call(*args)
        finally:
            sys.settrace(None)
            self._charge()
            self.frame = self.caller = None

    def report(self, base: int, top: int) -> list[str]:
        """The `top` lines by peak (GiB above base), a call's lines under it (indented by depth)."""
        ranked = sorted(self.peaks.items(), key=lambda item: (-item[1][0], item[1][1]))[:top]
        return [f"  {(peak - base) / GIB:+7.3f} GiB  {'  ' * depth}{Path(file).relative_to(ROOT)}:{line} {name}"
                for (file, line, name), (peak, depth) in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cuda on the GPU machine")
    parser.add_argument("--linear", choices=list(LLAMA_7B_LINEARS), default="down_proj")
    parser.add_argument("--format", default="NVFP4_4OVER6", help="the block format (parse_format's names)")
    parser.add_argument("--tokens", type=int, default=32 * 1024, help="calibration tokens (calib_7b's: 32 x 1024)")
    parser.add_argument("--top", type=int, default=15, help="lines listed per step")
    args = parser.parse_args()
    device = torch.device(args.device)
    memory = GpuMemory() if device.type == "cuda" else rss_memory()  # before any work: the CPU's runs again first
    problem = llama_7b_problem(args.linear, args.device, args.tokens, torch.Generator(device=device).manual_seed(0))
    fmt = parse_format(args.format)
    state = minmax_state(problem, fmt, fmt, True)
    lines = [f"{args.linear} {tuple(problem.weight.shape)}, {args.tokens} tokens, {fmt.name}, device {args.device}, "
             f"budget {problem.budget.bytes / GIB:.2f} GiB; GiB above the memory in use at the step's start"]
    tracer = LinePeaks(memory)
    for name, parts in block_steps(SearchSpace()):
        for step in parts:
            base = memory.now()[0]
            started = time.perf_counter()
            state = tracer.run(step, problem, state)
            top = max((peak for peak, _ in tracer.peaks.values()), default=base)
            lines.append(f"{name} ({type(step).__name__}): in use {base / GIB:.3f} GiB at its start, peak "
                         f"+{(top - base) / GIB:.3f} GiB, {time.perf_counter() - started:.1f} s traced")
            lines += tracer.report(base, args.top)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else results_folder()
    path = folder / f"step_memory_{device.type}_{args.linear}.txt"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
