"""Function-preserving transforms of a decoder block, as strategies: SmoothQuant and BlockHadamard.

A Transform fits parameters on one block and the captured inputs of its Linears, folds them into the
block (`apply`) and changes the captured inputs the same way (`transform_inputs`), so the Linears can be
calibrated on what the transformed block computes. Its parameters, {module name relative to the block:
tensor}, are what the parameter file stores: `apply` with them reproduces the fitted block exactly.

SmoothQuant (Xiao et al., 2023): for a norm followed by Linears L_1..L_k that read its output X [N, in],

    s_j = max_n |X_nj|^alpha / max_{i, o} |W_i[o, j]|^(1 - alpha)      (both maxima and s clamped to >= 1e-5)

then norm(x) -> norm(x) / s and every W_i[:, j] *= s_j: X W^T is unchanged and X / s has flatter channels.
Which norms feed which Linears, and how a norm absorbs 1 / s, come from the block's Architecture. With
`search_alphas`, each norm's strength is fitted instead (the paper's idea, a choice scored on the layer-output
error): of s = 1 (no migration) and s(alpha) for each alpha given, the one with the lowest sum over L_1..L_k of
the round-to-nearest output error loss(X / s, W_i s) (`utils.search.steps.round_to_nearest_loss`: in the
calibration's formats, so the choice sees NVFP4's blocks).

BlockHadamard: for a Linear with input x [N, in], R = diag(H_size, ..., H_size) [in, in] (orthonormal Hadamard
blocks, quant_layers/hadamard.py), x -> x R online (QuantLinear.input_rotation) and W -> W R offline: the product
(x R)(W R)^T = x W^T is unchanged and the input quantizer sees rotated blocks. SmoothQuant must come first: a
per-channel scale of a norm's output cannot pass an online rotation.

With `at_head`, either acts between the final norm and the output head instead of inside the decoder blocks (scope
"head"): fit, apply and transform_inputs take the model as the block and `head_architecture(model)` as the
Architecture (the final norm absorbs SmoothQuant's 1 / s; the head rotates its input online), once, when the head is
calibrated. A tied head is untied first: the embedding keeps its values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from quant_layers.hadamard import check_block_size, hadamard_matrix, is_power_of_two, kron_rotate, rotation_dtype
from quant_layers.quantize import abs_max
from quant_layers.modules import untie_head
from utils.data.architecture import Architecture, architecture_of, decoder_layers, head_architecture

INPUT_ROWS = 4096  # captured rows rescaled at once (bounds the float32 temporary)


class TransformError(ValueError):
    """A transform cannot be built or applied here (bad settings, unsupported block, bad parameters); one line."""


LinearLoss = Callable[[torch.Tensor, torch.Tensor], float]  # (x [tokens, in], W [out, in]) -> a Linear's output error


class Transform(Protocol):
    """fit -> params {name relative to the block: tensor}; apply folds them into the block; transform_inputs
    changes captured inputs {Linear name relative to the block: [tokens, in]} in place to match. fit's `loss`, where
    the calibration has one, scores a Linear's quantized output (a transform that chooses between candidates)."""

    name: ClassVar[str]
    tensor_name: ClassVar[str]  # what a parameter file calls its tensor, "<module>.<tensor_name>"
    scope: str  # "block": on each block's captured inputs; "head": on the head's (at_head); "model": residual_rotation

    def fit(self, block: nn.Module, inputs: dict[str, torch.Tensor], arch: Architecture,
            loss: LinearLoss | None = None) -> dict[str, torch.Tensor]: ...

    def apply(self, block: nn.Module, params: dict[str, torch.Tensor], arch: Architecture) -> None: ...

    def transform_inputs(self, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                         arch: Architecture) -> None: ...

    def to_dict(self) -> dict: ...


def migration_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] (float32) from the input channels' absolute maxima [in] and the Linears' weights [out_i, in]."""
    w_absmax = torch.stack([abs_max(w.detach(), dim=0).float() for w in weights]).amax(dim=0)
    scales = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


def divide_channels(x: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = X / s in X's dtype (float32 division), INPUT_ROWS rows at a time (no full float32 copy); x, out
    [tokens, in] (out may be x: in place), scales s [in]."""
    divisor = scales.to(x.device, torch.float32)
    for rows, target in zip(x.split(INPUT_ROWS), out.split(INPUT_ROWS)):
        target.copy_((rows.float() / divisor).to(x.dtype))
    return out


