"""Fused activation fake-quant kernel: bytes moved per second / device-to-device copy bandwidth, same run.

x: [tokens, hidden] bfloat16; the kernel reads x and writes q(x) (2 + 2 bytes per element), the copy reads
and writes the same bytes. Each is timed with CUDA events around --calls back-to-back calls (median of
--repeats after warm-up), for E2M1 per tensor and with per-channel shifts, and for E4M3. The kernel is called
as QuantLinear calls it (scales computed once, float32 channel scales); `wrapper_ms` times quantize_activation
without the precomputed scales (two more small kernels per call) and the unfused PyTorch reference is timed
beside it. `tiles` times every tile of the autotuned set (quant_layers/kernels.py TILES) on its own.
Block-scaled activations (NVFP4, Four Over Six, MXFP4, with a block clip; `block_fake_quantize`, tiles BLOCK_TILES)
are timed the same way and reported under `block_cases`, outside the headline value (element formats).

    python bench/kernel_bandwidth.py
"""

from __future__ import annotations

import argparse

import torch

from common import median_ms, write_result
from quant_layers import kernels
from quant_layers.formats import fp_format, parse_format
from quant_layers.quantize import activation_scales, quantize_activation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: kernel_bandwidth needs a CUDA GPU")
    x = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    moved = 2 * x.numel() * x.element_size()
    copy_ms = median_ms(lambda: y.copy_(x), args.repeats, args.calls)
    shift = torch.exp2(torch.randint(0, 4, (args.hidden,), device="cuda").float())
    cases = {"E2M1 per tensor": (fp_format(2, 1), None), "E2M1 channel shifts": (fp_format(2, 1), shift),
             "E4M3 per tensor": (fp_format(4, 3), None)}
    max_value = torch.tensor(3.0, device="cuda")
    rows, fractions = {}, []
    for label, (fmt, channel_scale) in cases.items():
        scales = activation_scales(fmt, max_value)
        kernel_ms = median_ms(lambda: quantize_activation(x, fmt, max_value, channel_scale, scales), args.repeats,
                              args.calls)
        wrapper_ms = median_ms(lambda: quantize_activation(x, fmt, max_value, channel_scale), args.repeats,
                               args.calls)
        tiles = {"x".join(map(str, tile)): copy_ms / median_ms(
            lambda: kernels.fake_quantize(x, fmt, *scales, channel_scale, kernels.FAKE, tile=tile), args.repeats,
            args.calls) for tile in kernels.TILES}
        reference_ms = median_ms(lambda: quantize_activation(x, fmt, max_value, channel_scale, use_kernel=False),
                                 args.repeats, args.calls)
        fraction = copy_ms / kernel_ms
        fractions.append(fraction)
        rows[label] = {"kernel_ms": kernel_ms, "wrapper_ms": wrapper_ms, "reference_ms": reference_ms,
                       "kernel_gb_s": moved / kernel_ms / 1e6, "tiles_rows_cols_warps_fraction_of_copy": tiles,
                       "fraction_of_copy": fraction, "speedup_vs_reference": reference_ms / kernel_ms}
        print(label, rows[label], flush=True)
    block_rows, clip = {}, torch.tensor(0.9, device="cuda")
    for name in ("NVFP4", "NVFP4_4OVER6", "MXFP4"):
        fmt = parse_format(name)
        scales = activation_scales(fmt, max_value)
        kernel_ms = median_ms(lambda: quantize_activation(x, fmt, max_value, None, scales, block_clip=clip),
                              args.repeats, args.calls)
        tiles = {"x".join(map(str, tile)): copy_ms / median_ms(
            lambda: kernels.block_fake_quantize(x, fmt, scales[0], clip, tile=tile), args.repeats, args.calls)
            for tile in kernels.BLOCK_TILES}
        reference_ms = median_ms(lambda: quantize_activation(x, fmt, max_value, block_clip=clip, use_kernel=False),
                                 args.repeats, args.calls)
        block_rows[name] = {"kernel_ms": kernel_ms, "reference_ms": reference_ms,
                            "kernel_gb_s": moved / kernel_ms / 1e6, "tiles_rows_cols_warps_fraction_of_copy": tiles,
                            "fraction_of_copy": copy_ms / kernel_ms, "speedup_vs_reference": reference_ms / kernel_ms}
        print(name, block_rows[name], flush=True)
    worst = min(fractions)
    write_result("kernel_bandwidth_fraction", worst, "fraction of copy bandwidth", ">= 0.8", worst >= 0.8,
                 {"x": [args.tokens, args.hidden], "dtype": "bfloat16", "calls_per_timing": args.calls},
                 {"copy_ms": copy_ms, "copy_gb_s": moved / copy_ms / 1e6, "cases": rows,
                  "block_cases": block_rows,
                  "value_is": "the worst case over the element formats and modes of `cases` (not `block_cases`)"})


if __name__ == "__main__":
    main()
