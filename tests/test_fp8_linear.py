"""FP8 execution (quant_layers/fp8_linear.py, utils/execution.py): the paper's element formats as E4M3 codes.

The activation codes times u_a are the simulated quantizer's values bit for bit (and the Triton kernel equals its
reference bit for bit under the interpreter); the weight codes times their scales are the module's weight bit for
bit; a layer's output equals the simulated one within the float32 bound of the module docstring, checked against a
float64 product; a calibrated tiny model's logits stay within float32 rounding; formats, configs and modules that
cannot run on FP8 codes are one line and leave the model as it was."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import QBits, get_config
from conftest import make_tiny, one_line_value_error, run_main
from quant_layers.codes import encode_fpq_weight, encode_quantized
from quant_layers.formats import fp_format, formats_of_width, int_format, parse_format
from quant_layers.fp8_linear import (FP8Linear, fp8_format_error, fp8_gemm, fp8_gemm_reference, fp8_weight,
                                     quantize_activation_fp8, quantize_activation_fp8_reference)
from quant_layers.modules import QuantLinear, QuantParams, swap_modules
from quant_layers.quantize import activation_scales, quantize, quantize_activation
from utils.execution import ExecutionError, fp8_config_error, layer_codes, use_fp8_execution
from utils.quant_calib import CalibSettings, calibrate
from utils.run.cli import UsageError, parse_args
from utils.search.space import SearchSpace

EXACT = formats_of_width(4) + [int_format(4)]  # E3M0, E2M1, E1M2, INT4
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
ROOT = Path(__file__).resolve().parents[1]


def float32_bound(q_act: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(2 in + 8) 2^-24 (|Q_a| @ |W_fold|^T + |b|): the float32 bound of fp8_linear's docstring, per output."""
    size = q_act.double().abs() @ weight.double().abs().t() + (0 if bias is None else bias.double().abs())
    return (2 * weight.shape[1] + 8) * 2.0**-24 * size


def test_formats_exact_in_e4m3_and_the_rest_refused():
    """E2M1, E1M2, E3M0 and INT4 grids are E4M3 numbers; INT8's 17 (5 significant bits), the bias-0 E4M3 grid's
    480 (E4M3FN's NaN code), E1M6's mantissa and block formats are refused."""
    for fmt in EXACT:
        assert fp8_format_error(fmt) is None, fmt
    assert "17" in fp8_format_error(int_format(8))
    assert "480" in fp8_format_error(fp_format(4, 3))
    assert "not an FP8 E4M3 number" in fp8_format_error(fp_format(1, 6))
    for name in ("NVFP4", "MXFP4"):
        assert "block-scaled" in fp8_format_error(parse_format(name))


