"""Packed NVFP4 / MXFP4 execution (quant_layers/packed_linear.py, utils/execution.py): the Triton GEMM kernel under
Triton's interpreter against its PyTorch reference and an independent plain-Python decode, and a calibrated tiny model
with `use_execution(model, "packed", ...)` against the simulated model.

The interpreter must be on before Triton is imported, so the `test_interpreted_*` tests run in a subprocess
(`test_under_the_interpreter` reruns them with TRITON_INTERPRET=1); the others run in the suite's process.

Tolerance of the GEMM (kernel vs reference, both summing exact float32 products x * (f s) in float32, in different
orders): |got - want| <= 2 K 2^-24 sum_k |x w| |t| (each order errs by at most K 2^-24 of the sum of the products'
magnitudes, to first order), plus half a unit in the last place of the output dtype for bfloat16 outputs (two
float32 sums a few ulps apart can round to neighbouring bfloat16 numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny, one_line_value_error, run_main
from configs import QBits, get_config
from quant_layers.codes import encode
from quant_layers.formats import parse_format
from quant_layers.modules import QuantLinear, swap_modules
from quant_layers.packed_linear import (DEQUANTIZE_MIN_ROWS, TILES, PackedWeight, decode_unit_scaled, packed_matmul,
                                        packed_matmul_reference)
from utils.execution import EXECUTIONS, executed_weight_bytes, layer_codes, use_execution
from utils.quant_calib import CalibSettings, calibrate
from utils.search.space import SearchSpace

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_interpreter's subprocess")
FORMATS = ("NVFP4", "MXFP4", "NVFP4_4OVER6")
SMALL_TILE = (16, 32, 64, 4, 1)  # cuts the shapes below unevenly
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP FP4 (E2M1) magnitudes of codes 0..7; code + 8 is the negative
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
W4A4 = QBits.parse([4, 4, 4, 2, 2, 2])


def test_under_the_interpreter():
    """This file's `interpreted` tests, run with TRITON_INTERPRET=1 (the kernel on the CPU)."""
    if INTERPRETED:
        pytest.skip("already under the interpreter")
    pytest.importorskip("triton", reason="Triton is not installed (requirements.txt installs it on Linux)")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "test_interpreted_"], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "skipped" not in done.stdout.splitlines()[-1], done.stdout[-1000:]  # every one of them ran


def packed_weight(fmt_name: str, n: int, k: int, dtype: torch.dtype, seed: int = 0, per_row: bool = False):
    """(PackedWeight, the simulated weight) of a random [n, k] weight (rows of spread magnitudes) in fmt."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-6, 2, (n, 1), generator=g).float())).to(dtype)
    max_value = w.float().abs().amax(1, keepdim=True) if per_row else w.float().abs().amax()
    encoded = encode(w, parse_format(fmt_name), max_value)
    from quant_layers.codes import decode

    simulated = decode(encoded)
    return PackedWeight.from_encoded(encoded, simulated), simulated


def plain_unit_weight(packed: PackedWeight) -> torch.Tensor:
    """f * s [N, K] in float64 from the bytes, by plain Python tables: an independent decode (not codes.decode)."""
    codes = torch.stack([packed.codes & 15, packed.codes >> 4], -1).reshape(packed.shape).long()
    table = torch.tensor(FP4 + [-v for v in FP4], dtype=torch.float64)
    if packed.fmt.block.power_of_two:
        scales = torch.tensor([2.0 ** (b - 127) for b in range(256)], dtype=torch.float64)[packed.block_scale.long()]
    else:  # E4M3: sign 0, exponent e (4 bits, bias 7), mantissa m (3 bits); e = 0: m / 8 * 2^-6
        def e4m3(byte: int) -> float:
            e, m = byte >> 3, byte & 7
            return m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        scales = torch.tensor([e4m3(b) for b in range(128)], dtype=torch.float64)[packed.block_scale.long()]
    return table[codes] * scales.repeat_interleave(packed.fmt.block.size, dim=1)


def gemm_tolerance(x: torch.Tensor, packed: PackedWeight, want: torch.Tensor) -> torch.Tensor:
    magnitude = x.double().abs() @ plain_unit_weight(packed).abs().T
    if packed.tensor_scale is not None:
        magnitude = magnitude * packed.tensor_scale.double().abs()
    tolerance = 2 * x.shape[-1] * 2.0**-24 * magnitude + 1e-30
    if want.dtype == torch.bfloat16:  # both round to bfloat16 on their own: one ulp (<= 2^-7 |want|) apart at most
        tolerance = tolerance + want.double().abs() * 2.0**-7
    return tolerance


@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("per_row", [False, True])
def test_reference_decodes_the_bytes_exactly(fmt_name, per_row):
    """The reference's weight (the project's decode with t = 1) is the plain-Python f * s bit for bit, and f * s * t is
    the simulated weight up to the simulation's own float32 roundings (MXFP4: exactly)."""
    for dtype in (torch.float32, torch.bfloat16):
        packed, simulated = packed_weight(fmt_name, 24, 96, dtype, per_row=per_row)
        unit = packed.unit_scaled(torch.float64)
        assert torch.equal(unit, plain_unit_weight(packed))
        assert torch.equal(packed.unit_scaled(dtype).double(), unit)  # exact in bfloat16 too
        t = 1.0 if packed.tensor_scale is None else packed.tensor_scale.double().view(-1, 1)
        if packed.fmt.block.power_of_two:
            assert torch.equal((unit * t).to(dtype), simulated)
        else:
            ulps = 2.0**-23 * 4 if dtype == torch.float32 else 2.0**-8
            assert bool(((unit * t - simulated.double()).abs() <= ulps * simulated.double().abs()).all())


