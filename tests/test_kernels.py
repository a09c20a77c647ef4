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
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    from kernel_check import BLOCK_CHECKS, PROXY_CASES
    from quant_layers.kernels import TILES

    assert report["checked"] == 8 * (3 * 6 + 3) + len(TILES) + len(PROXY_CASES) + 1 + BLOCK_CHECKS
    assert report["mismatches"] == []


def test_kernel_not_picked_on_cpu_without_the_interpreter():
    import torch

    from quant_layers import kernels
    from quant_layers.formats import fp_format
    from quant_layers.quantize import quantize_activation

    assert "TRITON_INTERPRET" in kernels.unavailable_reason(torch.zeros(2), fp_format(2, 1))
    with pytest.raises(RuntimeError, match="cannot run here"):
        quantize_activation(torch.zeros(4), fp_format(2, 1), torch.tensor(1.0), use_kernel=True)


def test_block_formats_never_reach_the_kernel():
    """Bug: weight_residuals and grid_candidates sent block-scaled formats to the Triton path, which implements
    element formats only. Under the interpreter (where the kernel is picked by default) they now take the
    reference, or refuse (grid_candidates: block formats have no per-tensor grid). Only the activation path has a
    block kernel (kernels.block_fake_quantize, checked by kernel_check.py)."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(SCRIPT.parents[1])!r})
from quant_layers import kernels
from quant_layers.formats import parse_format, fp_format
from quant_layers.quantize import quantize, quantize_activation, weight_residuals, grid_candidates
w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
ranges = torch.rand(3, 8) + 0.5
for name in ("NVFP4", "MXFP4", "NVFP4_4OVER6"):
    fmt = parse_format(name)
    assert kernels.unavailable_reason(w, fmt) is not None
    assert kernels.unavailable_reason(w, fmt, blocks=True) is None  # the activation path's block kernel
    got = weight_residuals(w, fmt, ranges, torch.float32)
    want = torch.stack([quantize(w, fmt, r.view(-1, 1)) - w for r in ranges])
    assert torch.equal(got, want), name
    clip, act_range = torch.tensor(0.8), torch.tensor(3.0)
    got = quantize_activation(w, fmt, act_range, block_clip=clip)
    assert torch.equal(got, quantize(w, fmt, act_range, clip=clip)), name
    try:
        grid_candidates(w, fmt, torch.ones(2), None, torch.float32)
        raise SystemExit("grid_candidates accepted " + name)
    except ValueError:
        pass
assert kernels.unavailable_reason(w, fp_format(2, 1)) is None  # the interpreter is on: element formats take it
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_block_kernel_gives_the_same_logits():
    """A tiny two-layer model with NVFP4, Four Over Six and MXFP4 QuantLinears (weights and activations, one with a
    block clip): its logits with the block kernel forced on equal those with the reference, bit for bit, and the
    kernel really ran (under the interpreter)."""
    script = f"""
import functools, sys, torch
from torch import nn
sys.path.insert(0, {str(SCRIPT.parents[1])!r})
from quant_layers import kernels, modules, quantize
from quant_layers.formats import parse_format
from quant_layers.modules import QuantLinear, QuantParams
g = torch.Generator().manual_seed(0)
calls = []
block_kernel = kernels.block_fake_quantize
kernels.block_fake_quantize = lambda *a, **k: calls.append(1) or block_kernel(*a, **k)
for name in ("NVFP4", "NVFP4_4OVER6", "MXFP4"):
    fmt = parse_format(name)
    net = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    for i, clip in ((0, None), (2, torch.tensor(0.8))):
        linear = QuantLinear(net[i])
        linear.set_quant_params(QuantParams(fmt, linear.weight.detach().abs().amax(1), fmt, torch.tensor(4.0),
                                            act_block_clip=clip))
        net[i] = linear
    x = torch.randn(7, 64, generator=g) * torch.exp2(torch.randint(-3, 4, (64,), generator=g).float())
    logits = {{}}
    for use_kernel in (True, False):
        modules.quantize_activation = functools.partial(quantize.quantize_activation, use_kernel=use_kernel)
        with torch.no_grad():
            logits[use_kernel] = net(x.to(torch.bfloat16).float())
    assert torch.equal(logits[True], logits[False]), name
    assert len(calls) == 2, (name, calls)  # two QuantLinears, one forward with the kernel
    calls.clear()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
