"""QuaRot's rotation of the residual stream (Ashkboos et al., 2024), folded into the weights: a model-wide transform.

With Q = diag(s) H [hidden, hidden] (randomised Hadamard, s = +-1 from a seed; H of quant_layers/hadamard.py, full
width or block-diagonal) every residual state h becomes h Q. For RMSNorm(x) = rms_normalize(x) * g:

    rms_normalize(h Q) = rms_normalize(h) Q                  (Q orthogonal keeps the norm; a gain g would not commute)

so, in float64 and cast once to the weights' dtype (a writer's whole weight at once, other weights INPUT_ROWS rows
at a time):
    embedding              E -> E Q                                    [vocab, hidden]
    Linears after a norm   W -> W diag(g) Q,  g -> 1  (q/k/v, gate/up)  [out, hidden]
    residual writers       W -> Q^T W,  b -> b Q      (o_proj, down_proj)
    head                   W -> W diag(g_final) Q,  g_final -> 1
    online, optional       down_proj's input z -> z K (K the Hadamard of the intermediate width, QuantLinear's
                           input_rotation), W_down -> Q^T W_down K
and the logits are unchanged. Gemma3 is refused: its post-attention / post-feedforward norms scale o_proj's and
down_proj's outputs per channel after normalising, and that gain cannot be moved past Q.

This is not a per-block Transform: it changes the embedding, every block and the head, once, before calibration
(after swap_modules, which gives down_proj its input_rotation). A ModelTransform's params are {name: tensor} for
the whole model; ResidualRotation's are {"signs": s [hidden] float32}: with the settings they rebuild Q exactly
(the Hadamard factors are integer constructions), so replay does not depend on torch's random generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from quant_layers.hadamard import (check_block_size, hadamard_factors, hadamard_matrix, is_power_of_two, kron_rotate,
                                   random_signs, rotation_dtype)
from quant_layers.modules import untie_head
from utils.data.architecture import Architecture, architecture_of, decoder_layers, final_norm
from utils.search.transforms import INPUT_ROWS, ROTATION, TransformError, from_registry


class ModelTransform(Protocol):
    """fit(model) -> params {tensor_name: tensor}; apply(model, params) folds them into the whole model, in place,
    before calibration (a config lists it first among its transforms)."""

    name: ClassVar[str]
    tensor_name: ClassVar[str]
    scope: ClassVar[str]  # "model"

    def fit(self, model: nn.Module) -> dict[str, torch.Tensor]: ...

    def apply(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None: ...

    def to_dict(self) -> dict: ...


Factors = tuple[torch.Tensor | None, torch.Tensor]  # (outer, inner): x -> x (outer kron inner), float64


def hadamard_rotation(width: int, block: int | None, what: str, device: torch.device | str = "cpu") -> Factors:
    """The full-width Hadamard of `width` (block None) or diag(H_block, ...), float64 factors on `device`."""
    try:
        if block is None:
            outer, inner = hadamard_factors(width, torch.float64)
        else:
            check_block_size(block, width)
            outer, inner = None, hadamard_matrix(block, torch.float64)
    except ValueError as error:
        raise TransformError(f"{what}: {error}") from None
    return (None if outer is None else outer.to(device)), inner.to(device)


@torch.no_grad()
def _rotate_rows(weight: torch.Tensor, signs: torch.Tensor, rotation: Factors, gain: torch.Tensor | None = None
                 ) -> None:
    """weight [rows, n] -> weight diag(gain) diag(s) H in place, float64 math, INPUT_ROWS rows at a time."""
    outer, inner = rotation
    column_scale = signs if gain is None else signs * gain
    for rows in weight.split(INPUT_ROWS):
        rows.copy_(kron_rotate(rows.to(torch.float64) * column_scale, inner, outer))


@dataclass(frozen=True)
class ResidualRotation:
    """QuaRot's rotation. seed: the signs s; hidden_block / down_proj_block: None for the full-width Hadamard, a
    power of two for a block-diagonal one; online_down_proj: the online Hadamard in front of down_proj."""

    seed: int = 0
    hidden_block: int | None = None
    down_proj_block: int | None = None
    online_down_proj: bool = True
    name: ClassVar[str] = "residual_rotation"
    tensor_name: ClassVar[str] = "signs"
    scope: ClassVar[str] = "model"

    def __post_init__(self) -> None:
        for field_name in ("hidden_block", "down_proj_block"):
            block = getattr(self, field_name)
            if block is not None and (not is_power_of_two(block) or block < 2):
                raise TransformError(f"ResidualRotation {field_name} must be None or a power of two >= 2, "
                                     f"got {block!r}")

    def _check(self, model: nn.Module) -> Architecture:
        """The model's Architecture; TransformError, before anything changes, where the rotation cannot apply."""
        arch = architecture_of(model)
        if arch.output_norms:
            raise TransformError(f"ResidualRotation does not support {arch.name}: its {', '.join(arch.output_norms)} "
                                 "scale block outputs per channel after normalising, which a residual rotation "
                                 "cannot pass")
        if model.get_input_embeddings() is None or model.get_output_embeddings() is None:
            raise TransformError(f"ResidualRotation needs a token embedding and an output head; "
                                 f"{type(model).__name__} lacks one")
        if any(getattr(m, "is_quantized", False) for m in model.modules()):
            raise TransformError("ResidualRotation must be applied before calibration: the model already holds "
                                 "quantized modules")
        placed = {n for _, names in arch.norm_linear_pairs for n in names} | set(arch.residual_writers)
        for index, block in enumerate(decoder_layers(model)):
            found = {n for n, m in block.named_modules() if getattr(m, "weight", None) is not None
                     and m.weight.ndim == 2}
            if found - placed:
                raise TransformError(f"ResidualRotation: block {index} has Linears the {arch.name} adapter does not "
                                     f"place: {', '.join(sorted(found - placed))}")
            product = block.get_submodule(arch.product_linear)
            if self.online_down_proj and getattr(product, ROTATION, None) is None:
                raise TransformError(f"ResidualRotation's online Hadamard needs QuantLinear modules; "
                                     f"{arch.product_linear} is a {type(product).__name__} (swap_modules first, or "
                                     "online_down_proj=False)")
            if self.online_down_proj and product.input_rotation.inner is not None:
                raise TransformError(f"ResidualRotation: {arch.product_linear} of block {index} already rotates its "
                                     "input")
        self._hidden_rotation(model.get_input_embeddings().weight.shape[1], "cpu")
        if self.online_down_proj:
            width = decoder_layers(model)[0].get_submodule(arch.product_linear).in_features
            hadamard_rotation(width, self.down_proj_block, "ResidualRotation down_proj_block")
        return arch

    def _hidden_rotation(self, hidden: int, device: torch.device | str) -> Factors:
        return hadamard_rotation(hidden, self.hidden_block, "ResidualRotation hidden_block", device)

    def fit(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{"signs": s [hidden] float32, +-1 from the seed}."""
        self._check(model)
        return {"signs": random_signs(model.get_input_embeddings().weight.shape[1], self.seed)}

    @torch.no_grad()
    def apply(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        """Fold Q = diag(s) H into the embedding, every block and the head (the equations above); unties a tied head."""
        arch = self._check(model)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        hidden = embedding.weight.shape[1]
        signs = params.get("signs")
        if set(params) != {"signs"} or signs.shape != (hidden,) or not bool((signs.abs() == 1).all()):
            shapes = {k: tuple(v.shape) for k, v in params.items()}
            raise TransformError(f"ResidualRotation params must be {{'signs': +-1 [{hidden}]}}, got {shapes}")
        untie_head(model)
        device = embedding.weight.device
        _rotate_rows(embedding.weight, signs.to(device, torch.float64), self._hidden_rotation(hidden, device))
        for block in decoder_layers(model):
            device = next(block.parameters()).device
            self._rotate_block(block, arch, signs.to(device, torch.float64), self._hidden_rotation(hidden, device))
        norm, device = final_norm(model), head.weight.device
        _rotate_rows(head.weight, signs.to(device, torch.float64), self._hidden_rotation(hidden, device),
                     arch.norm_gain(norm).to(device))
        arch.reset_norm(norm)

    def _rotate_block(self, block: nn.Module, arch: Architecture, signs: torch.Tensor, rotation: Factors) -> None:
        for norm_name, linear_names in arch.norm_linear_pairs:
            norm = block.get_submodule(norm_name)
            for linear_name in linear_names:
                _rotate_rows(block.get_submodule(linear_name).weight, signs, rotation, arch.norm_gain(norm))
            arch.reset_norm(norm)
        for writer_name in arch.residual_writers:
            writer = block.get_submodule(writer_name)
            weight = kron_rotate(writer.weight.T.to(torch.float64) * signs, rotation[1], rotation[0]).T  # Q^T W
            if self.online_down_proj and writer_name == arch.product_linear:
                outer, inner = self._online_hadamard(writer)
                weight = kron_rotate(weight, inner, outer)  # Q^T W K
            writer.weight.copy_(weight)
            if writer.bias is not None:
                _rotate_rows(writer.bias[None], signs, rotation)

    def _online_hadamard(self, linear: nn.Module) -> Factors:
        """Set x -> x K online (float32 factors; float64 for a float64 weight) and return K's float64 factors for
        the fold W -> W K (K: the Hadamard of the input width, or blocks of down_proj_block)."""
        outer, inner = hadamard_rotation(linear.in_features, self.down_proj_block, "ResidualRotation down_proj_block",
                                         linear.weight.device)
        dtype = rotation_dtype(linear.weight.dtype)
        linear.input_rotation.inner = inner.to(dtype)
        linear.input_rotation.outer = None if outer is None else outer.to(dtype)
        return outer, inner

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


MODEL_TRANSFORMS: dict[str, type] = {cls.name: cls for cls in (ResidualRotation,)}


def model_transform_from_dict(fields: dict) -> ModelTransform:
    """The model transform that `to_dict` described, e.g. {"name": "residual_rotation", "seed": 0, ...}."""
    return from_registry(MODEL_TRANSFORMS, fields, "model transform")
