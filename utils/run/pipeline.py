"""One run of main.py: load, quantize (calibrate or load parameters), evaluate, write results."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from configs import QBits, QuantConfig, get_config
from configs.attention import AttentionPolicy
from quant_layers.modules import swap_modules
from utils.attention import prepare as prepare_attention
from utils.data.architecture import decoder_layers
from utils.data.calib_data import heldout_text, load_calib_set
from utils.data.models import ModelInfo, load_model
from utils.execution import EXECUTIONS, ExecutionError, executed_weight_bytes, layer_codes, use_execution
from utils.export import MARKER, WEIGHTS, check_target, export_packed, is_packed_export, load_packed, read_marker
from utils.params import (Checkpoint, ParamFileError, apply_params, check_param_metadata, checkpoint_path,
                          load_checkpoint, load_params, metadata_difference, param_file_path, resolve_param_path,
                          run_metadata, save_params, saved_attention, saved_run)
from utils.quant_calib import CalibrationError, CalibSettings, calibrate
from utils.report.evaluation import (data_parallel_local_rank, data_parallel_processes, evaluate, heldout_perplexity,
                                     results_table, write_results)
from utils.run.cli import UsageError
from utils.run.fileio import WriteError, code_fingerprint, remove_stale_temps, sha256_file, unwritable_reason
from utils.run.reproducible import cpu_numerics
from utils.data.task_data import get_task_specs


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def place_for_eval(model, device: str) -> None:
    """After an --offload calibration: the whole model on `device` if it fits, else accelerate's split
    (GPUs first, then CPU memory)."""
    if not device.startswith("cuda"):
        return
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, no_split_module_classes=getattr(model, "_no_split_modules", None))
    dispatch_model(model, device_map)
    _log(f"evaluation placement: {sorted(set(map(str, device_map.values())))}")


def heldout(model, tokenizer, windows: int, seqlen: int) -> dict:
    """Perplexity on held-out text (utils.data.calib_data.heldout_text), for the results' quantization block."""
    text, description = heldout_text()
    try:
        value = heldout_perplexity(model, tokenizer, text, windows=windows, seqlen=seqlen)
    except ValueError as error:
        raise UsageError(f"--heldout_ppl {windows}: {error}; ask for fewer windows") from None
    _log(f"held-out perplexity ({windows} x {seqlen} tokens of {description}): {value:.3f}")
    return {"perplexity": value, "windows": windows, "seqlen": seqlen, "text": description}


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
    """utils.params.run_metadata of this command's model, config, qbits, search knobs and calibration settings."""
    model = {"source": info.source, "fingerprint": info.fingerprint, "architecture": info.architecture}
    calibration = {"sequential": args.sequential, "calib_size": args.calib_size, "calib_seqlen": args.calib_seqlen,
                   "seed": args.seed}
    attention = args.attention.to_dict() if args.attention else None
    return run_metadata(model, config, args.qbits, args.space, calibration, attention)


def _load_quantized(model, path: Path, metadata: dict, loaded: tuple | None = None) -> dict:
    """Check and apply a parameter file; returns its layers."""
    layers, saved = loaded or load_params(path)
    check_param_metadata(path, saved, metadata)
    apply_params(model, layers)
    _log(f"loaded {len(layers)} quantized modules from {path}")
    return layers


def _open_checkpoint(target: Path, metadata: dict, resume: bool) -> Checkpoint:
    """The checkpoint to continue from if one matches this run; else an empty one (which replaces any other).

    With --resume a checkpoint that cannot be used is an error, so no work is thrown away silently."""
    checkpoint = Checkpoint(checkpoint_path(target), metadata)
    for path in (target, target.with_suffix(".safetensors"), checkpoint.path):
        remove_stale_temps(path)  # left by a killed writer
    if not checkpoint.path.exists():
        if resume:
            _log(f"--resume: no checkpoint {checkpoint.path}; calibrating from the start")
        return checkpoint
    try:
        layers, saved = load_checkpoint(checkpoint.path)
        difference = metadata_difference(saved, metadata, search=True)
    except ParamFileError as error:
        difference = str(error)
    if difference is None:
        _log(f"resuming calibration from {checkpoint.path}: {saved['next_block']} decoder blocks already done")
        return Checkpoint(checkpoint.path, metadata, layers, saved["next_block"])
    if resume:
        raise ParamFileError(f"--resume: the checkpoint {checkpoint.path} cannot be continued ({difference}); "
                             "rerun with the flags it was made with, or without --resume to start over")
    _log(f"not resuming from {checkpoint.path} ({difference}); starting over, it will be replaced")
    return checkpoint


