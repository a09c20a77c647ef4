"""One run of main.py: load, quantize (calibrate or load parameters), evaluate, write results."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from configs import QuantConfig, get_config
from quant_layers.modules import swap_modules
from utils.calib_data import load_calib_set
from utils.cli import UsageError
from utils.evaluation import evaluate, results_table, write_results
from utils.fileio import sha256_file
from utils.models import ModelInfo, load_model
from utils.params import ParamFileError, apply_params, load_params, param_file_path, resolve_param_path, save_params
from utils.quant_calib import CalibSettings, calibrate
from utils.search import SearchSpace
from utils.task_data import get_task_specs


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_device(device: str | None) -> str:
    """cuda if available when not given; a clear error for cuda without a GPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    if not device.startswith(("cuda", "cpu")):
        raise UsageError(f"--device {device}: use cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def search_metadata(args: argparse.Namespace, config: QuantConfig, info: ModelInfo) -> dict:
    """What a parameter file must match to be reused: model, config, qbits, search arguments."""
    return {
        "model": {"source": info.source, "fingerprint": info.fingerprint, "architecture": info.architecture},
        "quant_config": config.to_dict(),
        "qbits": list(vars(args.qbits).values()),
        "search": {
            "search_round": args.search_round, "search_intervals": list(args.search_intervals),
            "search_space": args.search_space, "sequential": args.sequential,
            "calib_size": args.calib_size, "calib_seqlen": args.calib_seqlen, "seed": args.seed,
        },
    }


def check_param_metadata(path: Path, saved: dict, current: dict) -> None:
    """ParamFileError naming the first difference that makes a file unusable for this run."""
    if saved["model"]["fingerprint"] != current["model"]["fingerprint"]:
        raise ParamFileError(
            f"{path} was calibrated on another model ({saved['model']['source']}, weights fingerprint "
            f"{saved['model']['fingerprint'][:12]}) than {current['model']['source']} "
            f"({current['model']['fingerprint'][:12]}); recalibrate for this model"
        )
    if saved["quant_config"]["name"] != current["quant_config"]["name"]:
        raise ParamFileError(f"{path} was made with --quant_config {saved['quant_config']['name']}, "
                             f"not {current['quant_config']['name']}")
    if saved["qbits"] != current["qbits"]:
        raise ParamFileError(f"{path} was made with --qbits {' '.join(map(str, saved['qbits']))}, "
                             f"not {' '.join(map(str, current['qbits']))}")


def quantize_model(model, tokenizer, info: ModelInfo, args: argparse.Namespace) -> dict:
    """Swap modules and set parameters (calibrated now, or loaded); returns the results' quantization block."""
    config = get_config(args.quant_config)
    swap_modules(model, linear=config.linear, lm_head=config.lm_head, embedding=config.embedding)
    metadata = search_metadata(args, config, info)
    if args.only_eval:
        path = resolve_param_path(args.ptq_param_path)
        layers, saved = load_params(path)
        check_param_metadata(path, saved, metadata)
        apply_params(model, layers)
        _log(f"loaded {len(layers)} quantized modules from {path}")
        calib_seconds = None
    else:
        path = param_file_path(args.search_result_dir, args.quant_config, args.qbits.tag(), args.search_round,
                               args.search_intervals)
        calib = load_calib_set(tokenizer, calib_size=args.calib_size, seqlen=args.calib_seqlen, seed=args.seed,
                               source=args.calib_data)
        metadata["search"]["calib_data"] = calib.description
        low, high, count = args.search_intervals
        space = SearchSpace(low, high, count, args.search_space) if config.search else None
        settings = CalibSettings(config, args.qbits, space, args.search_round, args.sequential)
        started = time.perf_counter()
        layers = calibrate(model, calib.tokens, settings)
        calib_seconds = time.perf_counter() - started
        metadata["search"]["calib_seconds"] = calib_seconds
        save_params(path, layers, metadata)
        _log(f"saved quantization parameters to {path}")
    return {**metadata, "param_file": str(path), "param_file_sha256": sha256_file(path),
            "calib_seconds": calib_seconds, "only_eval": args.only_eval}


def default_output_path(args: argparse.Namespace) -> Path:
    name = args.quant_config or "full_precision"
    if args.quant_config:
        name += f"_{args.qbits.tag()}"
    return Path("results") / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}.json"


def run(args: argparse.Namespace) -> dict:
    """Load, quantize, evaluate; prints lm-eval's table and writes the results JSON. Returns the results."""
    device = resolve_device(args.device)
    seed_everything(args.seed)
    task_specs = get_task_specs(args.tasks)
    margs = args.model_args
    model, tokenizer, info = load_model(margs.pretrained, device=device, dtype=margs.dtype,
                                        use_accelerate=margs.use_accelerate,
                                        trust_remote_code=margs.trust_remote_code)
    _log(f"model: {info.source} ({info.architecture}, {info.num_layers} layers, {info.dtype}) on {device}")
    quantization = {"quant_config": None}
    if args.quant_config:
        quantization = quantize_model(model, tokenizer, info, args)
    started = time.perf_counter()
    results = evaluate(model, tokenizer, task_specs, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                       limit=args.limit, seed=args.seed)
    results["quantization"] = {**quantization, "eval_seconds": time.perf_counter() - started,
                               "model": {"source": info.source, "fingerprint": info.fingerprint,
                                         "architecture": info.architecture, "dtype": info.dtype},
                               "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    print(results_table(results))
    output = Path(args.output_path) if args.output_path else default_output_path(args)
    write_results(output, results)
    _log(f"results written to {output}")
    return results
