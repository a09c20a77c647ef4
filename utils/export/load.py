"""Reading a packed export (layout.py) back into a model that computes what the simulated model computed.

`load_packed(directory, device)`: check the marker (format, version), every file it lists (size, then sha256),
rebuild the architecture from config.json in the export's dtype, swap in QuantLinear / QuantEmbedding as the
export says, put every non-quantized tensor in place (each checked against the rebuilt model's shape and dtype),
decode each quantized weight exactly as QuantLinear.set_quant_params computed it (W_fold = Q_w(W) 2^-k) and set
the activation quantizers. The logits equal the simulated model's on the same device (tests/test_export.py).
With an `execution` (utils/execution.py) the Linears then run from the file's codes instead of the decoded weights.

Only JSON and safetensors are read; every problem is a one-line ExportError naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from quant_layers.codes import Encoded, decode, decode_fpq_weight
from quant_layers.formats import parse_format
from quant_layers.modules import QuantEmbedding, QuantLinear, QuantParams, swap_modules
from utils.export.layout import (DTYPES, FORMAT, HEADER_KEY, MARKER, VERSION, WEIGHTS, ExportError, dtype_name,
                                 weight_from_tensors, weight_key)
from utils.run.fileio import sha256_file


def is_packed_export(path: str | Path | None) -> bool:
    """Whether `path` is a folder holding an export marker (llm_fp4_export.json)."""
    return path is not None and Path(path).expanduser().is_dir() and (Path(path).expanduser() / MARKER).is_file()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0][:200] if lines else "") or type(error).__name__


def _known_version(what: str, found: dict) -> None:
    if found.get("format") != FORMAT:
        raise ExportError(f"{what} is not an LLM-FP4 export (format {found.get('format')!r}, expected {FORMAT!r})")
    if str(found.get("version")) != str(VERSION):
        raise ExportError(f"{what} is export version {found.get('version')}; this code reads version {VERSION}: use "
                          "the code that wrote it, or export again with this one")


def read_marker(directory: str | Path) -> dict:
    """The marker's content, its format and version checked."""
    path = Path(directory).expanduser() / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {path}: {_first_line(error)}; export again with --export_dir") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict) or WEIGHTS not in marker["files"]:
        raise ExportError(f"{path} lists no {WEIGHTS}; it is damaged: export again with --export_dir")
    _known_version(str(path), marker)
    return marker


def verify_files(directory: str | Path, marker: dict) -> None:
    """Every file the marker lists is there with its size and sha256 (truncated, tampered, replaced: ExportError)."""
    directory = Path(directory).expanduser()
    for name, entry in marker["files"].items():
        path = directory / name
        if not isinstance(entry, dict) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ExportError(f"{directory / MARKER} lists {name!r} oddly (not a file inside the export); it is "
                              "damaged: export again with --export_dir")
        if not path.is_file():
            raise ExportError(f"{path} is missing from the export; export again with --export_dir")
        if path.stat().st_size != entry.get("bytes"):
            raise ExportError(f"{path} is {path.stat().st_size} bytes, the export recorded {entry.get('bytes')}: "
                              "truncated or replaced; export again with --export_dir")
        if sha256_file(path) != entry.get("sha256"):
            raise ExportError(f"{path} does not match the sha256 the export recorded: tampered or damaged; export "
                              "again with --export_dir")


