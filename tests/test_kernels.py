"""The fused Triton quantizer equals the PyTorch reference bit for bit, and the fused weight proxy equals its
reference up to summation order (Triton's interpreter on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (requirements.txt installs it on Linux)")

SCRIPT = Path(__file__).with_name("kernel_check.py")


def test_kernel_equals_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", LLM_FP4_KERNEL="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    from kernel_check import PROXY_CASES
    from quant_layers.kernels import TILES

    assert report["checked"] == 8 * (3 * 6 + 3) + len(TILES) + len(PROXY_CASES) + 1
    assert report["mismatches"] == []


def test_kernel_disabled_without_interpreter_on_cpu():
    import torch

    from quant_layers import kernels

    assert not kernels.enabled(torch.zeros(2))