@interpreted
@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("m, n, k", [(1, 40, 96), (37, 70, 160), (16, 32, 64), (5, 33, 224)])
def test_interpreted_kernel_equals_the_reference(fmt_name, m, n, k):
    """Shapes cut unevenly by the tile (16, 32, 64): K not a multiple of BLOCK_K, M = 1, N odd; float32 and bfloat16
    inputs, with and without bias, per-tensor and per-row tensor scales."""
    g = torch.Generator().manual_seed(m * n + k)
    for dtype in (torch.float32, torch.bfloat16):
        for per_row in (False, True):
            packed, _ = packed_weight(fmt_name, n, k, dtype, seed=k, per_row=per_row)
            x = (torch.randn(m, k, generator=g) * 3).to(dtype)
            for bias in (None, torch.randn(n, generator=g).to(dtype)):
                got = packed_matmul(x, packed, bias, use_kernel=True, tile=SMALL_TILE)
                want = packed_matmul_reference(x, packed, bias)
                assert got.dtype == want.dtype == dtype and got.shape == (m, n)
                tolerance = gemm_tolerance(x, packed, want)
                exact = plain_unit_weight(packed)
                if packed.tensor_scale is not None:
                    exact = exact * packed.tensor_scale.double().view(-1, 1)
                exact = x.double() @ exact.T + (0 if bias is None else bias.double())
                assert bool(((got.double() - want.double()).abs() <= tolerance).all()), (dtype, per_row)
                assert bool(((got.double() - exact).abs() <= tolerance).all()), (dtype, per_row)


@interpreted
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_interpreted_kernel_decodes_the_weight_bit_for_bit(fmt_name):
    """x = I [K, K]: each output is one product 1 * (f s), times t, so the kernel's decoded weight is seen exactly:
    fl32(f s t), equal to the plain-Python decode's."""
    for per_row in (False, True):
        packed, _ = packed_weight(fmt_name, 48, 96, torch.float32, seed=3, per_row=per_row)
        got = packed_matmul(torch.eye(96), packed, use_kernel=True).T
        want = plain_unit_weight(packed).float()
        if packed.tensor_scale is not None:
            want = want * packed.tensor_scale.view(-1, 1)
        assert torch.equal(got, want)


