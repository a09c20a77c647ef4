"""bench/mem_trace.py's nested stage peaks: a stage's peak is the largest of its own and its inner stages', though
an inner stage resets the high-water mark (a fake memory whose high-water mark the test sets by hand)."""

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
