"""Quantization parameter files: what a calibration found, saved so `--only_eval` can rebuild the model.

A file holds tensors and plain metadata only, so `torch.load(weights_only=True)` and safetensors both
read it without running code:
    {"format": "llm-fp4-params", "version": 1, "metadata": {...}, "tensors": {"<module>.<field>": Tensor}}
metadata: model fingerprint, config, qbits, search arguments, and per module its kind, formats and MSEs.
Per module tensors: weight_max_value [rows], act_max_value [], act_channel_shift [in] (int8, FPQ only),
and, for FP formats, the same ranges as exponent biases (weight_exponent_bias, act_exponent_bias),
b = log2(grid_max / max_value), for readers. Loading uses the max values. Equal content gives equal bytes.
A block-scale search's explicit block scales (QuantParams.weight_block_scale, [rows, in / block size]) are stored
as <module>.weight_block_scale: int16 exponents k (scale 2^k) for power-of-two scale formats (MX), float32 block
ranges top * code * t for the others (NVFP4); files without it (older ones) take each block's scale from its data.
A rounding other than to nearest (GPTQ's, QuantParams.weight_codes [rows, in]) is stored as <module>.weight_codes:
the codes of quant_layers/codes.py, packed two per byte (`pack_nibbles`, low nibble first, [rows, in / 2] uint8)
for formats of up to 4 bits and an even width, as they are (uint8, int32 above 8 bits) otherwise; the module's
metadata says which ("weight_codes": "nibbles" or "plain"). Files without it round to nearest.
A block-scaled activation format's searched clipping multiplier of its dynamic block maxima (QuantParams.
act_block_clip) is stored as <module>.act_block_clip, [] float32 (> 0); files without it use 1 (unclipped maxima).

A transform's fitted tensor is stored with kind "transform" and the transform's settings (its to_dict), under the
module it belongs to (SmoothQuant: a norm's migration scales, tensor "<norm>.smooth_scale"; files from before
transforms say kind "smooth") or, for a model-wide transform, under its name (ResidualRotation:
"residual_rotation.signs"). Transforms are applied first, model-wide ones before per-block ones, each in file order.

Attention quantization (configs/attention.py, quant_layers/attention.py) is stored per attention module with kind
"attention" and the policy's settings (AttentionPolicy.to_dict()), and its calibrated static ranges as
<module>.key_max_value / <module>.value_max_value (float32, shaped per granularity; absent for dynamic ranges and
formats without a range). The run metadata records the policy under "attention" (absent without one: files from
before attention quantization are files without it).

While calibrating, progress is kept in a checkpoint beside the target, `<name>.partial.pt`, in the same safe
format with header "llm-fp4-checkpoint" and metadata["next_block"] (the first block still to calibrate).

The rules of reuse live here too: what a file records of its run (`run_metadata`), which differences make it
unusable for another run (`metadata_difference`), and where calibration writes it (`param_file_path`).
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from configs import QBits, QuantConfig, get_config
from quant_layers.attention import AttentionQuantError
from quant_layers.codes import code_dtype, pack_nibbles, unpack_nibbles
from quant_layers.formats import exponent_bias_from_max, parse_format
from quant_layers.modules import QuantEmbedding, QuantLinear, QuantParams
from utils.attention import apply_attention
from utils.data.architecture import ArchitectureError
from utils.run.fileio import atomic_write, sha256_file, write_bytes_atomic
from utils.search.space import SearchSpace
from utils.search.residual_rotation import MODEL_TRANSFORMS, model_transform_from_dict
from utils.search.transforms import TRANSFORMS, TransformError, apply_saved, transform_from_dict

FILE_FORMAT = "llm-fp4-params"
CHECKPOINT_FORMAT = "llm-fp4-checkpoint"
VERSION = 1
_WHAT = {FILE_FORMAT: "parameter file", CHECKPOINT_FORMAT: "calibration checkpoint"}
_FIX = {FILE_FORMAT: "recalibrate (run without --only_eval)", CHECKPOINT_FORMAT: "run without --resume to start over"}


class ParamFileError(ValueError):
    """A parameter file that is missing, unreadable or does not fit the run."""


@dataclass
class TransformParams:
    """A transform's fitted tensor, under the module it belongs to (SmoothQuant: a norm's migration scales [in]) or,
    for a model-wide transform, under the transform's name (ResidualRotation: its signs [hidden]); float32."""

    settings: dict  # the transform's to_dict()
    value: torch.Tensor

    @property
    def transform(self):
        """The transform these settings describe (utils/search/transforms.py or residual_rotation.py)."""
        if self.settings.get("name") in MODEL_TRANSFORMS:
            return model_transform_from_dict(self.settings)
        return transform_from_dict(self.settings)


