"""Simulated-quantization modules and the swap that puts them into a Hugging Face model.

The modules hold parameters and call `quantize`; they contain no search logic. Until `set_quant_params`
is called they compute exactly what the module they replaced computed.

QuantLinear, with activation format F_a, per-tensor activation clipping range m_a, per-input-channel
integer shifts k (LLM-FP4's pre-shifted exponent bias, Eq. 8) and per-output-channel weight range m_w:

    y = Q_a(x * 2^k; m_a) @ W_fold^T + bias,    W_fold[o, c] = Q_w(W[o, c]; m_w[o]) * 2^-k[c]

which equals the explicit per-channel quantization Q_a(x; m_a * 2^-k) @ Q_w(W)^T, because
Q(x; m * 2^-k) = 2^-k * Q(2^k * x; m) for integer k. The weight is quantized once, when the
parameters are set, and stored in the model dtype: evaluation never re-quantizes it. Q_w rounds to nearest, or
takes the rounding a search stored as codes (QuantParams.weight_codes, e.g. GPTQ's) under the same ranges.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quant_layers.codes import decode_frozen
from quant_layers.formats import QuantFormat
from quant_layers.hadamard import kron_rotate
from quant_layers.quantize import activation_scales, quantize, quantize_activation


@dataclass
class QuantParams:
    """Quantization parameters of one module: the search's state and what a parameter file stores.

    weight_format / weight_max_value [rows]: per-row weight ranges (None: weight not quantized);
    act_format / act_max_value []: the per-tensor input range (None: input not quantized; always None for an
    embedding); act_channel_shift [in] integers >= 0: FPQ's per-channel exponent shifts, or None;
    mse / mse_minmax: output MSE of these parameters and of MinMax on the calibration set (embedding: the table's);
    kind: "linear" or "embedding";
    weight_block_scale [rows, in / block size]: explicit block scales of a block-scaled weight format (a search's
    choice), encoded as `quantize`'s block_scale: the integer exponent per block for power-of-two scale formats
    (MX), else the block range top * code * t (float32, NVFP4); None: each block's scale from its own maximum.
    weight_codes [rows, in]: the quantized weight as codes (quant_layers/codes.py layout: uint8 up to 8 bits) of its
    standard-grid values under the ranges and block scales above (a rounding other than to nearest, e.g. GPTQ's;
    block formats need weight_block_scale); None: round to nearest.
    act_block_clip []: float32 multiplier of the dynamic block maxima of a block-scaled activation format (scales
    from clip * amax, computed per block at run time; `quantize`'s clip), a search's choice; None: 1.
    """

    weight_format: QuantFormat | None
    weight_max_value: torch.Tensor | None
    act_format: QuantFormat | None = None
    act_max_value: torch.Tensor | None = None
    act_channel_shift: torch.Tensor | None = None
    mse: float = float("nan")
    mse_minmax: float = float("nan")
    kind: str = "linear"
    weight_block_scale: torch.Tensor | None = None
    weight_codes: torch.Tensor | None = None
    act_block_clip: torch.Tensor | None = None


def quantized_weight(weight: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Q_w(W) [rows, in] in weight's dtype: the values of params.weight_codes under its scales when set
    (`decode_frozen`), else `quantize` (round to nearest)."""
    max_value = params.weight_max_value.to(weight.device).view(-1, 1)
    if params.weight_codes is None:
        return quantize(weight, params.weight_format, max_value, params.weight_block_scale)
    if params.weight_codes.shape != weight.shape:
        raise ValueError(f"weight codes {tuple(params.weight_codes.shape)} do not fit the weight {tuple(weight.shape)}")
    block_scale = params.weight_block_scale
    return decode_frozen(params.weight_codes.to(weight.device), params.weight_format, max_value,
                         None if block_scale is None else block_scale.to(weight.device), dtype=weight.dtype)


class InputRotation(nn.Module):
    """x [..., n] -> x (outer kron inner) before a QuantLinear quantizes its input (a transform folded the inverse
    into the weight); identity while `inner` is None. inner [p, p], outer [n/p, n/p] or None (blocks of p), float32
    (float64 in a float64 model): the product is computed in their dtype and returned in x's."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inner", None)
        self.register_buffer("outer", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inner is None else kron_rotate(x, self.inner, self.outer)


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear with static weight and input-activation fake quantization; `input_rotation` (off
    unless a rotation transform sets it) rotates the input first. `executor` (None: the simulated forward, the
    reference) is a module that computes the layer from its quantized state in another way, called as
    executor(self, x) on the rotated input (quant_layers/fp8_linear.py's FP8Linear; utils/execution.py sets it)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_format: QuantFormat | None = None
        self.act_format: QuantFormat | None = None
        self.register_buffer("act_max_value", None)
        self.register_buffer("act_channel_scale", None)  # 2^k [in], float32
        self.register_buffer("act_grid_scale", None)  # s = grid_max / act_max_value, [1] float32
        self.register_buffer("act_grid_inverse", None)  # act_max_value / grid_max
        self.register_buffer("act_block_clip", None)  # [] float32, block-scaled act formats (None: 1)
        self.input_rotation = InputRotation()
        self.executor: nn.Module | None = None  # executor(self, x) computes forward instead (utils/execution.py)

    @property
    def is_quantized(self) -> bool:
        return self.weight_format is not None or self.act_format is not None

    def set_quant_params(self, params: QuantParams) -> None:
        """Quantize the weight once (per-row ranges [out]) and set the activation quantizer (per-tensor range [],
        optional channel shifts [in], a block format's clip []). May be called once: the full-precision weight is
        replaced by its quantized values."""
        if self.is_quantized:
            raise RuntimeError("quantization parameters are already set on this module")
        if params.act_block_clip is not None and (params.act_format is None or params.act_format.block is None):
            raise ValueError("act_block_clip needs a block-scaled activation format")
        weight = self.weight.detach()
        if params.weight_format is not None:
            weight = quantized_weight(weight, params)
        if params.act_channel_shift is not None:
            shift = params.act_channel_shift.to(device=weight.device, dtype=torch.float32)
            weight = (weight.float() * torch.exp2(-shift)).to(weight.dtype)
        self.set_quantized(weight, params)

    def set_quantized(self, weight: torch.Tensor, params: QuantParams) -> None:
        """Take W_fold [out, in], the weight as set_quant_params computes it (quantized, shifts folded in; e.g. a
        packed export's decoded codes), and set the formats and activation quantizer of params (its weight range
        and block scales are not read). May be called once."""
        if self.is_quantized:
            raise RuntimeError("quantization parameters are already set on this module")
        if params.act_channel_shift is not None:
            self.act_channel_scale = torch.exp2(params.act_channel_shift.to(device=weight.device, dtype=torch.float32))
        # A new Parameter, never an in-place write: a tied embedding must keep its own values.
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_format = params.weight_format
        self.act_format = params.act_format
        if params.act_format is not None:
            self.act_max_value = params.act_max_value.to(device=weight.device, dtype=torch.float32).reshape(())
            self.act_grid_scale, self.act_grid_inverse = activation_scales(params.act_format, self.act_max_value)
            if params.act_block_clip is not None:
                self.act_block_clip = params.act_block_clip.to(device=weight.device, dtype=torch.float32).reshape(())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q_a(x * 2^k; m_a): what the folded weight multiplies."""
        if self.act_format is None:
            return x
        return quantize_activation(x, self.act_format, self.act_max_value, self.act_channel_scale,
                                   (self.act_grid_scale, self.act_grid_inverse), block_clip=self.act_block_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_rotation(x)
        if self.executor is not None:  # the same quantized layer computed another way, e.g. on FP8 codes
            return self.executor(self, x)
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={self.weight_format}, act={self.act_format}, "
            f"act_shift={self.act_channel_scale is not None}"
        )


class QuantEmbedding(nn.Module):
    """Wraps an nn.Embedding (or a subclass such as Gemma's scaled embedding) whose table is
    fake-quantized once, one clipping range per token row."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.weight_format: QuantFormat | None = None

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    @property
    def is_quantized(self) -> bool:
        return self.weight_format is not None

    def set_quant_params(self, params: QuantParams) -> None:
        """Quantize the table once with per-row ranges [num_embeddings] (an embedding has no input quantizer)."""
        if params.act_format is not None or params.weight_format is None:
            raise ValueError("an embedding takes a weight format and range, and no activation quantizer")
        self.set_quantized(quantized_weight(self.weight.detach(), params), params)

    def set_quantized(self, weight: torch.Tensor, params: QuantParams) -> None:
        """Take the already quantized table [num_embeddings, dim] (e.g. a packed export's decoded codes) and the
        weight format of params. May be called once."""
        if self.is_quantized:
            raise RuntimeError("quantization parameters are already set on this module")
        self.embedding.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_format = params.weight_format

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def extra_repr(self) -> str:
        return f"weight={self.weight_format}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put module at `name`; a device hook of the module it replaces (accelerate's device_map placement,
    which moves inputs to the module's GPU) is carried over to it."""
    old = model.get_submodule(name)
    hook = getattr(old, "_hf_hook", None)
    if hook is not None and not isinstance(module, QuantEmbedding):  # QuantEmbedding calls the hooked module
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(module, hook)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def swap_modules(model: nn.Module, linear: bool = True, lm_head: bool = True, embedding: bool = True) -> dict[str, nn.Module]:
    """Replace nn.Linear and the token embedding of a Hugging Face causal LM in place.

    linear: every nn.Linear except the output head; lm_head: the output head; embedding: the input
    token embedding. A tied head/embedding becomes two modules with their own weights, and the config
    is untied so that `tie_weights()` (called by lm-eval) does not join them again.
    Returns {qualified name: new module}.
    """
    swapped = _replacements(model, linear, lm_head, embedding)
    for name, module in swapped.items():
        _set_submodule(model, name, module)
    if swapped:
        _untie(model)
        # A module with accelerate hooks (use_accelerate=True) is in a reference cycle: only the cyclic collector
        # frees the replaced ones, and until it does each holds the full-precision weight that set_quant_params
        # replaces (twice the weights in memory). Free them now.
        gc.collect()
    return swapped


def _replacements(model: nn.Module, linear: bool, lm_head: bool, embedding: bool) -> dict[str, nn.Module]:
    """{qualified name: the quantized module that replaces it} (holds no reference to the replaced ones)."""
    head = model.get_output_embeddings()
    token_embedding = model.get_input_embeddings()
    replacements: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if module is head and isinstance(module, nn.Linear):
            if lm_head:
                replacements[name] = QuantLinear(module)
        elif type(module) is nn.Linear and linear:
            replacements[name] = QuantLinear(module)
        elif module is token_embedding and isinstance(module, nn.Embedding) and embedding:
            replacements[name] = QuantEmbedding(module)
    return replacements


def untie_head(model: nn.Module) -> None:
    """Give the output head its own copy of the weight if it shares the token embedding's, and mark the config untied:
    for a change to the head alone (a rotation or scale of its columns) that must not reach the embedding."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or head is None:
        return
    if head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        _untie(model)


def _untie(model: nn.Module) -> None:
    """Mark the config untied (top level and text sub-config) so no later call re-ties the head."""
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
