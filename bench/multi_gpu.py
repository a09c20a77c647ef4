"""Calibration of a LLaMA-7B shape split over every visible GPU (accelerate's balanced device map, as
use_accelerate=True does): wall time and per-GPU peak memory; with --compare, the same model calibrated
on one GPU too, and the two results compared (parameters to float tolerance, logits).

    CUDA_VISIBLE_DEVICES=0,1 python bench/multi_gpu.py --layers 8 --compare
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from common import LLAMA_7B, environment, llama_7b_shape, results_folder, synchronize
from configs import QBits, get_config
from quant_layers.modules import swap_modules
from utils.quant_calib import CalibSettings, calibrate
from utils.search.space import SearchSpace

GIB = 1 << 30


def build(layers: int, split: bool):
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    model = llama_7b_shape(layers, "cuda:0")
    if split and torch.cuda.device_count() > 1:
        classes = ["LlamaDecoderLayer"]
        memory = get_balanced_memory(model, no_split_module_classes=classes)
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=classes)
        model = dispatch_model(model, device_map)
    swap_modules(model)
    return model


def calibrate_timed(model, ids, settings) -> tuple[dict, float, dict]:
    for index in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(index)
    synchronize()
    start = time.perf_counter()
    params = calibrate(model, ids, settings)
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)
    seconds = time.perf_counter() - start
    peaks = {index: torch.cuda.max_memory_allocated(index) / GIB for index in range(torch.cuda.device_count())}
    return params, seconds, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calib_size", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--compare", action="store_true", help="also calibrate on one GPU and compare")
    args = parser.parse_args()
    if torch.cuda.device_count() < 1:
        raise SystemExit("error: multi_gpu needs CUDA GPUs")
    ids = torch.randint(0, LLAMA_7B["vocab_size"], (args.calib_size, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    settings = CalibSettings(get_config("FPQ_config_llama"), QBits.parse([4, 4, 4, 2, 2, 2]),
                             SearchSpace((0.01, 1.2, 100), search_round=3))
    warm_up = build(1, split=False)  # Triton compiles and autotunes once per channel count: untimed
    calibrate(warm_up, ids[:2], settings)
    del warm_up
    gc.collect()
    torch.cuda.empty_cache()
    model = build(args.layers, split=True)
    placement = sorted({str(p.device) for p in model.parameters()})
    params, seconds, peaks = calibrate_timed(model, ids, settings)
    record = {"layers": args.layers, "gpus": torch.cuda.device_count(), "placement": placement,
              "seconds": seconds, "peak_gib_per_gpu": peaks, **environment()}
    print(record, flush=True)
    if args.compare:
        probe = ids[:2, :128]
        with torch.no_grad():
            split_logits = model(input_ids=probe.to("cuda:0")).logits.float().cpu()
        del model
        gc.collect()  # without it, reference cycles kept the split model alive (1.8 GiB on cuda:1) in the single run
        torch.cuda.empty_cache()
        single = build(args.layers, split=False)
        single_params, single_seconds, single_peaks = calibrate_timed(single, ids, settings)
        with torch.no_grad():
            single_logits = single(input_ids=probe.to("cuda:0")).logits.float().cpu()
        same_formats = all(params[n].weight_format == p.weight_format and params[n].act_format == p.act_format
                           for n, p in single_params.items())
        range_error = max(float((params[n].weight_max_value.cpu() - p.weight_max_value.cpu()).abs().max()
                                / p.weight_max_value.abs().max()) for n, p in single_params.items()
                          if p.weight_max_value is not None)
        record.update({"single_gpu_seconds": single_seconds, "single_gpu_peak_gib": single_peaks,
                       "same_formats": same_formats, "max_relative_weight_range_difference": range_error,
                       "max_logit_difference": float((split_logits - single_logits).abs().max()),
                       "same_argmax_fraction": float((split_logits.argmax(-1) == single_logits.argmax(-1))
                                                     .float().mean())})
        print({k: record[k] for k in ("same_formats", "max_relative_weight_range_difference",
                                      "max_logit_difference", "same_argmax_fraction")}, flush=True)
    folder = results_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"multi_gpu_L{args.layers}_{torch.cuda.device_count()}gpu.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