@interpreted
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_interpreted_decode_kernel_is_the_plain_decode(fmt_name):
    """decode_unit_scaled's kernel writes f * s, the plain-Python enumeration's value, bit for bit in every dtype
    (rows and columns cut unevenly by its tile)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        packed, _ = packed_weight(fmt_name, 37, 288, dtype, seed=4)
        got = decode_unit_scaled(packed, dtype)
        assert got.dtype == dtype and torch.equal(got.double(), plain_unit_weight(packed))


@interpreted
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_interpreted_dequantized_path_equals_the_reference(fmt_name):
    """From DEQUANTIZE_MIN_ROWS rows (or dequantize=True) the decoded weight goes through torch's GEMM with t as its
    alpha and the bias in its epilogue: within the fused kernel's tolerance of the reference, fused kernel too; a
    per-row t is refused for it and runs fused by default."""
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16):
        packed, _ = packed_weight(fmt_name, 40, 96, dtype, seed=6)
        x = (torch.randn(DEQUANTIZE_MIN_ROWS + 3, 96, generator=g) * 3).to(dtype)
        for bias in (None, torch.randn(40, generator=g).to(dtype)):
            want = packed_matmul_reference(x, packed, bias)
            tolerance = gemm_tolerance(x, packed, want)
            for dequantize in (None, True, False):
                got = packed_matmul(x, packed, bias, use_kernel=True, dequantize=dequantize)
                assert got.dtype == dtype and bool(((got.double() - want.double()).abs() <= tolerance).all())
    if fmt_name != "MXFP4":
        row_scaled, _ = packed_weight(fmt_name, 40, 96, torch.float32, per_row=True)
        assert "per-tensor" in one_line_value_error(
            lambda: packed_matmul(torch.zeros(20, 96), row_scaled, use_kernel=True, dequantize=True))


@interpreted
@pytest.mark.parametrize("fmt_name", ["NVFP4", "MXFP4"])
def test_interpreted_every_tile_of_the_autotuned_set(fmt_name):
    """Whichever tile the GPU's autotuner keeps gives the reference's result (tiles cut the shape unevenly)."""
    packed, _ = packed_weight(fmt_name, 150, 288, torch.bfloat16, per_row=True)
    x = torch.randn(70, 288, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    bias = torch.randn(150, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want = packed_matmul_reference(x, packed, bias)
    tolerance = gemm_tolerance(x, packed, want)
    for tile in TILES:
        got = packed_matmul(x, packed, bias, use_kernel=True, tile=tile)
        assert bool(((got.double() - want.double()).abs() <= tolerance).all()), tile


@interpreted
def test_interpreted_leading_dimensions_and_strided_inputs():
    packed, _ = packed_weight("NVFP4", 32, 64, torch.bfloat16)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)[..., ::2]
    got = packed_matmul(x, packed, use_kernel=True)
    want = packed_matmul_reference(x, packed)
    assert got.shape == (2, 3, 32)
    assert bool(((got.double() - want.double()).abs() <= gemm_tolerance(x.reshape(6, 64), packed,
                                                                         want.reshape(6, 32)).view(2, 3, 32)).all())


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU (the compiled kernel)")
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_cuda_kernel_equals_the_reference(fmt_name):
    """The compiled kernel on the GPU, autotuned and with every tile of TILES, bfloat16 and float32 inputs (per-row
    tensor scales, bias), against the reference computed on the CPU, within the same tolerance."""
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float32):
        packed, _ = packed_weight(fmt_name, 300, 544, dtype, per_row=True)
        x = torch.randn(77, 544, generator=g).to(dtype)
        bias = torch.randn(300, generator=g).to(dtype)
        want = packed_matmul_reference(x, packed, bias)
        tolerance = gemm_tolerance(x, packed, want)
        on_gpu = packed.to("cuda")
        for tile in (None, *TILES):
            got = packed_matmul(x.cuda(), on_gpu, bias.cuda(), use_kernel=True, tile=tile).cpu()
            assert got.dtype == dtype and bool(((got.double() - want.double()).abs() <= tolerance).all()), tile
        assert torch.equal(decode_unit_scaled(on_gpu, dtype).cpu().double(), plain_unit_weight(packed))
        per_tensor, _ = packed_weight(fmt_name, 300, 544, dtype)
        want = packed_matmul_reference(x, per_tensor, bias)
        got = packed_matmul(x.cuda(), per_tensor.to("cuda"), bias.cuda(), use_kernel=True, dequantize=True).cpu()
        assert bool(((got.double() - want.double()).abs() <= gemm_tolerance(x, per_tensor, want)).all())


def test_kernel_not_picked_on_cpu_without_the_interpreter():
    if INTERPRETED:
        pytest.skip("the interpreter is on")
    packed, _ = packed_weight("MXFP4", 8, 64, torch.float32)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="cannot run here"):
        packed_matmul(x, packed, use_kernel=True)
    assert torch.equal(packed_matmul(x, packed), packed_matmul_reference(x, packed))


def test_bad_inputs_are_one_line_errors():
    packed, simulated = packed_weight("NVFP4", 8, 64, torch.float32)
    assert "features" in one_line_value_error(lambda: packed_matmul(torch.zeros(2, 32), packed))
    assert "bias" in one_line_value_error(lambda: packed_matmul(torch.zeros(2, 64), packed, torch.zeros(7)))
    w = torch.randn(8, 64)
    for fmt_name, reason in (("E2M1", "not E2M1 in blocks"), ("INT4", "not E2M1 in blocks"),
                             ("E4M3/b32/e8m0", "not E2M1 in blocks"), ("E2M1/b64/e8m0", "blocks of 64")):
        fmt = parse_format(fmt_name)
        encoded = encode(w, fmt, torch.tensor(3.0))
        assert reason in one_line_value_error(lambda: PackedWeight.from_encoded(encoded, w))
    encoded = encode(w, parse_format("NVFP4"), w.abs().amax())
    assert "bit for bit" in one_line_value_error(lambda: PackedWeight.from_encoded(encoded, w))  # w is not quantized
    nan = w.clone()
    nan[0, 0] = float("nan")
    encoded = encode(nan, parse_format("MXFP4"), torch.tensor(1.0))
    from quant_layers.codes import decode

    assert "NaN" in one_line_value_error(lambda: PackedWeight.from_encoded(encoded, decode(encoded)))


def calibrated(architecture: str, config_name: str, dtype: torch.dtype):
    """(model, layers) of make_tiny in dtype, swapped and calibrated with config_name (searches: 3 candidates)."""
    from transformers import AutoModelForCausalLM

    model = make_tiny(architecture)
    if dtype != torch.float32:
        state = model.state_dict()
        model = AutoModelForCausalLM.from_config(model.config, dtype=dtype).eval()
        model.load_state_dict(state)
    config = get_config(config_name)
    space = SearchSpace((0.5, 1.2, 3), search_round=1) if config.uses_search_space else None
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    return model, calibrate(model, IDS, CalibSettings(config, W4A4, space))


def packed_model(model, layers) -> dict:
    """Convert to packed execution; returns executed_weight_bytes."""
    line = use_execution(model, "packed", layer_codes(layers))
    assert line.startswith("packed execution: ")
    return executed_weight_bytes(model)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@interpreted
@pytest.mark.parametrize("architecture, config_name, dtype, largest, mean", [
    ("llama", "NVFP4_config_llama", torch.float32, 1e-4, 1e-6),
    ("qwen2", "MXFP4_config_llama", torch.float32, 1e-4, 1e-6),
    ("llama", "MXFP4_config_llama", torch.bfloat16, 0.02, 1e-3), ("qwen2", "NVFP4_config_llama", torch.bfloat16, 0.3,
                                                                  0.03),
    ("llama", "NVFP4_4over6_config_llama", torch.float32, 1e-4, 1e-6),
    ("qwen2", "NVFP4_tensor_search_gptq_rot_config_llama", torch.float32, 1e-4, 1e-6),
    ("llama", "MXFP4_search_gptq_config_llama", torch.float32, 1e-4, 1e-6)])
def test_interpreted_packed_model_computes_the_simulated_logits(architecture, config_name, dtype, largest, mean):
    """Logits of the packed model (every Linear and the head through the kernel) against the simulated model's, on
    logits of magnitude ~1; the recipes' searched block and tensor scales, GPTQ's codes, rotations (the online
    Hadamard before down_proj stays in the QuantLinear) and Four Over Six run packed too. MXFP4 weights are the
    simulated ones bit for bit, so only the summation order differs (measured: equal). NVFP4 in float32 differs by
    the simulated weight's float32 roundings too (measured: 4e-7). A bfloat16 NVFP4 model's simulated weights are
    f s t rounded to bfloat16 (up to 2^-9 relative) where the kernel multiplies the exact f s and applies t in
    float32: the inputs of later layers differ by about that much, and where that moves a 4-bit activation across a
    rounding boundary the flipped code moves everything after it (measured on this model: largest 0.09, mean 0.014;
    the tolerance leaves room for other CPUs' summation orders)."""
    model, layers = calibrated(architecture, config_name, dtype)
    simulated = logits(model)
    summary = packed_model(model, layers)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert summary["modules"] == len(quantized) == 7 * 2 + 1
    assert all(m.weight is None and m.executor is not None for m in quantized)
    difference = (logits(model) - simulated).abs()
    assert float(difference.max()) <= largest and float(difference.mean()) <= mean


@pytest.mark.parametrize("config_name", ["NVFP4_config_llama", "MXFP4_config_llama"])
def test_packed_weights_take_under_0_3_of_bf16(config_name):
    """The real buffers of every converted Linear (the float weight is gone): NVFP4 4.5 bits per weight (+ one float32
    tensor scale), MXFP4 4.25, against 16; the model's state drops by the same bytes."""
    model, layers = calibrated("llama", config_name, torch.bfloat16)
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    summary = packed_model(model, layers)
    for module in (m for m in model.modules() if isinstance(m, QuantLinear)):
        assert module.weight is None
        weight_bytes = sum(b.numel() * b.element_size() for b in module.executor.buffers())
        n, k = module.out_features, module.in_features
        bits = 4 + 8 / module.weight_format.block.size
        assert weight_bytes == n * k * bits / 8 + (4 if config_name.startswith("NVFP4") else 0)
        assert weight_bytes <= 0.3 * 2 * n * k
    assert summary["weight_bytes"] <= 0.3 * summary["bf16_weight_bytes"]
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert before - after == summary["bf16_weight_bytes"] - summary["weight_bytes"]


def test_ineligible_modules_are_one_error_before_any_change():
    """FPQ's E2M1 per-row weights cannot be packed: one line naming the first module, nothing converted."""
    model, layers = calibrated("llama", "FPQ_config_llama", torch.float32)
    message = one_line_value_error(lambda: packed_model(model, layers))
    assert message.startswith("--execution packed: model.layers.0.") and "not E2M1 in blocks" in message
    assert all(m.executor is None and m.weight is not None for m in model.modules() if isinstance(m, QuantLinear))
    assert "no quantized Linear" in one_line_value_error(lambda: use_execution(make_tiny("llama"), "packed", None))
    assert set(EXECUTIONS) >= {"simulated", "packed"} and use_execution(model, "simulated", None) is None


def test_main_evaluates_with_packed_execution(tiny_llama_dir, calib_text_file, tmp_path):
    """main.py --execution packed (the kernel under the interpreter) after calibrating NVFP4 and exporting (the results
    record the packed weights' bytes), then on that export (--model_args pretrained=DIR): the same packed model, to
    the last bit. A config the execution does not take is refused before calibrating."""
    pytest.importorskip("triton", reason="Triton is not installed (requirements.txt installs it on Linux)")
    common = ["--tasks", "piqa", "--device", "cpu", "--batch_size", "4", "--limit", "4", "--execution", "packed"]
    runs = {}
    for name, flags in (("calibrated", ["--model_args", f"pretrained={tiny_llama_dir}", "--quant_config",
                                        "NVFP4_config_llama", "--calib_size", "2", "--calib_seqlen", "48",
                                        "--calib_data", calib_text_file, "--export_dir", tmp_path / "exp"]),
                        ("export", ["--model_args", f"pretrained={tmp_path / 'exp'}"])):
        done = run_main(*common, *flags, "--output_path", tmp_path / f"{name}.json", cwd=tmp_path,
                        env={"TRITON_INTERPRET": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "packed execution: 15 Linears" in done.stderr
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    quantization = runs["calibrated"]["quantization"]
    executed = quantization["executed_weights"]
    assert quantization["execution"] == "packed" and executed["modules"] == 7 * 2 + 1
    assert executed["weight_bytes"] <= 0.3 * executed["bf16_weight_bytes"]
    assert runs["export"]["quantization"]["execution"] == "packed"
    assert runs["export"]["quantization"]["executed_weights"] == executed
    assert runs["export"]["results"] == runs["calibrated"]["results"]
    refused = run_main(*common, "--model_args", f"pretrained={tiny_llama_dir}", "--quant_config", "FPQ_config_llama",
                       cwd=tmp_path)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "calibrating" not in refused.stderr
    assert last.startswith("error: --execution packed: FPQ_config_llama W4A4E4: E2M1 is not E2M1 in blocks")
