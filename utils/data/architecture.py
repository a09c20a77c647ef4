"""Where things are in a decoder-only LM, as data: one `Architecture` per block layout.

A block's norms feed Linears; a transform that divides a norm's output by s [in] and multiplies the
columns of the Linears after it by s leaves the block's function unchanged. `norm_linear_pairs` says which
norm feeds which Linears, `norm_weight_offset` how a norm's weight enters its output:

    norm(x) = rms_normalize(x) * (offset + w)     offset 0 (Llama, Qwen2, Mistral), 1 (Gemma3)

so dividing the output by s is  w' = (offset + w) / s - offset  (`Architecture.scale_norm`), and a norm without a
per-channel scale (what commutes with a rotation of the residual stream) has w = 1 - offset (`reset_norm`).
The decoder blocks and the final norm are found through `LAYOUTS` (paths from the model), for any model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

LAYOUTS = (  # (decoder blocks, final norm) paths from the causal LM
    ("model.layers", "model.norm"),
    ("model.language_model.layers", "model.language_model.norm"),
    ("language_model.model.layers", "language_model.model.norm"),
    ("model.decoder.layers", "model.decoder.final_layer_norm"),
    ("transformer.h", "transformer.ln_f"),
)


class ArchitectureError(ValueError):
    """The model's layout is not one described here; the message is one line."""


@dataclass(frozen=True)
class Architecture:
    """One block layout. Module names are relative to the block.

    norm_linear_pairs: (norm, Linears that read the norm's output) for each norm in front of Linears.
    unnormed_linears: Linears with no norm in front (their inputs come from attention or the MLP's product).
    norm_weight_offset: c in norm(x) = rms_normalize(x) * (c + w).
    embedding_scale: how the token embedding is scaled after the table lookup ("" = not scaled), e.g.
        Gemma3's "sqrt(hidden_size)": a rotation of the residual stream must rotate the table, not the scale.
    residual_writers: Linears whose output is added to the residual stream.
    output_norms: norms between a writer and the residual add (Gemma3's post-attention / post-feedforward norms).
    product_linear: the Linear that reads the MLP's gated product (QuaRot's online Hadamard goes in front of it).
    attention: the attention module, which calls transformers' attention interface with Q, K, V after RoPE
        (quant_layers/attention.py quantizes there).
    """

    name: str
    block_classes: tuple[str, ...]
    norm_linear_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    unnormed_linears: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    norm_weight_offset: float = 0.0
    embedding_scale: str = ""
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    output_norms: tuple[str, ...] = ()
    product_linear: str = "mlp.down_proj"
    attention: str = "self_attn"

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """g = c + w [hidden], float64: norm(x) = rms_normalize(x) * g."""
        return norm.weight.detach().to(torch.float64) + self.norm_weight_offset

    @torch.no_grad()
    def reset_norm(self, norm: nn.Module) -> None:
        """Set the gain c + w to 1 in place (w = 1 - c): afterwards norm(x) = rms_normalize(x)."""
        norm.weight.fill_(1.0 - self.norm_weight_offset)

    @torch.no_grad()
    def scale_norm(self, norm: nn.Module, scale: torch.Tensor) -> None:
        """Fold a division into norm in place: afterwards norm(x) equals the old norm(x) / scale for every x.

        scale [hidden] (any float dtype); w' = (c + w) / scale - c, computed in float32, stored in w's dtype.
        """
        weight, offset = norm.weight, self.norm_weight_offset
        scale = scale.to(device=weight.device, dtype=torch.float32)
        weight.copy_(((weight.float() + offset) / scale - offset).to(weight.dtype))


_ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj")

LLAMA = Architecture(
    name="llama",
    block_classes=("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"),
    norm_linear_pairs=(("input_layernorm", _ATTENTION_INPUTS), ("post_attention_layernorm", _MLP_INPUTS)),
)
GEMMA3 = Architecture(
    name="gemma3",
    block_classes=("Gemma3DecoderLayer",),
    # post_attention_layernorm and post_feedforward_layernorm normalise outputs, not Linear inputs
    norm_linear_pairs=(("input_layernorm", _ATTENTION_INPUTS), ("pre_feedforward_layernorm", _MLP_INPUTS)),
    norm_weight_offset=1.0,
    embedding_scale="sqrt(hidden_size)",  # Gemma3TextScaledWordEmbedding: table[ids] * hidden_size ** 0.5
    output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
)
ARCHITECTURES = (LLAMA, GEMMA3)
_BY_BLOCK_CLASS = {cls: arch for arch in ARCHITECTURES for cls in arch.block_classes}


def _resolve(root: nn.Module, path: str) -> object:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _layout(model: nn.Module) -> tuple[nn.ModuleList, str]:
    for layers_path, norm_path in LAYOUTS:
        layers = _resolve(model, layers_path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers, norm_path
    raise ArchitectureError(f"cannot find the decoder layers of {type(model).__name__}: expected model.model.layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` and the other `LAYOUTS`)."""
    return _layout(model)[0]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder block and the output head (``model.model.norm`` and the other `LAYOUTS`)."""
    _, norm_path = _layout(model)
    norm = _resolve(model, norm_path)
    if not isinstance(norm, nn.Module):
        raise ArchitectureError(f"cannot find the final norm ({norm_path}) of {type(model).__name__}")
    return norm


def architecture_of(model_or_block: nn.Module) -> Architecture:
    """The Architecture of a decoder block, or of a model's first decoder block."""
    own_class = type(model_or_block).__name__
    if own_class in _BY_BLOCK_CLASS:
        return _BY_BLOCK_CLASS[own_class]
    try:
        block_class = type(decoder_layers(model_or_block)[0]).__name__
    except ArchitectureError:
        block_class = None
    if block_class in _BY_BLOCK_CLASS:
        return _BY_BLOCK_CLASS[block_class]
    found = f"{own_class} (blocks {block_class})" if block_class else own_class
    raise ArchitectureError(f"no architecture adapter for {found}; supported blocks: {', '.join(_BY_BLOCK_CLASS)}")


def head_architecture(model: nn.Module) -> Architecture:
    """The final norm and the output head seen as one block rooted at the model: module names are full names, the
    model's class is the block class and the final norm feeds the head alone. A per-block transform (SmoothQuant,
    BlockHadamard) given the model as its block and this view acts between the last decoder block and the head."""
    arch, norm, head = architecture_of(model), final_norm(model), model.get_output_embeddings()
    names = {module: name for name, module in model.named_modules() if name}
    if head not in names:
        raise ArchitectureError(f"cannot find the output head of {type(model).__name__}")
    return dataclasses.replace(arch, name=f"{arch.name} head", block_classes=(type(model).__name__,),
                               norm_linear_pairs=((names[norm], (names[head],)),), unnormed_linears=(),
                               residual_writers=(), output_norms=(), product_linear="", attention="")


def norm_linear_pairs(block: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """[(norm, Linears reading its output)] of a decoder block, names relative to the block."""
    return list(architecture_of(block).norm_linear_pairs)