def scale_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W s: W [out, in] times s [in] per input channel, in float32, returned in W's dtype."""
    return (weight.detach().float() * scales.to(weight.device, torch.float32)).to(weight.dtype)


@torch.no_grad()
def migrated_loss(x: torch.Tensor, weights: list[torch.Tensor], scales: torch.Tensor, loss: LinearLoss) -> float:
    """sum_i loss(X / s, W_i s): the Linears' output error after the migration s [in], rounded as
    `SmoothQuant.transform_inputs` and `apply` round them."""
    migrated = divide_channels(x, scales, torch.empty_like(x))
    return sum(loss(migrated, scale_weight(w, scales)) for w in weights)


def _check_block(block: nn.Module, arch: Architecture) -> None:
    """TransformError unless block is of a class the adapter describes."""
    if type(block).__name__ not in arch.block_classes:
        raise TransformError(f"the {arch.name} adapter describes {', '.join(arch.block_classes)} blocks, "
                             f"not {type(block).__name__}")


def _distinct(inputs: dict[str, torch.Tensor], names: tuple[str, ...]) -> list[torch.Tensor]:
    """The captured tensors of `names`, each shared tensor once (q/k/v read one buffer)."""
    return list({id(inputs[n]): inputs[n] for n in names if n in inputs}.values())


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant's migration with strength alpha in (0, 1), or with each norm's strength fitted among
    `search_alphas` (and no migration) on the round-to-nearest output error; params: {norm name: s [in] float32}.
    at_head: between the final norm and the output head instead of in the blocks (the module docstring)."""

    alpha: float = 0.5
    search_alphas: tuple[float, ...] = ()
    at_head: bool = False
    name: ClassVar[str] = "smoothquant"
    tensor_name: ClassVar[str] = "smooth_scale"

    @property
    def scope(self) -> str:
        return "head" if self.at_head else "block"

    def __post_init__(self) -> None:
        object.__setattr__(self, "search_alphas", tuple(self.search_alphas))  # a parameter file's list
        for alpha in (self.alpha, *self.search_alphas):
            if not 0.0 < alpha < 1.0:
                raise TransformError(f"SmoothQuant alpha must be in (0, 1), got {alpha}")

    def _pairs(self, block: nn.Module, arch: Architecture) -> dict[str, tuple[str, ...]]:
        _check_block(block, arch)
        if not arch.norm_linear_pairs:
            raise TransformError(f"SmoothQuant needs norms in front of Linears; {arch.name} blocks have none")
        for _, linear_names in arch.norm_linear_pairs:
            rotated = [n for n in linear_names if _input_rotation(block.get_submodule(n)) is not None]
            if rotated:
                raise TransformError(f"SmoothQuant must come before BlockHadamard: {rotated[0]} already rotates its "
                                     "input, and a norm's per-channel scale cannot pass that rotation")
        return dict(arch.norm_linear_pairs)

    @torch.no_grad()
    def fit(self, block: nn.Module, inputs: dict[str, torch.Tensor], arch: Architecture,
            loss: LinearLoss | None = None) -> dict[str, torch.Tensor]:
        """{norm name: s [in] float32} from the captured inputs [tokens, in] of the Linears after each norm (and,
        with search_alphas, `loss`)."""
        if self.search_alphas and loss is None:
            raise TransformError("SmoothQuant's fitted strength (search_alphas) needs the calibration's output loss")
        scales = {}
        for norm_name, linear_names in self._pairs(block, arch).items():
            captured = _distinct(inputs, linear_names)
            if not captured:
                raise TransformError(f"SmoothQuant needs the captured input of one of {', '.join(linear_names)}")
            weights = [block.get_submodule(n).weight for n in linear_names]
            x_absmax = abs_max(captured[0], dim=0)
            if not self.search_alphas:
                scales[norm_name] = migration_scales(x_absmax, weights, self.alpha)
                continue
            candidates = [torch.ones_like(x_absmax, dtype=torch.float32)]
            candidates += [migration_scales(x_absmax, weights, alpha) for alpha in self.search_alphas]
            scales[norm_name] = min(candidates, key=lambda s: migrated_loss(captured[0], weights, s, loss))
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
                weight.copy_(scale_weight(weight, scales))

    @torch.no_grad()
    def transform_inputs(self, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                         arch: Architecture) -> None:
        """X -> X / s in place for the Linears after each norm, INPUT_ROWS rows at a time (no full float32 copy)."""
        pairs = dict(arch.norm_linear_pairs)
        for norm_name, scales in params.items():
            for x in _distinct(inputs, pairs.get(norm_name, ())):
                divide_channels(x, scales, out=x)

    def to_dict(self) -> dict:
        fields = {"name": self.name, **asdict(self)}
        if not self.search_alphas:  # what parameter files written before the search hold
            del fields["search_alphas"]
        if not self.at_head:  # the same for transforms inside the blocks
            del fields["at_head"]
        return fields


ROTATION = "input_rotation"  # QuantLinear's InputRotation child: BlockHadamard's params are keyed by it


def _input_rotation(linear: nn.Module) -> torch.Tensor | None:
    """The inner matrix of a QuantLinear's input rotation (None: not rotated or not a QuantLinear)."""
    rotation = getattr(linear, ROTATION, None)
    return None if rotation is None else rotation.inner


