"""FP8 execution's GEMM (fused activation quantizer + torch._scaled_mm) against the bfloat16 GEMM, side by side in one
run on CUDA (sm89+), at LLaMA-7B's Linear shapes.

For each (in, out) and M tokens: x [M, in] bfloat16; an FPQ E2M1 weight [out, in] (per-row ranges, shifts k in 0..3)
as E4M3 codes and per-row scales (quant_layers/fp8_linear.py `fp8_weight`); timed, median of --repeats CUDA-event
timings after a warm-up (which also autotunes the Triton kernel):
    fp8        fp8_linear(x): quantize_activation_fp8 (one Triton kernel) + torch._scaled_mm, bfloat16 out
    gemm_only  torch._scaled_mm of ready codes (what the quantizer kernel costs is fp8 - gemm_only)
    bf16       torch.matmul(x, W^T) in bfloat16 (the value's baseline)
    gemm_tensorwise, gemm_fast_accum   torch._scaled_mm of the codes with one scale per tensor (what row-wise scaling
               costs), and row-wise with use_fast_accum=True (Hopper's reduced-precision accumulation, not exact
               enough for this path: what float32 accumulation costs); information only
    simulated  the simulated forward: quantize_activation (fake, bfloat16) + the bfloat16 GEMM
and fp8, gemm_only and bf16 again as 20 back-to-back calls per timing (*_20_calls: CPU overheads then overlap)
Before timing, each shape checks the kernel's codes against the PyTorch reference (bit for bit) and the GEMM
against the float32 GEMM of the codes (within 2^-7 of |A| |W|^T u_a u_w). value: the smallest bf16 / fp8 time ratio
over the shapes; target >= 1.6.

    python bench/fp8_gemm.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import git_commit, median_ms, write_result
from quant_layers.codes import encode_fpq_weight
from quant_layers.formats import fp_format
from quant_layers.fp8_linear import fp8_gemm, fp8_gemm_reference, fp8_linear, fp8_weight, quantize_activation_fp8
from quant_layers.quantize import activation_scales, quantize_activation

SHAPES = ((4096, 4096), (4096, 11008), (4096, 12288), (11008, 4096))  # (in, out): q/k/v/o, gate/up, fused qkv, down
TOKENS = (4096, 16384)
TARGET = 1.6


def cuda_refusal() -> str | None:
    """One line saying why FP8 GEMMs cannot be measured here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here: FP8 tensor cores are measured on a GPU of compute capability 8.9+ (H100)"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"{torch.cuda.get_device_name()} has no FP8 tensor cores (compute capability 8.9+ needed)"
    return None


def layer(n_in: int, n_out: int, g: torch.Generator) -> dict:
    """An FPQ E2M1 Linear on the GPU: its weight as E4M3 codes and scales, in bfloat16, and its input quantizer."""
    fmt = fp_format(2, 1)
    weight = torch.randn(n_out, n_in, generator=g) * 0.02
    shift = torch.randint(0, 4, (n_in,), generator=g)
    w_codes, w_scale = fp8_weight(encode_fpq_weight(weight.cuda(), fmt, weight.abs().amax(1).cuda(), shift.cuda()))
    max_value = torch.tensor(3.0, device="cuda")
    act_scale, act_inverse = activation_scales(fmt, max_value)
    return {"fmt": fmt, "w_codes": w_codes, "w_scale": w_scale, "w_bf16": weight.to("cuda", torch.bfloat16),
            "max_value": max_value, "act_scale": act_scale, "act_inverse": act_inverse,
            "channel_scale": torch.exp2(shift.float()).cuda()}


def checks(x: torch.Tensor, lin: dict) -> dict:
    """The kernel's codes against the reference, and _scaled_mm against the float32 GEMM of the codes."""
    args = (lin["fmt"], lin["act_scale"], lin["channel_scale"])
    codes = quantize_activation_fp8(x, *args, use_kernel=True)
    codes_exact = torch.equal(codes.view(torch.uint8), quantize_activation_fp8(x, *args, use_kernel=False)
                              .view(torch.uint8))
    gemm = (codes, lin["w_codes"], lin["act_inverse"], lin["w_scale"], None, torch.bfloat16)
    got, want = fp8_gemm(*gemm, use_scaled_mm=True).float(), fp8_gemm_reference(*gemm[:-1], torch.float32)
    size = (codes.float().abs() @ lin["w_codes"].float().abs().t()) * lin["act_inverse"] * lin["w_scale"]
    worst = float(((got - want).abs() / (2.0**-7 * size).clamp(min=1e-30)).max())
    return {"codes_bit_exact": codes_exact, "gemm_error_over_bound": worst, "ok": codes_exact and worst <= 1}


