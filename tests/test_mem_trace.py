"""bench/mem_trace.py's nested stage peaks: a stage's peak is the largest of its own and its inner stages', though
an inner stage resets the high-water mark; bench/step_memory.py's line peaks: a line's peak is charged to it and to
the calls in progress above it (a fake memory whose high-water mark the tests set by hand)."""

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class FakeMemory:
    """One device; `use(n)` raises the high-water mark, `reset` sets it to what is in use (as clear_refs does)."""

    def __init__(self):
        self.in_use, self.high = 0.0, 0.0

    def use(self, amount):
        self.high = max(self.high, self.in_use + amount)

    def now(self):
        return [self.in_use]

    def reset(self):
        self.high = self.in_use

    def peak(self):
        return [self.high]


def test_outer_peak_includes_an_inner_stage_that_reset_the_mark(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    mem_trace = importlib.import_module("mem_trace")
    memory = FakeMemory()
    peaks = mem_trace.Peaks(memory)
    seen = {}

    def inner():
        memory.use(7.0)  # the block's highest moment, inside a step
        return "inner"

    def outer():
        memory.use(3.0)
        seen["inner"] = peaks.measure(inner)
        memory.use(2.0)  # after the step reset the mark: below the step's 7
        return "outer"

    out, peak = peaks.measure(outer)
    assert out == "outer" and peak == [7.0]
    assert seen["inner"] == ("inner", [7.0])
    assert peaks.inner == []  # nothing left open


def test_stage_peak_is_its_own_when_inner_stages_stay_lower(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    mem_trace = importlib.import_module("mem_trace")
    memory = FakeMemory()
    peaks = mem_trace.Peaks(memory)

    def outer():
        peaks.measure(lambda: memory.use(1.0))
        memory.use(5.0)

    assert peaks.measure(outer)[1] == [5.0]


def _inner(memory):
    memory.use(5.0)
    return 1


def _outer(memory):
    memory.use(2.0)
    _inner(memory)
    return 0


def test_line_peaks_charge_the_line_and_the_calls_above_it(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    step_memory = importlib.import_module("step_memory")
    here = str(Path(__file__).resolve())
    monkeypatch.setattr(step_memory, "WATCHED", (here,))  # these functions stand for the project's modules
    memory = FakeMemory()
    tracer = step_memory.LinePeaks(memory)
    assert tracer.run(_outer, memory) == 0
    first_outer, first_inner = _outer.__code__.co_firstlineno, _inner.__code__.co_firstlineno
    assert tracer.peaks[(here, first_outer + 1, "_outer")] == (2.0, 0)  # memory.use(2.0): its own peak only
    assert tracer.peaks[(here, first_outer + 2, "_outer")] == (5.0, 0)  # the call of _inner: the callee's peak
    assert tracer.peaks[(here, first_inner + 1, "_inner")] == (5.0, 1)  # the line itself, one call deep
    assert tracer.peaks.get((here, first_outer + 3, "_outer"), (0.0, 0))[0] == 0.0  # after the call: nothing new
    lines = tracer.report(0.0, 2)
    assert len(lines) == 2 and "_outer" in lines[0] and "_inner" in lines[1]
    assert lines[1].split("GiB")[1].startswith("    tests/")  # the callee indented under its caller