def _linear_of(key: str) -> str:
    if not key.endswith("." + ROTATION):
        raise TransformError(f"BlockHadamard parameters are keyed '<linear>.{ROTATION}', got {key!r}")
    return key.removesuffix("." + ROTATION)


@dataclass(frozen=True)
class BlockHadamard:
    """Block Hadamard of Linear inputs, size 2^k (16, 32, 128, ...). linears: names relative to the block (None:
    every Linear the Architecture names); Linears that read one tensor (q/k/v, gate/up) go together.
    params: {"<linear>.input_rotation": M [size, size] float32}, M the +-1 Hadamard matrix (M M^T = size I) and
    H = M / sqrt(size): exact in float32 files, so replay needs no settings and float64 models stay float64-exact.
    at_head: the output head's input instead of the blocks' Linears (the module docstring)."""

    size: int = 32
    linears: tuple[str, ...] | None = None
    at_head: bool = False
    name: ClassVar[str] = "block_hadamard"
    tensor_name: ClassVar[str] = "hadamard"

    @property
    def scope(self) -> str:
        return "head" if self.at_head else "block"

    def __post_init__(self) -> None:
        if not is_power_of_two(self.size) or self.size < 2:
            raise TransformError(f"BlockHadamard size must be a power of two >= 2, got {self.size!r}")
        if self.linears is not None:
            object.__setattr__(self, "linears", tuple(self.linears))
            if not self.linears:
                raise TransformError("BlockHadamard linears: name at least one Linear, or None for every Linear")

    def _targets(self, block: nn.Module, arch: Architecture) -> tuple[str, ...]:
        _check_block(block, arch)
        every = tuple(n for _, names in arch.norm_linear_pairs for n in names) + arch.unnormed_linears
        unknown = [n for n in self.linears or () if n not in every]
        if unknown:
            raise TransformError(f"BlockHadamard: {unknown[0]!r} is not a Linear of {arch.name} blocks "
                                 f"({', '.join(every)})")
        return self.linears or every

    @torch.no_grad()
    def fit(self, block: nn.Module, inputs: dict[str, torch.Tensor], arch: Architecture,
            loss: LinearLoss | None = None) -> dict[str, torch.Tensor]:
        """{"<linear>.input_rotation": M} for each target Linear; checks the size divides its input width and that
        Linears sharing a captured input are all targets."""
        targets = self._targets(block, arch)
        for name in targets:
            self._check_linear(block, name, self.size)
            partners = [n for n, x in inputs.items() if name in inputs and x is inputs[name] and n not in targets]
            if partners:
                raise TransformError(f"BlockHadamard: {name} and {partners[0]} read one input; rotate both or neither")
        signs = hadamard_matrix(self.size, torch.float32, normalized=False)
        return {f"{name}.{ROTATION}": signs.clone() for name in targets}

    @staticmethod
    def _check_linear(block: nn.Module, name: str, size: int) -> nn.Module:
        try:
            linear = block.get_submodule(name)
        except AttributeError:
            raise TransformError(f"BlockHadamard: the block has no module {name!r}") from None
        if not hasattr(linear, ROTATION):
            raise TransformError(f"BlockHadamard rotates QuantLinear inputs online; {name} is a "
                                 f"{type(linear).__name__} (swap_modules first)")
        if _input_rotation(linear) is not None:
            raise TransformError(f"BlockHadamard: {name} already rotates its input")
        try:
            check_block_size(size, linear.in_features)
        except ValueError as error:
            raise TransformError(f"BlockHadamard on {name}: {error}") from None
        return linear

    @staticmethod
    def _rotation(key: str, signs: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """H = M / sqrt(size) [size, size] in dtype; TransformError unless M is a +-1 matrix with M M^T = size I."""
        size = signs.shape[0] if signs.ndim == 2 else 0
        exact = signs.to(torch.float64)
        if signs.shape != (size, size) or not bool((exact.abs() == 1).all()) or \
                not torch.equal(exact @ exact.T, size * torch.eye(size, dtype=torch.float64)):
            raise TransformError(f"BlockHadamard: {key} holds a {tuple(signs.shape)} tensor, not a +-1 Hadamard matrix")
        return (exact / math.sqrt(size)).to(device, dtype)

    @torch.no_grad()
    def apply(self, block: nn.Module, params: dict[str, torch.Tensor], arch: Architecture) -> None:
        """W -> W diag(H, ..., H) (float64 math, the weight's dtype) and the online rotation x -> x diag(H, ...)
        (QuantLinear.input_rotation, float32; float64 for a float64 weight)."""
        for key, signs in params.items():
            linear = self._check_linear(block, _linear_of(key), signs.shape[0])
            weight = linear.weight
            weight.copy_(kron_rotate(weight, self._rotation(key, signs, torch.float64, weight.device)))
            linear.input_rotation.inner = self._rotation(key, signs, rotation_dtype(weight.dtype), weight.device)

    @torch.no_grad()
    def transform_inputs(self, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                         arch: Architecture) -> None:
        """X -> X diag(H, ..., H) in place (computed as online), INPUT_ROWS rows at a time; a tensor shared by
        several Linears (fit rotates them all with one H) once."""
        rotations = {id(x): (x, key, signs) for key, signs in params.items()
                     if (x := inputs.get(_linear_of(key))) is not None}
        for x, key, signs in rotations.values():
            rotation = self._rotation(key, signs, rotation_dtype(x.dtype), x.device)
            for rows in x.split(INPUT_ROWS):
                rows.copy_(kron_rotate(rows, rotation))

    def to_dict(self) -> dict:
        fields = {"name": self.name, **asdict(self)}
        if not self.at_head:  # what parameter files written before head transforms hold
            del fields["at_head"]
        return fields


TRANSFORMS: dict[str, type] = {cls.name: cls for cls in (SmoothQuant, BlockHadamard)}


def from_registry(registry: dict[str, type], fields: dict, what: str = "transform"):
    """registry[fields["name"]](**the other fields); TransformError (one line) for an unknown name or setting."""
    settings = dict(fields)
    name = settings.pop("name", None)
    if name not in registry:
        raise TransformError(f"unknown {what} {name!r}; known: {', '.join(registry)}")
    try:
        return registry[name](**settings)
    except TypeError as error:
        raise TransformError(f"bad settings for {what} {name!r}: {error}") from None


def transform_from_dict(fields: dict) -> Transform:
    """The transform that `to_dict` described, e.g. {"name": "smoothquant", "alpha": 0.5}."""
    return from_registry(TRANSFORMS, fields)


def apply_saved(model: nn.Module, transform: Transform, params: dict[str, torch.Tensor]) -> None:
    """Fold saved parameters keyed by full module names ("model.layers.0.input_layernorm", or "model.norm" at the
    head) into their blocks, or between the final norm and the head."""
    if transform.scope == "head":
        untie_head(model)
        transform.apply(model, params, head_architecture(model))
        return
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