@dataclass
class AttentionParams:
    """One attention module's quantization: the policy's settings and the calibrated static ranges (float32, or None
    where the range is dynamic or the format has none)."""

    settings: dict  # AttentionPolicy.to_dict()
    key_max_value: torch.Tensor | None = None
    value_max_value: torch.Tensor | None = None
    kind: str = "attention"


Entry = QuantParams | TransformParams | AttentionParams
_LEGACY_KINDS = {"smooth": {"name": "smoothquant"}}  # files from before transforms: kind -> transform settings
_TENSOR_NAMES = {name: cls.tensor_name for name, cls in {**TRANSFORMS, **MODEL_TRANSFORMS}.items()}


def param_file_path(root: str | Path, config: QuantConfig, qbits: QBits, space: SearchSpace,
                    attention_tag: str = "") -> Path:
    """search_result/{config}/W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt (the paper's naming); with
    attention quantization its tag (AttentionPolicy.tag) follows the qbits: W4A4E4_KV-E2M1-per_channel-..."""
    low, high, count = space.search_intervals
    name = (f"{qbits.tag()}{'_' + attention_tag if attention_tag else ''}_search_round{space.search_round}"
            f"_search_intervals({float(low)!r},{float(high)!r},{int(count)}).pt")
    return Path(root) / config.name / name


def resolve_param_path(path: str | Path) -> Path:
    """The file itself, or the original code's spelling with a float count (`100.0).pt`) and back."""
    path = Path(path)
    if path.exists():
        return path
    for a, b in ((".0).pt", ").pt"), (").pt", ".0).pt")):
        if path.name.endswith(a):
            alternative = path.with_name(path.name[: -len(a)] + b)
            if alternative.exists():
                return alternative
    raise ParamFileError(f"parameter file not found: {path} (run the calibration first, without --only_eval)")


