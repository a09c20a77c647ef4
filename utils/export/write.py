"""Writing a packed export (layout.py) from a ready quantized model: after calibration, or after --only_eval
applied a parameter file. The non-quantized tensors are the model's own at that point, so everything a transform
folded into the float weights (SmoothQuant's norms, ResidualRotation's embedding and head) is in them.

The folder is written into a temporary folder beside the target and renamed into place at the end: the target is
never half-written. An existing non-empty target is refused unless it holds an export of the same run
(`check_target`), which is then left alone when the new files are byte-identical and replaced otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quant_layers.codes import Encoded, decode, decode_fpq_weight, encode_quantized
from quant_layers.modules import QuantEmbedding, QuantLinear, QuantParams
from utils.export.layout import (FORMAT, HEADER_KEY, MARKER, VERSION, WEIGHTS, ExportError, dtype_name,
                                 encoded_range_dims, weight_key, weight_tensors)
from utils.params import metadata_difference
from utils.run.fileio import WriteError, current_umask, sha256_file

BF16_BYTES = 2
# What a module's quantization state may hold for this layout to be complete. Fields whose effect is in the
# module's weight need nothing (a search that rounds the weight itself leaves grid points under the same scales,
# which encode_quantized finds again); other new state (a QuantParams field or a QuantLinear buffer) is refused
# until the layout holds it, so no export silently drops part of a quantizer.
_WRITTEN_FIELDS = {"weight_format", "weight_max_value", "act_format", "act_max_value", "act_channel_shift",
                   "act_block_clip", "weight_block_scale", "kind", "mse", "mse_minmax"}
_IN_THE_WEIGHT = {"weight_codes"}
_DERIVED_BUFFERS = {"act_max_value", "act_channel_scale", "act_grid_scale", "act_grid_inverse", "act_block_clip"}
_OFFLOADED = ("tensor {name!r} is offloaded (accelerate's device_map put it on disk): the export needs every weight "
              "in memory; use --offload or more GPU memory instead of disk offload")


def module_weight_codes(module: QuantLinear | QuantEmbedding, params: QuantParams) -> Encoded:
    """Codes and scales of a quantized module's weight as it is now (QuantLinear: W_fold = Q_w(W) 2^-k), with
    FPQ's shifts k as channel_shift: the one place the exporter takes weight codes from.

    The weight is unfolded (times 2^k, exact) and encoded with the module's ranges and explicit block scales
    (codes.encode_quantized). A QuantParams that will carry codes of its own (a search that rounds the weight
    itself) is to be returned here directly. ExportError if the codes do not decode to the module's weight.
    """
    weight = module.weight.detach()
    shift = params.act_channel_shift if isinstance(module, QuantLinear) else None
    unfolded = weight
    if shift is not None:
        shift = shift.to(device=weight.device, dtype=torch.int8)
        unfolded = (weight.float() * torch.exp2(shift.float())).to(weight.dtype)
    max_value = params.weight_max_value.to(device=weight.device, dtype=torch.float32).view(-1, 1)
    if bool((max_value == max_value[0]).all()):  # one range for the whole tensor (per_tensor configs): one scale
        max_value = max_value[0, 0]
    block_scale = params.weight_block_scale.to(weight.device) if params.weight_block_scale is not None else None
    try:
        encoded = encode_quantized(unfolded, params.weight_format, max_value, block_scale)
    except ValueError as error:
        raise ExportError(f"cannot encode the weight of this model's module: {error}") from None
    if shift is not None:
        encoded = dataclasses.replace(encoded, channel_shift=shift)
    decoded = decode_fpq_weight(encoded) if shift is not None else decode(encoded)
    if not torch.equal(decoded, weight):
        raise ExportError("the module's weight is not its parameters' quantization (codes do not decode to it)")
    return encoded


def _quantized(model: nn.Module, layers: dict) -> dict[str, tuple[nn.Module, QuantParams]]:
    """{name: (module, params)} of every module with QuantParams; ExportError if a quantized module has none."""
    found = {}
    for name, params in layers.items():
        if not isinstance(params, QuantParams):
            continue  # a transform: its effect is in the model's tensors
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, (QuantLinear, QuantEmbedding)) or not module.is_quantized:
            raise ExportError(f"module {name!r} has parameters but is not a quantized module of this model")
        if module.weight.device.type == "meta":
            raise ExportError(_OFFLOADED.format(name=f"{name}.weight"))
        unknown = [field.name for field in dataclasses.fields(params) if getattr(params, field.name) is not None
                   and field.name not in _WRITTEN_FIELDS | _IN_THE_WEIGHT]
        unknown += [buffer for buffer, value in module._buffers.items()
                    if value is not None and buffer not in _DERIVED_BUFFERS]
        if unknown:
            raise ExportError(f"module {name!r} has quantization state the export layout does not hold "
                              f"({', '.join(unknown)}); extend utils/export before exporting it")
        found[name] = (module, params)
    missing = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding)) and m.is_quantized
               and n not in found]
    if missing:
        raise ExportError(f"module {missing[0]!r} is quantized but has no parameters to export")
    return found


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _quantized_tensors(quantized: dict) -> tuple[dict[str, torch.Tensor], dict[str, dict], set[str], int, int]:
    """(file tensors, module metadata, state_dict keys they replace, weight parameters, their bytes)."""
    tensors, modules, replaced = {}, {}, set()
    parameters = weight_bytes = 0
    for name, (module, params) in quantized.items():
        weight = module.weight
        info = {"kind": params.kind, "weight_format": None, "act_format": None, "shape": list(weight.shape)}
        replaced.update(f"{name}.{buffer}" for buffer in module._buffers)  # derived: set_quantized rebuilds them
        if params.weight_format is not None:
            try:
                encoded = module_weight_codes(module, params)
            except ExportError as error:
                raise ExportError(f"module {name!r}: {error}") from None
            packed = {key: _cpu(value) for key, value in weight_tensors(name, encoded).items()}
            tensors.update(packed)
            info["weight_format"] = params.weight_format.name
            info["ranges"] = "tensor" if encoded_range_dims(encoded) == 0 else "row"
            replaced.add(weight_key(name, params.kind))
            parameters += weight.numel()
            weight_bytes += sum(t.numel() * t.element_size() for t in packed.values())
        if isinstance(module, QuantLinear) and params.act_channel_shift is not None:
            tensors[f"{name}.act_channel_shift"] = _cpu(params.act_channel_shift.to(torch.int8))
            weight_bytes += weight.shape[1] if params.weight_format is not None else 0
        if isinstance(module, QuantLinear) and module.act_format is not None:
            tensors[f"{name}.act_max_value"] = _cpu(module.act_max_value.float().reshape(()))
            info["act_format"] = module.act_format.name
            if module.act_block_clip is not None:
                tensors[f"{name}.act_block_clip"] = _cpu(module.act_block_clip.float().reshape(()))
        modules[name] = info
    return tensors, modules, replaced, parameters, weight_bytes


def _plain_tensors(model: nn.Module, replaced: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's other state_dict tensors (CPU copies) and {alias: name} for entries that are one tensor."""
    tensors, aliases, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        if key in replaced:
            continue
        if value.device.type == "meta":
            raise ExportError(_OFFLOADED.format(name=key))
        identity = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = _cpu(value)
    return tensors, aliases


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _swap(model: nn.Module) -> dict:
    """What swap_modules must replace in a fresh model for this one's module types to come back."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return {"linear": any(isinstance(m, QuantLinear) and m is not head for m in model.modules()),
            "lm_head": isinstance(head, QuantLinear), "embedding": isinstance(embedding, QuantEmbedding)}


def _file_entries(folder: Path) -> dict[str, dict]:
    return {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(folder.rglob("*")) if path.is_file()}


def check_target(directory: str | Path, run: dict | None) -> None:
    """Before any slow work: ExportError unless `directory` is absent, an empty folder, or an export of the same
    run (model fingerprint, config, qbits, search; utils.params.metadata_difference). run None: any export (what
    can be told before the model is loaded)."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"--export_dir {directory} is a file; choose a folder that does not exist yet")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    try:
        saved = json.loads((directory / MARKER).read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ExportError(f"--export_dir {directory} is a non-empty folder that holds no LLM-FP4 export; choose a "
                          "new folder or empty it") from None
    difference = None if run is None else metadata_difference(saved, run, search=True)
    if difference:
        raise ExportError(f"--export_dir {directory} holds another run's export ({difference}); choose another "
                          "folder or remove it")


def _place(tmp: Path, directory: Path, run: dict) -> str:
    """Rename the finished temporary folder into place; returns what happened, in words."""
    if not directory.is_dir() or not any(directory.iterdir()):
        if directory.is_dir():
            directory.rmdir()
        os.rename(tmp, directory)
        return "written"
    check_target(directory, run)
    old_files = json.loads((directory / MARKER).read_text()).get("files")
    if old_files == json.loads((tmp / MARKER).read_text())["files"]:
        shutil.rmtree(tmp)
        return "unchanged (byte-identical export of the same run)"
    old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old"))
    try:
        os.rename(directory, old / "export")
    except OSError:
        old.rmdir()
        raise
    try:
        os.rename(tmp, directory)
    except OSError:
        os.rename(old / "export", directory)  # the previous export back in place
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
    return "replaced the export of the same run"


def size_report(tensors: dict[str, torch.Tensor], file_bytes: int, parameters: int, quantized_parameters: int,
                weight_bytes: int) -> dict:
    """Bytes and bits per parameter of the checkpoint file and of the quantized weights, against bfloat16."""
    return {"model_file_bytes": file_bytes, "parameters": parameters,
            "bits_per_parameter": 8 * file_bytes / parameters, "bf16_bytes": BF16_BYTES * parameters,
            "ratio_to_bf16": file_bytes / (BF16_BYTES * parameters),
            "quantized_parameters": quantized_parameters, "quantized_weight_bytes": weight_bytes,
            "quantized_weight_bits_per_parameter": 8 * weight_bytes / quantized_parameters if quantized_parameters
            else None, "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def export_packed(model: nn.Module, layers: dict, run: dict, directory: str | Path, tokenizer=None) -> dict:
    """Write the packed export of a quantized model (layout.py) to `directory`; returns the marker's content
    (files, sizes, how it was placed under "placed").

    layers: {module name: QuantParams | TransformParams} as calibration returns them or load_params reads them;
    run: the run metadata to record (utils.params.run_metadata, plus param_file / param_file_sha256).
    """
    directory = Path(directory).expanduser()
    check_target(directory, run)
    quantized = _quantized(model, layers)
    tensors, modules, replaced, quantized_parameters, weight_bytes = _quantized_tensors(quantized)
    plain, aliases = _plain_tensors(model, replaced)
    tensors.update(plain)
    dtype = _model_dtype(model)
    header = {"format": FORMAT, "version": VERSION, "dtype": dtype_name(dtype), "swap": _swap(model),
              "modules": modules, "plain": sorted(plain), "aliases": aliases}
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        for stale in directory.parent.glob(f".{directory.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed export
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    except OSError as error:
        raise WriteError(f"cannot write {directory}: {error.strerror or error}; choose a writable folder") from None
    try:
        # one metadata key: safetensors writes several in no fixed order, and equal exports are to be equal bytes
        save_file(tensors, str(tmp / WEIGHTS), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        size = size_report(tensors, (tmp / WEIGHTS).stat().st_size, parameters, quantized_parameters, weight_bytes)
        marker = {"format": FORMAT, "version": VERSION, "files": _file_entries(tmp), "dtype": dtype_name(dtype),
                  "run": run, "size": size}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        for path in tmp.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~current_umask())
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        tmp.chmod(0o777 & ~current_umask())
        placed = _place(tmp, directory, run)
    except OSError as error:
        raise WriteError(f"cannot write {directory}: {error.strerror or error}; free disk space or choose a "
                         "writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marker["size"]["directory_bytes"] = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    return {**marker, "placed": placed, "dir": str(directory)}