def measure(tokens: int, n_in: int, n_out: int, repeats: int, g: torch.Generator) -> dict:
    lin = layer(n_in, n_out, g)
    x = torch.randn(tokens, n_in, generator=g).to("cuda", torch.bfloat16)
    row = {"tokens": tokens, "in": n_in, "out": n_out, **checks(x, lin)}
    codes = quantize_activation_fp8(x, lin["fmt"], lin["act_scale"], lin["channel_scale"])
    fp8 = (lin["fmt"], lin["act_scale"], lin["act_inverse"], lin["channel_scale"], lin["w_codes"], lin["w_scale"])
    row["fp8_ms"] = median_ms(lambda: fp8_linear(x, *fp8, None), repeats)
    row["gemm_only_ms"] = median_ms(lambda: fp8_gemm(codes, lin["w_codes"], lin["act_inverse"], lin["w_scale"], None,
                                                     torch.bfloat16), repeats)
    row["bf16_ms"] = median_ms(lambda: torch.matmul(x, lin["w_bf16"].t()), repeats)
    one = torch.ones((), device="cuda")
    row["gemm_tensorwise_ms"] = median_ms(lambda: torch._scaled_mm(codes, lin["w_codes"].t(), one, one,
                                                                   out_dtype=torch.bfloat16), repeats)
    row_scale = lin["act_inverse"].reshape(1, 1).expand(tokens, 1).contiguous()
    row["gemm_fast_accum_ms"] = median_ms(lambda: torch._scaled_mm(codes, lin["w_codes"].t(), row_scale,
                                                                   lin["w_scale"].reshape(1, -1),
                                                                   out_dtype=torch.bfloat16, use_fast_accum=True),
                                          repeats)
    scales = (lin["act_scale"], lin["act_inverse"])
    row["simulated_ms"] = median_ms(lambda: torch.matmul(quantize_activation(
        x, lin["fmt"], lin["max_value"], lin["channel_scale"], scales), lin["w_bf16"].t()), repeats)
    # the same three, 20 calls back to back per timing: a CPU-bound call (launch overheads) overlaps the GPU's work
    # there, so a per-call time far below the single-call one says the single call waited on the CPU
    row["fp8_ms_20_calls"] = median_ms(lambda: fp8_linear(x, *fp8, None), repeats, calls=20)
    row["gemm_only_ms_20_calls"] = median_ms(lambda: fp8_gemm(codes, lin["w_codes"], lin["act_inverse"],
                                                              lin["w_scale"], None, torch.bfloat16), repeats, calls=20)
    row["bf16_ms_20_calls"] = median_ms(lambda: torch.matmul(x, lin["w_bf16"].t()), repeats, calls=20)
    row["speedup"] = row["bf16_ms"] / row["fp8_ms"]
    row["gemm_only_speedup"] = row["bf16_ms"] / row["gemm_only_ms"]
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measure (median)")
    args = parser.parse_args()
    refusal = cuda_refusal()
    if refusal:
        sys.exit(f"bench/fp8_gemm.py: {refusal}")
    g = torch.Generator().manual_seed(0)
    rows = [measure(tokens, n_in, n_out, args.repeats, g) for tokens in TOKENS for n_in, n_out in SHAPES]
    worst = min(row["speedup"] for row in rows)
    checked = all(row["ok"] for row in rows)
    write_result("fp8_gemm_speedup_vs_bf16", worst, "x bf16 GEMM (bf16 time / FP8 time)", f">= {TARGET}",
                 worst >= TARGET and checked,
                 {"in_out": [list(shape) for shape in SHAPES], "tokens": list(TOKENS), "weight": "E2M1 per row",
                  "activation": "E2M1 per tensor, shifts 0..3"},
                 {"rows": rows, "checks_passed": checked, "value_is": "the smallest speedup over the shapes",
                  "repeats": args.repeats, "commit": git_commit()})


if __name__ == "__main__":
    main()