def _finished_difference(path: Path, metadata: dict) -> str | None:
    """None if `path` is this run's complete result (same model, config, qbits, search and calibration data), else
    why not, in words."""
    if not path.exists():
        return "no such file"
    try:
        _, saved = load_params(path)
    except ParamFileError as error:
        return f"unreadable: {error}"
    return metadata_difference(saved, metadata, search=True)


def _calib_settings(args: argparse.Namespace, config: QuantConfig) -> CalibSettings:
    offload = args.device if args.offload else None
    return CalibSettings(config, args.qbits, args.space if config.uses_search_space else None, args.sequential,
                         offload_device=offload, attention=args.attention,
                         attention_space=args.space if config.search else None)


def _calibrate_with_checkpoint(model, calib_ids, settings: CalibSettings, checkpoint: Checkpoint) -> dict:
    """calibrate(); on non-finite activations the checkpoint goes too (a rerun would stop at the same place)."""
    try:
        return calibrate(model, calib_ids, settings, checkpoint)
    except CalibrationError:
        checkpoint.remove()
        raise


def _save_final(path: Path, layers: dict, metadata: dict, checkpoint: Checkpoint) -> None:
    """Write the parameter file, then drop the checkpoint; if the write fails the checkpoint stays."""
    try:
        save_params(path, layers, metadata)
    except WriteError as error:
        raise WriteError(f"{error}; the checkpoint {checkpoint.path} is kept: rerun the same command to "
                         "finish from it") from None
    checkpoint.remove()
    _log(f"saved quantization parameters to {path}")


def _calibrate_and_save(model, tokenizer, args: argparse.Namespace, config: QuantConfig, metadata: dict
                        ) -> tuple[Path, dict, dict]:
    """Calibrate (resuming from a matching checkpoint) and write the parameter file; returns (path, timing,
    layers)."""
    path = param_file_path(args.search_result_dir, config, args.qbits, args.space,
                           args.attention.tag() if args.attention else "")
    calib = load_calib_set(tokenizer, calib_size=args.calib_size, seqlen=args.calib_seqlen, seed=args.seed,
                           source=args.calib_data)
    metadata["search"]["calib_data"] = calib.description
    difference = _finished_difference(path, metadata)
    if args.resume and not checkpoint_path(path).exists() and difference is None:
        _log(f"--resume: calibration already finished in {path}; using it")
        layers = _load_quantized(model, path, metadata)
        return path, {"calib_seconds": None, "resumed_from_block": None, "reused_finished_file": True}, layers
    if path.exists() and difference is not None:  # the paper's file name does not name the model: never replace
        raise ParamFileError(f"{path} holds another run's parameters ({difference}); calibrate into another folder "
                             "with --search_result_dir DIR, or move that file away")
    checkpoint = _open_checkpoint(path, metadata, args.resume)
    resumed_from = checkpoint.next_block if checkpoint.layers else None
    gpus = range(torch.cuda.device_count())
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
    started = time.perf_counter()
    layers = _calibrate_with_checkpoint(model, calib.tokens, _calib_settings(args, config), checkpoint)
    calib_seconds = time.perf_counter() - started
    _save_final(path, layers, metadata, checkpoint)
    peaks = {f"cuda:{gpu}": torch.cuda.max_memory_allocated(gpu) for gpu in gpus} or None
    timing = {"calib_seconds": calib_seconds, "resumed_from_block": resumed_from, "calib_peak_gpu_bytes": peaks}
    return path, timing, layers


def quantize_model(model, tokenizer, info: ModelInfo, args: argparse.Namespace) -> dict:
    """Swap modules and set parameters (calibrated now, or loaded); returns the results' quantization block.
    --only_eval without --quant_config / --qbits takes them from the parameter file."""
    loaded = None
    if args.only_eval:
        path = resolve_param_path(args.ptq_param_path)
        loaded = load_params(path)
        saved_config, saved_qbits = saved_run(path, loaded[1])
        args.quant_config = args.quant_config or saved_config.name
        args.qbits = args.qbits or saved_qbits
        args.attention = args.attention or saved_attention(path, loaded[1])
    config = get_config(args.quant_config)
    swap_modules(model, linear=config.linear, lm_head=config.lm_head, embedding=config.embedding)
    if args.attention:
        prepare_attention(model, args.attention)
    metadata = search_metadata(args, config, info)
    if args.only_eval:
        layers = _load_quantized(model, path, metadata, loaded)
        recorded = {key: value for key, value in loaded[1].items() if key != "modules"}  # the file's own run
        if args.export_dir:
            check_target(args.export_dir, recorded)
        timing = {"calib_seconds": None}
    else:
        if args.export_dir:
            check_target(args.export_dir, metadata)  # before calibrating: never after an hour's work
        config_error = EXECUTIONS[args.execution].config_error
        if config_error and (error := config_error(config, args.qbits)):
            raise ExecutionError(f"--execution {args.execution}: {error}")
        path, timing, layers = _calibrate_and_save(model, tokenizer, args, config, metadata)
        recorded = metadata
    param_file = {"param_file": str(path), "param_file_sha256": sha256_file(path)}
    quantization = {**metadata, **param_file, **timing, "only_eval": args.only_eval,
                    **(args.attention or AttentionPolicy()).results()}
    if args.export_dir:
        quantization["export"] = export_model(model, tokenizer, layers, {**recorded, **param_file}, args.export_dir)
    quantization["execution"] = args.execution
    line = use_execution(model, args.execution, layer_codes(layers))  # after the export, which reads the float weights
    if line:
        _log(line)
        quantization["executed_weights"] = executed_weight_bytes(model)
    return quantization


