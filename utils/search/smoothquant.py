"""SmoothQuant (Xiao et al., 2023) as the paper's comparison row: migrate activation outliers into weights.

For a norm followed by Linears L_1..L_k that read its output X [N, in]:

    s_j = max_n |X_nj|^alpha / max_{i, o} |W_i[o, j]|^(1 - alpha)      (clamped to >= 1e-5)

then norm.weight /= s and every W_i[:, j] *= s_j: the product X W^T is unchanged and X / s has flatter
channels. As in SmoothQuant's Llama recipe, the pairs are input_layernorm -> q/k/v_proj and
post_attention_layernorm -> gate/up_proj (o_proj and down_proj have no norm in front). The scales are
saved in the parameter file (kind "smooth", under the norm's name) so --only_eval applies them again.
"""

from __future__ import annotations

import torch
from torch import nn

from quant_layers.quantize import abs_max

PAIRS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
SUPPORTED_BLOCKS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")


class SmoothingError(ValueError):
    """The model's blocks are not of a layout SmoothQuant's folding is defined for here."""


def block_pairs(block: nn.Module) -> dict[str, tuple[str, ...]]:
    """{norm name: names of the Linears reading its output}, relative to the block."""
    if type(block).__name__ not in SUPPORTED_BLOCKS:
        raise SmoothingError(f"SmoothQuant is defined here for {', '.join(SUPPORTED_BLOCKS)} "
                             f"(a norm in front of q/k/v and gate/up), not {type(block).__name__}")
    return PAIRS


def migration_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] (float32) from the input channels' absolute maxima [in] and the Linears' weights [out_i, in]."""
    w_absmax = torch.stack([abs_max(w.detach(), dim=0).float() for w in weights]).amax(dim=0)
    scales = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


@torch.no_grad()
def fold(norm: nn.Module, linears: list[nn.Module], scales: torch.Tensor) -> None:
    """norm.weight /= s; each Linear's weight columns *= s (in place, in the model's dtype)."""
    scales = scales.to(norm.weight.device)
    norm.weight.copy_((norm.weight.float() / scales).to(norm.weight.dtype))
    for linear in linears:
        linear.weight.copy_((linear.weight.float() * scales.to(linear.weight.device)).to(linear.weight.dtype))


def apply_saved(model: nn.Module, norm_name: str, scales: torch.Tensor) -> None:
    """Fold saved scales into the norm called norm_name and the Linears that read it."""
    prefix, _, norm_key = norm_name.rpartition(".")
    block = model.get_submodule(prefix)
    names = block_pairs(block).get(norm_key)
    if names is None:
        raise SmoothingError(f"{norm_name} is not a norm that SmoothQuant folds into (expected one of {list(PAIRS)})")
    fold(block.get_submodule(norm_key), [block.get_submodule(n) for n in names], scales)
