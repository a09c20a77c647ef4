"""Quantization parameter files: what a calibration found, saved so `--only_eval` can rebuild the model.

A file holds tensors and plain metadata only, so `torch.load(weights_only=True)` and safetensors both
read it without running code:
    {"format": "llm-fp4-params", "version": 1, "metadata": {...}, "tensors": {"<module>.<field>": Tensor}}
metadata: model fingerprint, config, qbits, search arguments, and per module its kind, formats and MSEs.
Per module tensors: weight_max_value [rows], act_max_value [], act_channel_shift [in] (int8, FPQ only),
and, for FP formats, the same ranges as exponent biases (weight_exponent_bias, act_exponent_bias),
b = log2(grid_max / max_value), for readers. Loading uses the max values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quant_layers.formats import QuantFormat, exponent_bias_from_max, parse_format
from quant_layers.modules import QuantEmbedding, QuantLinear
from utils.fileio import atomic_write, sha256_file

FILE_FORMAT = "llm-fp4-params"
VERSION = 1


class ParamFileError(ValueError):
    """A parameter file that is missing, unreadable or does not fit the run."""


@dataclass
class LayerParams:
    """Parameters of one quantized module. kind: "linear" or "embedding"; a None format = not quantized."""

    kind: str
    weight_format: QuantFormat | None
    weight_max_value: torch.Tensor | None
    act_format: QuantFormat | None = None
    act_max_value: torch.Tensor | None = None
    act_channel_shift: torch.Tensor | None = None
    mse: float = float("nan")
    mse_minmax: float = float("nan")

    def apply(self, module: nn.Module) -> None:
        """Set these parameters on a QuantLinear / QuantEmbedding (quantizes its weight once)."""
        if self.kind == "embedding":
            module.set_quant_params(self.weight_format, self.weight_max_value)
        else:
            module.set_quant_params(self.weight_format, self.weight_max_value, self.act_format,
                                    self.act_max_value, self.act_channel_shift)


def param_file_path(root: str | Path, quant_config: str, qbits_tag: str, rounds: int,
                    intervals: tuple[float, float, int]) -> Path:
    """search_result/{config}/W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt"""
    low, high, count = intervals
    name = f"{qbits_tag}_search_round{rounds}_search_intervals({float(low)!r},{float(high)!r},{int(count)}).pt"
    return Path(root) / quant_config / name


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


def _flatten(layers: dict[str, LayerParams]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name, p in layers.items():
        modules[name] = {
            "kind": p.kind,
            "weight_format": p.weight_format.name if p.weight_format else None,
            "act_format": p.act_format.name if p.act_format else None,
            "mse": p.mse,
            "mse_minmax": p.mse_minmax,
        }
        for field, fmt in (("weight", p.weight_format), ("act", p.act_format)):
            value = getattr(p, f"{field}_max_value")
            if fmt is None or value is None:
                continue
            tensors[f"{name}.{field}_max_value"] = value.detach().float().cpu().contiguous()
            if fmt.kind == "fp":
                tensors[f"{name}.{field}_exponent_bias"] = exponent_bias_from_max(fmt, value.detach().float().cpu())
        if p.act_channel_shift is not None:
            tensors[f"{name}.act_channel_shift"] = p.act_channel_shift.detach().cpu().to(torch.int8).contiguous()
    return tensors, modules


def save_params(path: str | Path, layers: dict[str, LayerParams], metadata: dict) -> str:
    """Write `path` (.pt) and its `.safetensors` twin atomically; returns the .pt file's sha256."""
    path = Path(path)
    tensors, modules = _flatten(layers)
    metadata = {**metadata, "modules": modules}
    payload = {"format": FILE_FORMAT, "version": VERSION, "metadata": metadata, "tensors": tensors}
    twin = path.with_suffix(".safetensors")

    def write_both(tmp: str) -> None:  # the .pt is renamed into place only after its twin is written
        torch.save(payload, tmp)
        atomic_write(twin, lambda f: save_file(tensors, f, metadata={"llm_fp4": json.dumps(metadata)}))

    atomic_write(path, write_both)
    return sha256_file(path)


def load_params(path: str | Path) -> tuple[dict[str, LayerParams], dict]:
    """Read a parameter file (.pt with weights_only=True, or .safetensors); returns (layers, metadata)."""
    path = resolve_param_path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = json.loads(f.metadata()["llm_fp4"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
                raise ParamFileError(f"{path} is not an LLM-FP4 parameter file (no '{FILE_FORMAT}' header)")
            metadata, tensors = payload["metadata"], payload["tensors"]
    except ParamFileError:
        raise
    except Exception as error:  # torch/safetensors raise many types for truncated or foreign files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ParamFileError(f"cannot read parameter file {path}: {first_line}") from None
    layers = {}
    for name, info in metadata["modules"].items():
        layers[name] = LayerParams(
            kind=info["kind"],
            weight_format=parse_format(info["weight_format"]) if info["weight_format"] else None,
            weight_max_value=tensors.get(f"{name}.weight_max_value"),
            act_format=parse_format(info["act_format"]) if info["act_format"] else None,
            act_max_value=tensors.get(f"{name}.act_max_value"),
            act_channel_shift=tensors.get(f"{name}.act_channel_shift"),
            mse=info["mse"],
            mse_minmax=info["mse_minmax"],
        )
    return layers, metadata


def apply_params(model: nn.Module, layers: dict[str, LayerParams]) -> None:
    """Set every module's parameters; ParamFileError if a module is missing or of another shape."""
    for name, p in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ParamFileError(f"the parameter file names module {name!r}, which this model does not have") from None
        expected = QuantEmbedding if p.kind == "embedding" else QuantLinear
        if not isinstance(module, expected):
            raise ParamFileError(f"module {name!r} is not quantizable as {p.kind} under this --quant_config")
        rows = module.weight.shape[0]
        if p.weight_max_value is not None and p.weight_max_value.numel() != rows:
            raise ParamFileError(
                f"module {name!r}: the file has {p.weight_max_value.numel()} weight ranges, the model {rows} rows"
            )
        p.apply(module)