def _plain(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A compact CPU copy with storage of its own: a view would save its whole base storage."""
    return tensor.detach().to(device="cpu", dtype=dtype).clone(memory_format=torch.contiguous_format)


def _flatten(layers: dict[str, Entry]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name, p in layers.items():
        if isinstance(p, AttentionParams):
            modules[name] = {"kind": "attention", "attention": p.settings}
            for part in ("key", "value"):
                if getattr(p, f"{part}_max_value") is not None:
                    tensors[f"{name}.{part}_max_value"] = _plain(getattr(p, f"{part}_max_value"), torch.float32)
            continue
        if isinstance(p, TransformParams):
            modules[name] = {"kind": "transform", "transform": p.settings}
            tensors[f"{name}.{_TENSOR_NAMES[p.settings['name']]}"] = _plain(p.value, torch.float32)
            continue
        modules[name] = {
            "kind": p.kind,
            "weight_format": p.weight_format.name if p.weight_format else None,
            "act_format": p.act_format.name if p.act_format else None,
            "mse": p.mse,
            "mse_minmax": p.mse_minmax,
        }
        for field_name, fmt in (("weight", p.weight_format), ("act", p.act_format)):
            value = getattr(p, f"{field_name}_max_value")
            if fmt is None or value is None:
                continue
            max_value = tensors[f"{name}.{field_name}_max_value"] = _plain(value, torch.float32)
            if fmt.kind == "fp" and fmt.block is None:
                tensors[f"{name}.{field_name}_exponent_bias"] = exponent_bias_from_max(fmt, max_value)
        if p.act_channel_shift is not None:
            tensors[f"{name}.act_channel_shift"] = _plain(p.act_channel_shift, torch.int8)
        if p.act_block_clip is not None:
            tensors[f"{name}.act_block_clip"] = _plain(p.act_block_clip, torch.float32)
        if p.weight_block_scale is not None:
            power_of_two = p.weight_format.block.power_of_two
            tensors[f"{name}.weight_block_scale"] = _plain(p.weight_block_scale,
                                                           torch.int16 if power_of_two else torch.float32)
        if p.weight_codes is not None:
            codes = _plain(p.weight_codes, p.weight_codes.dtype)
            packed = p.weight_format.bits <= 4 and codes.dtype == torch.uint8 and codes.shape[-1] % 2 == 0
            tensors[f"{name}.weight_codes"] = pack_nibbles(codes) if packed else codes
            modules[name]["weight_codes"] = "nibbles" if packed else "plain"
    return tensors, modules


def _pt_bytes(file_format: str, tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    """torch.save of the payload into memory. Equal content gives equal bytes: the archive is named 'archive',
    not after a (random) temp file, and the metadata goes through JSON first, so pickle's memo does not
    depend on which equal strings happened to be one object."""
    metadata = json.loads(json.dumps(metadata))
    buffer = io.BytesIO()
    torch.save({"format": file_format, "version": VERSION, "metadata": metadata, "tensors": tensors}, buffer)
    return buffer.getvalue()


def save_params(path: str | Path, layers: dict[str, Entry], metadata: dict) -> str:
    """Write `path` (.pt) and its `.safetensors` twin atomically; returns the .pt file's sha256.

    Equal layers and metadata give byte-identical files (no timestamps, no temp names inside)."""
    path = Path(path)
    tensors, modules = _flatten(layers)
    metadata = {**metadata, "modules": modules}
    pt = _pt_bytes(FILE_FORMAT, tensors, metadata)
    twin_bytes = save_safetensors(tensors, metadata={"llm_fp4": json.dumps(metadata)})

    def write_both(tmp: str) -> None:  # the .pt is renamed into place only after its twin is written
        Path(tmp).write_bytes(pt)
        write_bytes_atomic(path.with_suffix(".safetensors"), twin_bytes)

    atomic_write(path, write_both)
    return sha256_file(path)


def _read(path: Path, file_format: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a .pt (weights_only=True: tensors and plain data only) or .safetensors file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads(f.metadata()["llm_fp4"])
            return metadata, {key: f.get_tensor(key) for key in f.keys()}
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK" and magic[:1] != b"\x80":  # neither torch's zip format nor a pickle
        raise ParamFileError(f"{path} is not an LLM-FP4 {_WHAT[file_format]} (not a torch file); "
                             "pass a file written by main.py under search_result/")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; the error says it all
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ParamFileError(
            f"refused to load {path}: it is not plain tensors and data ({_unpickling_detail(error)}), and loading "
            "it unrestricted could run code; main.py's files never need that: do not trust this file, recalibrate"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise ParamFileError(f"{path} is not an LLM-FP4 {_WHAT[file_format]} (no '{file_format}' header); "
                             "pass a file written by main.py under search_result/")
    return payload["metadata"], payload["tensors"]


def _unpickling_detail(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only refusal that says what was refused, e.g. 'unsupported GLOBAL posix.system'."""
    lines = [line.strip() for line in str(error).splitlines() if "nsupported" in line]
    return lines[0].rstrip(".")[:160] if lines else "weights_only=True refused it"


def _entry(name: str, info: dict, tensors: dict[str, torch.Tensor]) -> Entry:
    kind = info["kind"]
    if kind == "attention":
        if not isinstance(info.get("attention"), dict):
            raise ParamFileError(f"entry {name!r}: attention quantization without its settings")
        return AttentionParams(info["attention"], tensors.get(f"{name}.key_max_value"),
                               tensors.get(f"{name}.value_max_value"))
    if kind in _LEGACY_KINDS or kind == "transform":
        settings = _LEGACY_KINDS.get(kind) or info.get("transform")
        if not isinstance(settings, dict) or settings.get("name") not in _TENSOR_NAMES:
            raise ParamFileError(f"entry {name!r} names an unknown transform {settings!r}")
        return TransformParams(settings, tensors[f"{name}.{_TENSOR_NAMES[settings['name']]}"])
    return QuantParams(
        weight_format=parse_format(info["weight_format"]) if info["weight_format"] else None,
        weight_max_value=tensors.get(f"{name}.weight_max_value"),
        act_format=parse_format(info["act_format"]) if info["act_format"] else None,
        act_max_value=tensors.get(f"{name}.act_max_value"),
        act_channel_shift=tensors.get(f"{name}.act_channel_shift"),
        mse=info["mse"],
        mse_minmax=info["mse_minmax"],
        kind=kind,
        weight_block_scale=tensors.get(f"{name}.weight_block_scale"),
        weight_codes=_weight_codes(name, info, tensors),
        act_block_clip=tensors.get(f"{name}.act_block_clip"),
    )


def _weight_codes(name: str, info: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The module's weight codes [rows, in] (unpacked), or None; ParamFileError for an unknown layout or packed codes
    that are not bytes."""
    codes = tensors.get(f"{name}.weight_codes")
    layout = info.get("weight_codes")
    if codes is None and layout is None:
        return None
    if codes is None or layout not in ("nibbles", "plain"):
        what = "missing" if codes is None else f"in layout {layout!r}"
        raise ParamFileError(f"module {name!r}: weight codes {what} (expected a weight_codes tensor, layout "
                             "'nibbles' or 'plain')")
    if layout == "plain":
        return codes
    if codes.dtype != torch.uint8:
        raise ParamFileError(f"module {name!r}: the file's packed weight codes are {codes.dtype}, expected uint8")
    return unpack_nibbles(codes)


def _layers_from(metadata: dict, tensors: dict[str, torch.Tensor]) -> dict[str, Entry]:
    return {name: _entry(name, info, tensors) for name, info in metadata["modules"].items()}


def _load(path: Path, file_format: str) -> tuple[dict[str, Entry], dict]:
    try:
        metadata, tensors = _read(path, file_format)
        return _layers_from(metadata, tensors), metadata
    except ParamFileError:
        raise
    except Exception as error:  # torch/safetensors raise many types for truncated or foreign files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ParamFileError(f"cannot read {_WHAT[file_format]} {path}: {first_line[:200]}; the file is damaged "
                             f"or not written by main.py: {_FIX[file_format]}") from None


def load_params(path: str | Path) -> tuple[dict[str, Entry], dict]:
    """Read a parameter file (.pt with weights_only=True, or .safetensors); returns (layers, metadata).

    Any problem (missing, truncated, foreign, carrying code) is a one-line ParamFileError; no code runs."""
    return _load(resolve_param_path(path), FILE_FORMAT)


def checkpoint_path(target: str | Path) -> Path:
    """Where calibration keeps its progress while it writes `target`: `<target stem>.partial.pt`."""
    target = Path(target)
    return target.with_name(f"{target.stem}.partial.pt")


@dataclass
class Checkpoint:
    """A calibration's progress file: the parameters found so far and the first block still to calibrate.

    layers / next_block: what a resumed calibration continues from (empty / 0: the start). `save` rewrites
    the file atomically, in the same safe format as parameter files (tensors and plain metadata only)."""

    path: Path
    metadata: dict
    layers: dict[str, Entry] = field(default_factory=dict)
    next_block: int = 0

    def save(self, layers: dict[str, Entry], next_block: int) -> None:
        tensors, modules = _flatten(layers)
        metadata = {**self.metadata, "modules": modules, "next_block": next_block}
        write_bytes_atomic(self.path, _pt_bytes(CHECKPOINT_FORMAT, tensors, metadata))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Entry], dict]:
    """(layers, metadata) of a checkpoint; metadata["next_block"] is the first block still to calibrate."""
    return _load(Path(path), CHECKPOINT_FORMAT)


def _check_shapes(name: str, p: QuantParams, module: nn.Module) -> None:
    rows = module.weight.shape[0]
    if p.weight_max_value is not None and p.weight_max_value.numel() != rows:
        raise ParamFileError(
            f"module {name!r}: the file has {p.weight_max_value.numel()} weight ranges, the model {rows} rows"
        )
    if p.act_max_value is not None and p.act_max_value.numel() != 1:
        raise ParamFileError(f"module {name!r}: the file has {p.act_max_value.numel()} activation ranges, expected 1")
    columns = module.weight.shape[1]
    if p.act_channel_shift is not None and p.act_channel_shift.numel() != columns:
        raise ParamFileError(f"module {name!r}: the file has {p.act_channel_shift.numel()} channel shifts, "
                             f"the model {columns} input channels")
    if p.weight_block_scale is not None:
        block = p.weight_format.block if p.weight_format is not None else None
        if block is None or tuple(p.weight_block_scale.shape) != (rows, columns // block.size):
            raise ParamFileError(f"module {name!r}: the file's weight block scales {tuple(p.weight_block_scale.shape)} "
                                 f"do not fit a block-scaled weight of {rows} x {columns}")
    if p.weight_codes is not None:
        expected = code_dtype(p.weight_format) if p.weight_format is not None else None
        if expected is None or tuple(p.weight_codes.shape) != (rows, columns) or p.weight_codes.dtype != expected:
            raise ParamFileError(f"module {name!r}: the file's weight codes {tuple(p.weight_codes.shape)} "
                                 f"{p.weight_codes.dtype} do not fit a {rows} x {columns} weight with {expected} codes")
        if p.weight_codes.numel() and not 0 <= int(p.weight_codes.min()) <= int(p.weight_codes.max()) < \
                2**p.weight_format.bits:
            raise ParamFileError(f"module {name!r}: the file's weight codes are not {p.weight_format.bits}-bit codes")
        if p.weight_format.block is not None and p.weight_block_scale is None:
            raise ParamFileError(f"module {name!r}: the file's weight codes of {p.weight_format.name} come without "
                                 "their block scales")
    if p.act_block_clip is not None:
        clip = p.act_block_clip
        if p.act_format is None or p.act_format.block is None or clip.dim() != 0 or not clip.is_floating_point() \
                or not bool(torch.isfinite(clip) & (clip > 0)):
            raise ParamFileError(f"module {name!r}: the file's activation block clip (shape {tuple(clip.shape)}) is "
                                 "not one positive number for a block-scaled activation format")
    if (p.weight_format is not None) != (p.weight_max_value is not None) or \
            (p.act_format is not None) != (p.act_max_value is not None):
        raise ParamFileError(f"module {name!r}: the file has a format without its range (or a range without format)")


def apply_params(model: nn.Module, layers: dict[str, Entry]) -> None:
    """Set every module's parameters (transforms first: model-wide ones, then per block, in file order);
    ParamFileError if a module is missing or of another shape."""
    transforms = {name: p for name, p in layers.items() if isinstance(p, TransformParams)}
    try:
        built = {name: p.transform for name, p in transforms.items()}
    except TransformError as error:
        raise ParamFileError(f"a transform entry: {error}") from None
    for name in sorted(transforms, key=lambda n: built[n].scope != "model"):  # stable: file order within a scope
        transform, value = built[name], transforms[name].value
        try:
            if transform.scope == "model":
                transform.apply(model, {transform.tensor_name: value})
            else:
                _module(model, name)
                apply_saved(model, transform, {name: value})
        except (ArchitectureError, TransformError) as error:
            raise ParamFileError(f"entry {name!r}: {error}") from None
    for name, p in layers.items():
        if name in transforms:
            continue
        module = _module(model, name)
        if isinstance(p, AttentionParams):
            try:
                apply_attention(module, p.settings, p.key_max_value, p.value_max_value)
            except AttentionQuantError as error:
                raise ParamFileError(f"entry {name!r}: {error}") from None
            continue
        expected = QuantEmbedding if p.kind == "embedding" else QuantLinear
        if not isinstance(module, expected):
            raise ParamFileError(f"module {name!r} is not quantizable as {p.kind} under this --quant_config")
        _check_shapes(name, p, module)
        module.set_quant_params(p)


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ParamFileError(f"the parameter file names module {name!r}, which this model does not have") from None


def run_metadata(model: dict, config: QuantConfig, qbits: QBits, space: SearchSpace, calibration: dict,
                 attention: dict | None = None) -> dict:
    """What a parameter file must match to be reused: the model {source, fingerprint, architecture}, the config's
    definition, qbits, the search's knobs (SearchSpace.metadata) and the calibration settings (sequential,
    calib_size, calib_seqlen, seed; calib_data once known); the attention policy (AttentionPolicy.to_dict()) when
    attention is quantized."""
    metadata = {"model": model, "quant_config": config.to_dict(), "qbits": list(vars(qbits).values()),
                "search": {**space.metadata(), **calibration}}
    if attention is not None:
        metadata["attention"] = attention
    return metadata


def _legacy_search_values() -> dict:
    """Search knobs added after files were written, with the value those files were made with."""
    return {f.name: f.metadata["legacy"] for f in SearchSpace.flags() if f.metadata["legacy"] is not None}


def _model_words(model: dict) -> str:
    return f"{model.get('source')}, weights fingerprint {str(model.get('fingerprint'))[:12]}"


def _search_difference(saved: dict, current: dict) -> str | None:
    if saved["quant_config"] != current["quant_config"]:
        return f"made with another definition of {current['quant_config']['name']} (its configs/ file changed)"
    legacy = _legacy_search_values()
    for key, value in current["search"].items():
        before = saved["search"].get(key, legacy.get(key))  # a file from before the key existed
        if before != value:
            return f"made with {key} = {before}, not {value}"
    return None


def metadata_difference(saved: dict, current: dict, search: bool = False) -> str | None:
    """The first difference that makes a file's metadata unusable for this run, in words; None if none.

    Always compared: model fingerprint, --quant_config, --qbits; with `search` (resuming, or replacing a finished
    file) also the config's definition, the search arguments and the calibration data."""
    try:
        if saved["model"]["fingerprint"] != current["model"]["fingerprint"]:
            return f"calibrated on another model ({_model_words(saved['model'])}) than {_model_words(current['model'])}"
        if saved["quant_config"]["name"] != current["quant_config"]["name"]:
            return f"made with --quant_config {saved['quant_config']['name']}, not {current['quant_config']['name']}"
        if saved["qbits"] != current["qbits"]:
            return (f"made with --qbits {' '.join(map(str, saved['qbits']))}, "
                    f"not {' '.join(map(str, current['qbits']))}")
        if saved.get("attention") != current.get("attention"):
            return f"made with attention quantization {saved.get('attention')}, not {current.get('attention')}"
        return _search_difference(saved, current) if search else None
    except (KeyError, TypeError, AttributeError):
        return "written without the run metadata main.py records (model fingerprint, config, qbits, search)"


def check_param_metadata(path: Path, saved: dict, current: dict) -> None:
    """ParamFileError naming the first difference that makes a file unusable for this run."""
    difference = metadata_difference(saved, current)
    if difference:
        raise ParamFileError(f"{path} was {difference}; use the model and flags it was made with, "
                             "or recalibrate (run without --only_eval)")


def saved_run(path: str | Path, metadata: dict) -> tuple[QuantConfig, QBits]:
    """The config (by name, from configs/) and --qbits a parameter file's metadata records: what --only_eval uses
    when the command names neither."""
    try:
        return get_config(metadata["quant_config"]["name"]), QBits.parse(metadata["qbits"])
    except (KeyError, TypeError, ValueError) as error:
        raise ParamFileError(f"{path} does not say which --quant_config and --qbits made it ({error}); "
                             "pass them on the command line") from None


def saved_attention(path: str | Path, metadata: dict):
    """The AttentionPolicy a parameter file's metadata records (None: attention in full precision)."""
    from configs.attention import AttentionPolicy

    try:
        return AttentionPolicy.from_dict(metadata.get("attention"))
    except (TypeError, ValueError) as error:
        raise ParamFileError(f"{path} records attention quantization this code cannot read ({error})") from None
