"""Function-preserving transforms of a decoder block, as strategies (SmoothQuant today).

A Transform fits parameters on one block and the captured inputs of its Linears, folds them into the
block (`apply`) and changes the captured inputs the same way (`transform_inputs`), so the Linears can be
calibrated on what the transformed block computes. Its parameters, {module name relative to the block:
tensor}, are what the parameter file stores: `apply` with them reproduces the fitted block exactly.

SmoothQuant (Xiao et al., 2023): for a norm followed by Linears L_1..L_k that read its output X [N, in],

    s_j = max_n |X_nj|^alpha / max_{i, o} |W_i[o, j]|^(1 - alpha)      (both maxima and s clamped to >= 1e-5)

then norm(x) -> norm(x) / s and every W_i[:, j] *= s_j: X W^T is unchanged and X / s has flatter channels.
Which norms feed which Linears, and how a norm absorbs 1 / s, come from the block's Architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from quant_layers.quantize import abs_max
from utils.data.architecture import Architecture, architecture_of, decoder_layers

INPUT_ROWS = 4096  # captured rows rescaled at once (bounds the float32 temporary)


class TransformError(ValueError):
    """A transform cannot be built or applied here (bad settings, unsupported block, bad parameters); one line."""


class Transform(Protocol):
    """fit -> params {name relative to the block: tensor}; apply folds them into the block; transform_inputs
    changes captured inputs {Linear name relative to the block: [tokens, in]} in place to match."""

    name: ClassVar[str]
    tensor_name: ClassVar[str]  # what a parameter file calls its tensor, "<module>.<tensor_name>"

    def fit(self, block: nn.Module, inputs: dict[str, torch.Tensor], arch: Architecture
            ) -> dict[str, torch.Tensor]: ...

    def apply(self, block: nn.Module, params: dict[str, torch.Tensor], arch: Architecture) -> None: ...

    def transform_inputs(self, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                         arch: Architecture) -> None: ...

    def to_dict(self) -> dict: ...


def migration_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] (float32) from the input channels' absolute maxima [in] and the Linears' weights [out_i, in]."""
    w_absmax = torch.stack([abs_max(w.detach(), dim=0).float() for w in weights]).amax(dim=0)
    scales = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


def _distinct(inputs: dict[str, torch.Tensor], names: tuple[str, ...]) -> list[torch.Tensor]:
    """The captured tensors of `names`, each shared tensor once (q/k/v read one buffer)."""
    return list({id(inputs[n]): inputs[n] for n in names if n in inputs}.values())


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant's migration with strength alpha in (0, 1); params: {norm name: s [in] float32}."""

    alpha: float = 0.5
    name: ClassVar[str] = "smoothquant"
    tensor_name: ClassVar[str] = "smooth_scale"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise TransformError(f"SmoothQuant alpha must be in (0, 1), got {self.alpha}")

    def _pairs(self, block: nn.Module, arch: Architecture) -> dict[str, tuple[str, ...]]:
        if type(block).__name__ not in arch.block_classes:
            raise TransformError(f"the {arch.name} adapter describes {', '.join(arch.block_classes)} blocks, "
                                 f"not {type(block).__name__}")
        if not arch.norm_linear_pairs:
            raise TransformError(f"SmoothQuant needs norms in front of Linears; {arch.name} blocks have none")
        return dict(arch.norm_linear_pairs)

    @torch.no_grad()
    def fit(self, block: nn.Module, inputs: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
        """{norm name: s [in] float32} from the captured inputs [tokens, in] of the Linears after each norm."""
        scales = {}
        for norm_name, linear_names in self._pairs(block, arch).items():
            captured = _distinct(inputs, linear_names)
            if not captured:
                raise TransformError(f"SmoothQuant needs the captured input of one of {', '.join(linear_names)}")
            weights = [block.get_submodule(n).weight for n in linear_names]
            scales[norm_name] = migration_scales(abs_max(captured[0], dim=0), weights, self.alpha)
        return scales

    @torch.no_grad()
    def apply(self, block: nn.Module, params: dict[str, torch.Tensor], arch: Architecture) -> None:
        """norm(x) -> norm(x) / s and W[:, j] *= s_j for the Linears after it (in place, in the model's dtype)."""
        pairs = self._pairs(block, arch)
        for norm_name, scales in params.items():
            if norm_name not in pairs:
                raise TransformError(f"{norm_name!r} is not a norm SmoothQuant folds into in {arch.name} blocks "
                                     f"(expected one of {list(pairs)})")
            norm = block.get_submodule(norm_name)
            if scales.shape != norm.weight.shape:
                raise TransformError(f"SmoothQuant scales of shape {tuple(scales.shape)} do not fit {norm_name!r} "
                                     f"of shape {tuple(norm.weight.shape)}")
            arch.scale_norm(norm, scales)
            for linear_name in pairs[norm_name]:
                weight = block.get_submodule(linear_name).weight
                weight.copy_((weight.float() * scales.to(weight.device, torch.float32)).to(weight.dtype))

    @torch.no_grad()
    def transform_inputs(self, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                         arch: Architecture) -> None:
        """X -> X / s in place for the Linears after each norm, INPUT_ROWS rows at a time (no full float32 copy)."""
        pairs = dict(arch.norm_linear_pairs)
        for norm_name, scales in params.items():
            for x in _distinct(inputs, pairs.get(norm_name, ())):
                divisor = scales.to(x.device, torch.float32)
                for rows in x.split(INPUT_ROWS):
                    rows.copy_((rows.float() / divisor).to(x.dtype))

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


TRANSFORMS: dict[str, type] = {cls.name: cls for cls in (SmoothQuant,)}


def transform_from_dict(fields: dict) -> Transform:
    """The transform that `to_dict` described, e.g. {"name": "smoothquant", "alpha": 0.5}."""
    settings = dict(fields)
    name = settings.pop("name", None)
    if name not in TRANSFORMS:
        raise TransformError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    try:
        return TRANSFORMS[name](**settings)
    except TypeError as error:
        raise TransformError(f"bad settings for transform {name!r}: {error}") from None


def apply_saved(model: nn.Module, transform: Transform, params: dict[str, torch.Tensor]) -> None:
    """Fold saved parameters keyed by full module names ("model.layers.0.input_layernorm") into their blocks."""
    arch = architecture_of(model)
    block_ids = {id(block) for block in decoder_layers(model)}
    blocks = {name: m for name, m in model.named_modules() if id(m) in block_ids}
    by_block: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in params.items():
        prefix = name.rpartition(".")[0]
        while prefix and prefix not in blocks:
            prefix = prefix.rpartition(".")[0]
        if not prefix:
            raise TransformError(f"{name!r} is not inside a decoder block of {type(model).__name__}")
        by_block.setdefault(prefix, {})[name.removeprefix(prefix + ".")] = tensor
    for prefix, block_params in by_block.items():
        transform.apply(blocks[prefix], block_params, arch)