def _read_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header JSON, tensors on the CPU) of model.safetensors; any safetensors failure is one line."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = json.loads((f.metadata() or {})[HEADER_KEY])
            _known_version(str(path), header if isinstance(header, dict) else {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except ExportError:
        raise
    except Exception as error:  # safetensors raises several types for a truncated or foreign file
        raise ExportError(f"cannot read {path}: {_first_line(error)}; the file is damaged: export again") from None
    return header, tensors


def _check_header(path: Path, header: dict) -> None:
    """The header's structure (layout.py), so that what follows reads plain, typed values."""
    def strings(values) -> bool:
        return all(isinstance(v, str) for v in values)

    modules, swap = header.get("modules"), header.get("swap")
    problems = [
        (header.get("dtype") not in DTYPES, f"model dtype {header.get('dtype')!r}"),
        (not isinstance(swap, dict) or set(swap) != {"linear", "lm_head", "embedding"}
         or not all(isinstance(v, bool) for v in swap.values()), "module swap"),
        (not isinstance(header.get("plain"), list) or not strings(header["plain"]), "tensor list"),
        (not isinstance(header.get("aliases"), dict) or not strings([*header["aliases"], *header["aliases"].values()]),
         "aliases"),
        (not isinstance(modules, dict) or not all(_module_info_ok(info) for info in modules.values()), "modules"),
    ]
    for bad, what in problems:
        if bad:
            raise ExportError(f"{path}: its metadata has no valid {what}; the file is not a packed export of this "
                              "code: export again")


def _module_info_ok(info) -> bool:
    shape = info.get("shape") if isinstance(info, dict) else None
    return (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)
            and info.get("kind") in ("linear", "embedding") and info.get("ranges", "row") in ("row", "tensor")
            and all(f in info and isinstance(info[f], (str, type(None))) for f in ("weight_format", "act_format")))


@contextlib.contextmanager
def _no_init():
    """transformers' no_init_weights (the weights are all overwritten); where this version has none, plain init."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # older or newer transformers without it: random init, slower, same result
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


def _build(directory: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
        with _no_init():
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    except Exception as error:  # transformers raises many types for a config it cannot build
        raise ExportError(f"cannot build the model of {directory / 'config.json'}: {_first_line(error)}") from None


def _slot(model: nn.Module, key: str) -> tuple[dict, str]:
    """(the parameter or buffer dict of the module owning state_dict key `key`, the attribute name)."""
    parent_name, _, attr = key.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    for slots in (() if parent is None else (parent._parameters, parent._buffers)):
        if attr in slots:
            return slots, attr
    raise ExportError(f"{WEIGHTS} holds {key!r}, which the model of config.json does not have: the files do not "
                      "belong together")


def _place(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put a state_dict tensor in the rebuilt model: it must match the model's parameter or buffer (a buffer that
    is None there, such as an InputRotation's, takes it as it is)."""
    slots, attr = _slot(model, key)
    current = slots[attr]
    if current is not None and (current.shape != tensor.shape or current.dtype != tensor.dtype):
        raise ExportError(f"{WEIGHTS}: {key!r} is {dtype_name(tensor.dtype)} {list(tensor.shape)}, the model of "
                          f"config.json has {dtype_name(current.dtype)} {list(current.shape)}: the files do not "
                          "belong together")
    if isinstance(current, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=current.requires_grad)
    slots[attr] = tensor


def _alias(model: nn.Module, alias: str, source: str) -> None:
    """Make `alias` the very tensor (Parameter) at `source`, as the exported model shared it (a tied head)."""
    slots, attr = _slot(model, alias)
    source_slots, source_attr = _slot(model, source)
    value = source_slots[source_attr]
    current = slots[attr]
    if current is not None and (value is None or current.shape != value.shape or current.dtype != value.dtype):
        raise ExportError(f"{WEIGHTS}: {alias!r} is {source!r} in the export, which does not fit the model of "
                          "config.json: the files do not belong together")
    slots[attr] = value


def _format(name: str, value) -> object:
    try:
        return parse_format(value) if value is not None else None
    except ValueError as error:
        raise ExportError(f"{WEIGHTS}: module {name!r}: {error}") from None


def _set_module(model: nn.Module, name: str, info: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> Encoded | None:
    """Decode one quantized module's weight and set it with its activation quantizer; returns the weight's Encoded
    (CPU tensors, FPQ shifts included), None for an unquantized weight."""
    try:
        module = model.get_submodule(name)
        expected = module.weight
    except AttributeError:
        raise ExportError(f"{WEIGHTS} names module {name!r}, which the model of config.json does not have") from None
    kind = QuantEmbedding if info["kind"] == "embedding" else QuantLinear
    if not isinstance(module, kind) or (kind is QuantEmbedding and info["act_format"] is not None):
        raise ExportError(f"{WEIGHTS}: module {name!r} is a {type(module).__name__} of the model, not a quantized "
                          f"{info['kind']} as the export says: the files do not belong together")
    if list(expected.shape) != info["shape"]:
        raise ExportError(f"{WEIGHTS}: module {name!r} is {info.get('shape')}, the model of config.json has "
                          f"{list(expected.shape)}: the files do not belong together")
    weight_format, act_format = _format(name, info["weight_format"]), _format(name, info["act_format"])
    shift = tensors.get(f"{name}.act_channel_shift")
    if shift is not None and (shift.dtype != torch.int8 or tuple(shift.shape) != (expected.shape[1],)):
        raise ExportError(f"{WEIGHTS}: {name + '.act_channel_shift'!r} is not int8 [{expected.shape[1]}]")
    encoded = None
    if weight_format is None:
        weight = expected.detach()
    else:
        encoded = weight_from_tensors(name, weight_format, tuple(expected.shape), info.get("ranges", "row"), dtype,
                                      tensors)
        if shift is not None:
            encoded = dataclasses.replace(encoded, channel_shift=shift)
            weight = decode_fpq_weight(encoded.to(device))
        else:
            weight = decode(encoded.to(device))
    act_max = tensors.get(f"{name}.act_max_value")
    if (act_format is None) != (act_max is None) or (act_max is not None and (act_max.dtype != torch.float32
                                                                               or act_max.numel() != 1)):
        raise ExportError(f"{WEIGHTS}: module {name!r} has an activation format without its float32 range (or the "
                          "reverse)")
    clip = tensors.get(f"{name}.act_block_clip")
    if clip is not None and (act_format is None or act_format.block is None or clip.dtype != torch.float32
                             or clip.numel() != 1 or not bool(torch.isfinite(clip).all() & (clip > 0).all())):
        raise ExportError(f"{WEIGHTS}: {name + '.act_block_clip'!r} is not one positive float32 for a block-scaled "
                          "activation format")
    params = QuantParams(weight_format, None, act_format, None if act_max is None else act_max.to(device),
                         None if shift is None else shift.to(device), kind=info["kind"],
                         act_block_clip=None if clip is None else clip.reshape(()).to(device))
    module.set_quantized(weight, params)
    return encoded


def load_packed(directory: str | Path, device: str | torch.device = "cpu", execution: str = "simulated"
                ) -> tuple[nn.Module, object, dict]:
    """(model in eval mode on `device` in the export's dtype, tokenizer or None, marker) of a packed export.
    execution: a name of utils.execution's EXECUTIONS, converted from the file's codes (the marker then holds the
    conversion's line under "execution"; ExecutionError for a module it cannot take)."""
    directory = Path(directory).expanduser()
    marker = read_marker(directory)
    verify_files(directory, marker)
    header, tensors = _read_weights(directory / WEIGHTS)
    _check_header(directory / WEIGHTS, header)
    dtype = DTYPES[header["dtype"]]
    model = _build(directory, dtype)
    try:
        codes = _fill(model, header, tensors, dtype, torch.device(device))
    except ExportError as error:  # the messages name model.safetensors and config.json: say which folder
        raise ExportError(f"packed export {directory}: {error}") from None
    from utils.execution import use_execution  # here: utils.execution imports utils.export

    line = use_execution(model, execution, lambda name, module: codes[name].to(module.weight.device))
    if line:
        marker = {**marker, "execution": line}
    tokenizer = None
    if any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as error:  # transformers raises many types for a tokenizer it cannot read
            raise ExportError(f"cannot read the tokenizer in {directory}: {_first_line(error)}") from None
    return model.eval(), tokenizer, marker


def _fill(model: nn.Module, header: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
          device: torch.device) -> dict[str, Encoded]:
    """Swap the modules, place the non-quantized tensors (checked to cover the model), move to device, decode and
    set every quantized module; returns {name: its weight's Encoded} of the quantized weights."""
    swap_modules(model, **header["swap"])
    modules = header["modules"]
    quantized_keys = {weight_key(name, info["kind"]) for name, info in modules.items() if info["weight_format"]}
    expected = set(model.state_dict()) - quantized_keys
    for key in header["plain"]:
        _place(model, key, _tensor(tensors, key))
    for alias, source in header["aliases"].items():
        _alias(model, alias, source)
    missing = sorted(expected - set(header["plain"]) - set(header["aliases"]))
    if missing:
        raise ExportError(f"{WEIGHTS} has no tensor {missing[0]!r} of the model of config.json: the files do not "
                          "belong together")
    model.to(device)
    codes = {name: _set_module(model, name, info, tensors, dtype, device) for name, info in modules.items()}
    return {name: encoded for name, encoded in codes.items() if encoded is not None}


def _tensor(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ExportError(f"{WEIGHTS} has no tensor {key!r}, which its metadata lists: export again")
    return tensors[key]