@pytest.mark.parametrize("value, code", [(0.5, 0.0), (1.5, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (7.0, 8.0),
                                         (10.0, 8.0), (14.0, 12.0), (1e30, 12.0), (float("inf"), 12.0)])
def test_e2m1_codes_round_ties_to_even_and_saturate(value, code):
    """E2M1's standard grid (bias 0: 0, 1, 2, 3, 4, 6, 8, 12) with s = 1: each tie goes to the even mantissa, both
    signs; beyond 12 saturates (pinned by hand)."""
    x = torch.tensor([value, -value])
    got = quantize_activation_fp8_reference(x, fp_format(2, 1), torch.ones(1))
    assert got.dtype == torch.float8_e4m3fn and got.float().tolist() == [code, -code]


@pytest.mark.parametrize("fmt", EXACT, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_codes_times_u_are_the_simulated_quantizer(fmt, dtype):
    """fl(A u_a) in x's dtype == quantize_activation(x) bit for bit (shifted channels, saturation, zeros)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(40, 96, generator=g) * torch.exp2(torch.randint(-4, 4, (96,), generator=g).float())).to(dtype)
    x[0, :3] = torch.tensor([0.0, -0.0, 1e4])
    max_value = torch.tensor(2.7)
    scale, inverse = activation_scales(fmt, max_value)
    for channel_scale in (None, torch.exp2(torch.randint(0, 4, (96,), generator=g).float())):
        codes = quantize_activation_fp8(x, fmt, scale, channel_scale, use_kernel=False)
        want = quantize_activation(x, fmt, max_value, channel_scale, use_kernel=False)
        got = (codes.float() * inverse).to(dtype)
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


def test_kernel_equals_reference_under_interpreter():
    """The CODES mode of the fused quantizer gives the reference's E4M3 bytes (NaN positions equal), for every
    accepted format, float32 / bfloat16 / float16 inputs, with and without shifts; NaN, Inf, -0, ties, overflow."""
    pytest.importorskip("triton")
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from quant_layers.formats import formats_of_width, int_format
from quant_layers.fp8_linear import quantize_activation_fp8, quantize_activation_fp8_reference
g = torch.Generator().manual_seed(0)
x = torch.randn(33, 80, generator=g) * torch.exp2(torch.randint(-6, 6, (80,), generator=g).float())
x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1e-30])
x[1, :4] = torch.tensor([0.25, -0.75, 2.5, 1e30])
checked = 0
for fmt in formats_of_width(4) + [int_format(4)]:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shift in (None, torch.exp2(torch.randint(0, 4, (80,), generator=g).float())):
            scale = torch.rand(1, generator=g) * 3 + 0.2
            got = quantize_activation_fp8(x.to(dtype), fmt, scale, shift, use_kernel=True)
            want = quantize_activation_fp8_reference(x.to(dtype), fmt, scale, shift)
            nan = torch.isnan(want.float())
            assert torch.equal(nan, torch.isnan(got.float())), (fmt, dtype)
            assert torch.equal(got.view(torch.uint8)[~nan], want.view(torch.uint8)[~nan]), (fmt, dtype)
            checked += 1
print(checked)
"""
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(4 * 3 * 2)


def test_kernel_not_used_on_cpu_without_the_interpreter():
    with pytest.raises(RuntimeError, match="cannot run here"):
        quantize_activation_fp8(torch.zeros(2, 4), fp_format(2, 1), torch.ones(1), use_kernel=True)


@pytest.mark.parametrize("fmt", EXACT, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_codes_times_scales_are_the_simulated_weight(fmt, dtype):
    """W u_w == W_fold bit for bit in the weight's dtype, and W 2^k u_w == quantize(W) in float32 (the reference
    quantizer, per-row ranges): the codes are the grid values shifted, nothing else."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g)
    row_max = weight.abs().amax(1) * (0.5 + torch.rand(24, generator=g))
    shift = torch.randint(0, 8 if fmt.kind == "fp" else 1, (64,), generator=g)
    encoded = encode_fpq_weight(weight.to(dtype), fmt, row_max, shift)
    codes, scale = fp8_weight(encoded)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (24,)
    module = QuantLinear(torch.nn.Linear(64, 24, bias=False).to(dtype))
    module.weight.data.copy_(weight.to(dtype))
    module.set_quant_params(QuantParams(fmt, row_max, fmt, torch.tensor(1.0), shift.float()))
    assert torch.equal((codes.float() * scale[:, None]).to(dtype), module.weight)
    simulated = quantize(weight.to(dtype).float(), fmt, row_max.view(-1, 1))
    assert torch.equal(codes.float() * torch.exp2(shift.float()) * scale[:, None], simulated)


def test_weights_that_do_not_fit_e4m3_are_refused():
    """Shifts that push E2M1's 1 below E4M3's smallest subnormal 2^-9 (k = 12), INT8 and NVFP4 weights: one line."""
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    row_max = weight.abs().amax(1)
    shift = torch.full((16,), 12)
    assert "channel shifts are too large" in one_line_value_error(
        lambda: fp8_weight(encode_fpq_weight(weight, fp_format(2, 1), row_max, shift)))
    assert "INT8" in one_line_value_error(lambda: fp8_weight(encode_quantized(
        quantize(weight, int_format(8), row_max.view(-1, 1)), int_format(8), row_max.view(-1, 1))))
    nvfp4 = parse_format("NVFP4")
    assert "block-scaled" in one_line_value_error(lambda: fp8_weight(encode_quantized(
        quantize(weight, nvfp4, weight.abs().max()), nvfp4, weight.abs().max())))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_and_reference_gemm_against_float64(out_dtype, with_bias):
    """torch._scaled_mm (torch 2.13 runs it on the CPU, slowly: small shapes here) and the float32 reference both
    give (A W^T) u_a u_w + b of a float64 product within (2 in + 8) 2^-24 of its magnitudes (float32 outputs), or
    that plus one bfloat16 rounding (2^-8 relative) of the output."""
    g = torch.Generator().manual_seed(4)
    a = (torch.randint(-6, 7, (20, 48), generator=g) * 0.5).to(torch.float8_e4m3fn)  # E2M1-like codes
    a[:, 0] = 1.0  # a column of ones: the check of a wrong weight code below
    w = torch.ldexp(torch.randint(-6, 7, (32, 48), generator=g) * 0.5, -torch.randint(0, 4, (48,), generator=g))
    w = w.to(torch.float8_e4m3fn)
    u_a, u_w = torch.tensor([0.37]), torch.rand(32, generator=g) + 0.1
    bias = torch.randn(32, generator=g).to(out_dtype) if with_bias else None
    exact = (a.double() @ w.double().t()) * u_a.double() * u_w.double()
    exact += 0 if bias is None else bias.double()
    size = (a.double().abs() @ w.double().abs().t()) * u_a.double() * u_w.double()
    size += 0 if bias is None else bias.double().abs()
    bound = (2 * 48 + 8) * 2.0**-24 * size + (2.0**-8 * exact.abs() if out_dtype == torch.bfloat16 else 0)
    for use_scaled_mm in (True, False):
        y = fp8_gemm(a, w, u_a, u_w, bias, out_dtype, use_scaled_mm=use_scaled_mm)
        assert y.dtype == out_dtype and y.shape == (20, 32)
        assert bool(((y.double() - exact).abs() <= bound).all()), use_scaled_mm
    if out_dtype == torch.float32:  # the bound sees one wrong weight code (|6 - w| >= 3 times a column of ones)
        wrong = w.float()
        wrong[0, 0] = 6.0
        y = fp8_gemm_reference(a, wrong.to(torch.float8_e4m3fn), u_a, u_w, bias, torch.float32)
        assert float((y.double() - exact)[:, 0].abs().min()) > float(bound[:, 0].max())


def quantized_linear(dtype: torch.dtype, fmt, bias: bool, seed: int = 5) -> tuple[QuantLinear, QuantParams]:
    """A QuantLinear 96 -> 40 with per-row ranges, a per-tensor input range and shifts k in 0..3."""
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=g) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(40, generator=g))
    module = QuantLinear(linear.to(dtype))
    row_max = module.weight.detach().float().abs().amax(1) * 0.9
    shift = torch.randint(0, 4 if fmt.kind == "fp" else 1, (96,), generator=g).float()
    params = QuantParams(fmt, row_max, fmt, torch.tensor(1.7), shift if fmt.kind == "fp" else None)
    module.set_quant_params(params)
    return module, params


@pytest.mark.parametrize("fmt", EXACT, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_output_equals_the_simulated_one_within_float32_rounding(fmt, dtype):
    """use_fp8_execution on one QuantLinear: the float weight is gone, and the output is the simulated one within
    (2 in + 8) 2^-24 (|Q_a| |W_fold|^T + |b|) in float32, within 2^-7 of it plus that in bfloat16 (the simulation
    rounds Q_a and W_fold to bfloat16 first)."""
    module, params = quantized_linear(dtype, fmt, bias=True)
    model = torch.nn.Sequential(module)
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 11, 96, generator=g) * torch.exp2(torch.randint(-3, 3, (96,), generator=g).float())).to(dtype)
    with torch.no_grad():
        want, q_act, weight = module(x), module.quantize_input(x), module.weight.detach().clone()
        line = use_fp8_execution(model, layer_codes({"0": params}))
        got = module(x)
    assert module.weight is None and isinstance(module.executor, FP8Linear) and "1 Linears" in line
    assert got.dtype == dtype and got.shape == want.shape
    bound = float32_bound(q_act.reshape(-1, 96), weight, module.bias.detach()).reshape(want.shape)
    if dtype == torch.bfloat16:
        bound += 2.0**-7 * (bound / ((2 * 96 + 8) * 2.0**-24))
    assert bool(((got.double() - want.double()).abs() <= bound).all())


def calibrated(architecture: str, config_name: str, qbits=(4, 4, 4, 2, 2, 2), dtype=torch.float32, device="cpu"):
    model = make_tiny(architecture).to(device, dtype)
    config = get_config(config_name)
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    space = SearchSpace((0.5, 1.2, 3), search_round=1) if config.uses_search_space else None
    return model, calibrate(model, IDS, CalibSettings(config, QBits.parse(list(qbits)), space))


@pytest.mark.parametrize("architecture, config", [("llama", "FPQ_config_llama"), ("qwen2", "FPQ_config_llama"),
                                                  ("llama", "MinMax_INT_config_llama"),
                                                  ("llama", "FPQ_gptq_rot_config_llama")])
def test_calibrated_model_logits_within_float32_rounding(architecture, config):
    """A calibrated tiny model (FPQ: searched formats and shifts; Qwen2's q/k/v biases; INT4; GPTQ's rounding with
    QuaRot's online Hadamard before down_proj) on FP8 codes: every quantized Linear converted, logits within 1e-5 of
    the simulated ones' largest magnitude (float32 rounding through two blocks and the head; measured 3.6e-7 on
    Llama FPQ). On the simulated model's own inputs, every Linear's activation codes times u_a are its quantized
    input bit for bit."""
    model, layers = calibrated(architecture, config)
    fp8 = copy.deepcopy(model)
    checked = []

    def same_codes(module, inputs):
        x = module.input_rotation(inputs[0])
        codes = quantize_activation_fp8(x, module.act_format, module.act_grid_scale, module.act_channel_scale)
        checked.append(torch.equal((codes.float() * module.act_grid_inverse).to(x.dtype), module.quantize_input(x)))

    hooks = [m.register_forward_pre_hook(same_codes) for m in model.modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        want = model(IDS).logits
        use_fp8_execution(fp8, layer_codes(layers))
        got = fp8(IDS).logits
    for hook in hooks:
        hook.remove()
    assert checked == [True] * 15
    converted = [m for m in fp8.modules() if isinstance(m, QuantLinear) and m.executor is not None]
    assert len(converted) == 15 and all(m.weight is None for m in converted)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_ineligible_models_are_one_line_and_left_as_they_were():
    """NVFP4's block formats and a W4A16 model (inputs not quantized): ExecutionError naming a module; no module
    gets an executor or loses its weight."""
    for config, qbits, says in (("NVFP4_config_llama", (4, 4, 4, 2, 2, 2), "block-scaled"),
                                ("MinMax_config_llama", (4, 16, 4, 2, 2, 2), "input is not quantized")):
        model, layers = calibrated("llama", config, qbits)
        message = one_line_value_error(lambda: use_fp8_execution(model, layer_codes(layers)))
        assert message.startswith("--execution fp8: model.layers.0.") and says in message
        assert all(m.executor is None and m.weight is not None for m in model.modules() if isinstance(m, QuantLinear))
    model, _ = calibrated("llama", "MinMax_config_llama", (4, 4, 4, 2, 2, 2))
    with pytest.raises(ExecutionError, match="no quantization parameters"):
        use_fp8_execution(model, layer_codes({}))


def test_config_check_before_calibrating():
    """What the search may choose must fit: FPQ W4A4 and INT4 pass; block formats, 8-bit FP activations (E1M6 is a
    candidate), INT8 and a 16-bit part are refused."""
    fpq, w4a4 = get_config("FPQ_config_llama"), QBits.parse([4, 4, 4, 2, 2, 2])
    assert fp8_config_error(fpq, w4a4) is None
    assert fp8_config_error(get_config("MinMax_INT_config_llama"), w4a4) is None
    assert "block-scaled" in fp8_config_error(get_config("NVFP4_config_llama"), w4a4)
    assert "not an FP8 E4M3 number" in fp8_config_error(fpq, QBits.parse([4, 8, 4, 2, 4, 2]))
    assert "grid value 17 " in fp8_config_error(get_config("MinMax_INT_config_llama"), QBits.parse([8, 8, 8, 2, 2, 2]))
    assert "no 16 bits" in fp8_config_error(fpq, QBits.parse([4, 16, 4, 2, 2, 2]))


def test_cli_flag():
    assert parse_args([]).execution == "simulated"
    assert parse_args(["--quant_config", "FPQ_config_llama", "--execution", "fp8"]).execution == "fp8"
    with pytest.raises(UsageError, match="add --quant_config"):
        parse_args(["--execution", "fp8"])
    with pytest.raises(UsageError, match="invalid choice"):
        parse_args(["--quant_config", "FPQ_config_llama", "--execution", "fp4"])


def test_main_fp8_execution_equals_simulated_results(tiny_llama_dir, calib_text_file, tmp_path):
    """main.py: calibrate (simulated), then --only_eval --execution fp8 of the same file: lambada's perplexity within
    1e-5 relative, accuracy equal; NVFP4 with --execution fp8 is one line before calibrating."""
    common = ["--tasks", "lambada_openai", "--device", "cpu", "--batch_size", "4", "--limit", "6",
              "--model_args", f"pretrained={tiny_llama_dir}"]
    first = run_main(*common, "--quant_config", "FPQ_config_llama", "--calib_size", "2", "--calib_seqlen", "48",
                     "--search_round", "1", "--search_intervals", "0.5", "1.2", "3", "--calib_data", calib_text_file,
                     "--output_path", tmp_path / "sim.json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    param_file = next((tmp_path / "search_result" / "FPQ_config_llama").glob("*.pt"))
    second = run_main(*common, "--only_eval", "--ptq_param_path", param_file, "--execution", "fp8",
                      "--output_path", tmp_path / "fp8.json", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "fp8 execution: 15 Linears on E4M3 codes" in second.stderr
    simulated, fp8 = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("sim", "fp8"))
    assert (simulated["quantization"]["execution"], fp8["quantization"]["execution"]) == ("simulated", "fp8")
    sim_task, fp8_task = simulated["results"]["lambada_openai"], fp8["results"]["lambada_openai"]
    assert sim_task["acc,none"] == fp8_task["acc,none"]
    assert abs(sim_task["perplexity,none"] - fp8_task["perplexity,none"]) <= 1e-5 * sim_task["perplexity,none"]
    refused = run_main(*common, "--quant_config", "NVFP4_config_llama", "--execution", "fp8", "--calib_data",
                       calib_text_file, cwd=tmp_path)
    assert refused.returncode == 2 and "block-scaled" in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --execution fp8: NVFP4_config_llama")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 tensor cores: a CUDA GPU of compute capability 8.9+")
def test_on_cuda_kernel_scaled_mm_and_model():
    """On the GPU: the compiled kernel's bytes equal the reference's, torch._scaled_mm (row-wise for bfloat16, per
    tensor for float32) is within the float64 bound, and a calibrated tiny Llama's logits (float32; the head's 300
    outputs take the float32 GEMM, the rest _scaled_mm) are within 1e-5 of the simulated ones'."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(70, 1100, generator=g).to("cuda", torch.bfloat16)
    shift = torch.exp2(torch.randint(0, 4, (1100,), generator=g).float()).cuda()
    for fmt in EXACT:
        scale = torch.tensor([1.7], device="cuda")
        got = quantize_activation_fp8(x, fmt, scale, shift, use_kernel=True)
        assert torch.equal(got.view(torch.uint8), quantize_activation_fp8_reference(x, fmt, scale, shift).view(
            torch.uint8)), fmt
    a = (torch.randint(-12, 13, (64, 256), generator=g).float()).to("cuda", torch.float8_e4m3fn)
    w = torch.ldexp(torch.randint(-6, 7, (128, 256), generator=g) * 0.5, -torch.randint(0, 4, (256,), generator=g))
    w = w.to("cuda", torch.float8_e4m3fn)
    u_a, u_w = torch.tensor([0.37], device="cuda"), (torch.rand(128, generator=g) + 0.1).cuda()
    for out_dtype in (torch.bfloat16, torch.float32):
        bias = torch.randn(128, generator=g).to("cuda", out_dtype)
        exact = (a.double() @ w.double().t()) * u_a.double() * u_w.double() + bias.double()
        size = (a.double().abs() @ w.double().abs().t()) * u_a.double() * u_w.double() + bias.double().abs()
        bound = (2 * 256 + 8) * 2.0**-24 * size + (2.0**-8 * exact.abs() if out_dtype == torch.bfloat16 else 0)
        y = fp8_gemm(a, w, u_a, u_w, bias, out_dtype, use_scaled_mm=None)
        assert bool(((y.double() - exact).abs() <= bound).all()), out_dtype
    # calibrated where it runs: quantize's float32 steps (exp2 and log2 of real-valued biases) round differently on
    # the CPU and on CUDA, so a weight quantized on one has no codes under the other's grid
    model, layers = calibrated("llama", "FPQ_config_llama", device="cuda")
    fp8 = copy.deepcopy(model)
    with torch.no_grad():
        want = model(IDS.cuda()).logits
        use_fp8_execution(fp8, layer_codes(layers))
        got = fp8(IDS.cuda()).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_main_fp8_execution_on_a_packed_export_equals_the_calibrated_run(tiny_llama_dir, calib_text_file, tmp_path):
    """main.py --execution fp8 after calibrating FPQ and exporting, then on that export (--model_args pretrained=DIR,
    the FP8 weights built from the file's codes, shifts and row scales): the same results to the last bit."""
    common = ["--tasks", "piqa", "--device", "cpu", "--batch_size", "4", "--limit", "4", "--execution", "fp8"]
    runs = {}
    for name, flags in (("calibrated", ["--model_args", f"pretrained={tiny_llama_dir}", "--quant_config",
                                        "FPQ_config_llama", "--calib_size", "2", "--calib_seqlen", "48",
                                        "--search_round", "1", "--search_intervals", "0.3", "1.2", "9",
                                        "--calib_data", calib_text_file, "--export_dir", tmp_path / "exp"]),
                        ("export", ["--model_args", f"pretrained={tmp_path / 'exp'}"])):
        done = run_main(*common, *flags, "--output_path", tmp_path / f"{name}.json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "fp8 execution: 15 Linears on E4M3 codes" in done.stderr
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert runs["export"]["quantization"]["execution"] == "fp8"
    assert runs["export"]["results"] == runs["calibrated"]["results"]