def export_model(model, tokenizer, layers: dict, run: dict, directory: str) -> dict:
    """Write the packed export and say its size against bfloat16; returns the results' quantization.export."""
    report = export_packed(model, layers, run, directory, tokenizer)
    size = report["size"]
    weights = size["quantized_weight_bits_per_parameter"]
    _log(f"export {directory}: {report['placed']}; model.safetensors {size['model_file_bytes']:,} bytes = "
         f"{size['bits_per_parameter']:.3f} bits per parameter over {size['parameters']:,} parameters (bf16: 16, "
         f"{size['bf16_bytes']:,} bytes; {size['ratio_to_bf16']:.3f} of it), quantized weights "
         + (f"{weights:.3f} bits per parameter over {size['quantized_parameters']:,}" if weights else "none")
         + f"; folder {size['directory_bytes']:,} bytes")
    return {"dir": str(directory), "placed": report["placed"], "files": report["files"], "size": size}


def load_export_for_eval(args: argparse.Namespace, device: str, local_rank: int | None
                         ) -> tuple[object, object, ModelInfo, dict]:
    """--model_args pretrained=DIR where DIR is a packed export: (model, tokenizer, info, quantization block).
    The export is the quantized model: flags that calibrate, load parameters or choose another config are refused."""
    margs = args.model_args
    directory = Path(margs.pretrained).expanduser()
    for flag in ("only_eval", "resume", "export_dir", "plot", "offload", "sequential"):
        if getattr(args, flag):
            raise UsageError(f"--{flag}: pretrained={directory} is a packed export, already quantized; evaluate it "
                             f"without --{flag}")
    marker = read_marker(directory)
    try:
        run_info = marker["run"]
        name, qbits = run_info["quant_config"]["name"], QBits.parse(run_info["qbits"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{directory / MARKER} does not say which config and qbits made it; export again") from None
    if args.quant_config not in (None, name) or args.qbits not in (None, qbits):
        given = " ".join(filter(None, [args.quant_config, args.qbits and args.qbits.tag()]))
        raise UsageError(f"{directory} is an export of {name} {qbits.tag()}, not {given}: drop --quant_config and "
                         "--qbits (the export carries its own)")
    if margs.dtype not in ("auto", marker.get("dtype")):
        raise UsageError(f"--model_args dtype={margs.dtype}: {directory} was exported in {marker.get('dtype')}, "
                         "which its log-likelihoods are defined in; use dtype=auto")
    dispatch = margs.use_accelerate and local_rank is None and device.startswith("cuda")
    if dispatch and args.execution != "simulated":
        raise UsageError(f"--execution {args.execution}: load the export on one device (drop use_accelerate=True)")
    model, tokenizer, marker = load_packed(directory, "cpu" if dispatch else device, args.execution)
    executed = {"execution": args.execution}
    if "execution" in marker:
        _log(marker["execution"])
        executed["executed_weights"] = executed_weight_bytes(model)
    if dispatch:
        place_for_eval(model, device)
    if tokenizer is None:
        raise UsageError(f"{directory} holds no tokenizer files; export again from a run that loads one")
    args.quant_config, args.qbits = name, qbits  # the results file's default name
    model_sha256 = marker["files"][WEIGHTS]["sha256"]
    info = ModelInfo(source=str(directory), kind="packed_export", fingerprint=model_sha256,
                     architecture=type(model).__name__, num_layers=len(decoder_layers(model)), tied_embeddings=False,
                     dtype=str(marker.get("dtype")))
    _log(f"loaded packed export {directory} ({name} {qbits.tag()}; {len(marker['files'])} files verified by "
         "sha256): no calibration, no parameter file")
    packed = {"dir": str(directory), "model_sha256": model_sha256,
              "size": marker.get("size"), "calibrated_model": run_info.get("model")}
    return model, tokenizer, info, {**run_info, "calib_seconds": None, "only_eval": True, "packed_export": packed,
                                    **executed}


def check_outputs_writable(args: argparse.Namespace) -> None:
    """Fail in one line, before any slow work, if the parameter file or results cannot be written."""
    folders = [("--output_path", Path(args.output_path).parent if args.output_path else Path("results"))]
    if args.quant_config and not args.only_eval and not is_packed_export(args.model_args.pretrained):
        folders.append(("--search_result_dir", Path(args.search_result_dir) / args.quant_config))
    if args.export_dir:
        folders.append(("--export_dir", Path(args.export_dir).expanduser().parent))
        check_target(args.export_dir, None)  # a file, or a folder holding something else; the run: once loaded
    for flag, folder in folders:
        reason = unwritable_reason(folder)
        if reason:
            raise UsageError(f"{flag}: cannot write to {folder}: {reason}; pass a writable folder")


def default_output_path(args: argparse.Namespace) -> Path:
    name = args.quant_config or "full_precision"
    if args.quant_config:
        name += f"_{args.qbits.tag()}"
    return Path("results") / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}.json"


def data_parallel_device(args: argparse.Namespace, device: str, local_rank: int) -> str:
    """Under `accelerate launch` / torchrun each process evaluates a whole model on its own GPU (cuda:LOCAL_RANK)
    or the CPU; calibration is not split over processes."""
    if (args.quant_config and not args.only_eval and not is_packed_export(args.model_args.pretrained)
            or args.export_dir):
        raise UsageError(f"{data_parallel_processes()} processes (accelerate launch / torchrun) split evaluation only: "
                         "calibrate (and export) in one process first, then evaluate its file with --only_eval "
                         "--ptq_param_path or its export with --model_args pretrained=DIR")
    return f"cuda:{local_rank}" if device.startswith("cuda") else device


def run(args: argparse.Namespace) -> dict:
    """Load, quantize, evaluate; prints lm-eval's table and writes the results JSON. Returns the results
    (empty on the ranks > 0 of a data-parallel evaluation, which leave writing to rank 0)."""
    device = resolve_device(args.device)
    local_rank = data_parallel_local_rank()
    if local_rank is not None:
        device = data_parallel_device(args, device, local_rank)
    check_outputs_writable(args)
    seed_everything(args.seed)
    task_specs = get_task_specs(args.tasks)
    margs = args.model_args
    if is_packed_export(margs.pretrained):
        model, tokenizer, info, quantization = load_export_for_eval(args, device, local_rank)
    else:
        model, tokenizer, info = load_model(margs.pretrained, device=device, dtype=margs.dtype,
                                            use_accelerate=margs.use_accelerate and local_rank is None,
                                            trust_remote_code=margs.trust_remote_code, offload=args.offload)
        _log(f"model: {info.source} ({info.architecture}, {info.num_layers} layers, {info.dtype}) on {device}")
        quantization = {"quant_config": None}
        if args.quant_config or args.only_eval:  # --only_eval alone takes the config from its parameter file
            quantization = quantize_model(model, tokenizer, info, args)
    if args.offload:
        place_for_eval(model, device)
    if args.heldout_ppl:
        quantization["heldout_perplexity"] = heldout(model, tokenizer, args.heldout_ppl, args.calib_seqlen)
    started = time.perf_counter()
    results = evaluate(model, tokenizer, task_specs, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                       limit=args.limit, seed=args.seed)
    if results is None:  # a data-parallel rank > 0: rank 0 holds the gathered results
        return {}
    results["quantization"] = {**quantization, "eval_seconds": time.perf_counter() - started,
                               "model": {"source": info.source, "fingerprint": info.fingerprint,
                                         "architecture": info.architecture, "dtype": info.dtype},
                               "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                               "eval_processes": data_parallel_processes(),
                               "cpu_numerics": cpu_numerics(),
                               "code_fingerprint": code_fingerprint()}
    print(results_table(results))
    output = Path(args.output_path) if args.output_path else default_output_path(args)
    write_results(output, results)
    _log(f"results written to {output}")
    if args.plot:
        from utils.report.plots import plot_param_file

        figure = plot_param_file(quantization["param_file"], output.with_suffix(".layers.png"))
        _log(f"per-layer figure written to {figure}")
    return results
