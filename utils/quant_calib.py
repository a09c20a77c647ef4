"""Calibration: the exponent-bias / max-value search of LLM-FP4, block by block.

For each decoder block, one pass over the calibration set captures the inputs of all its Linears
(forward hooks; Linears that read the same tensor, like q/k/v, share one copy), each Linear is
searched (utils/search.py) and its parameters are set, which quantizes its weight once. Only one
block's inputs live in memory. The block's outputs feed the next block: the full-precision outputs
of the capture pass (the paper: every layer sees full-precision inputs), or with `sequential` the
outputs of the block already quantized. The output head is calibrated last on the final norm's
output; the token embedding by a weight-only search.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from configs import QBits, QuantConfig
from quant_layers.modules import QuantEmbedding, QuantLinear
from utils.models import decoder_layers
from utils.params import LayerParams
from utils.search import (TINY, Budget, LinearProblem, SearchSpace, minmax_state, minmax_weight_max, search_linear,
                          search_table)


class CalibrationError(RuntimeError):
    """Calibration cannot go on (non-finite activations, unsupported model structure)."""


@dataclass(frozen=True)
class CalibSettings:
    """What to search. space None = MinMax (no search); rounds as --search_round."""

    config: QuantConfig
    qbits: QBits
    space: SearchSpace | None
    rounds: int
    sequential: bool = False
    budget_bytes: int | None = None

    def budget(self, device: torch.device) -> Budget:
        if self.budget_bytes is not None:
            return Budget(self.budget_bytes)
        return Budget(2 << 30 if device.type == "cuda" else 256 << 20)


class _Stop(Exception):
    pass


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _move(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


def _first_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor
                        ) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering block 0 for every sequence [S, T, H], and each block's keyword arguments
    (masks, rotary embeddings: they differ per block in e.g. Gemma3), captured from sequence 0."""
    block_kwargs: list[dict] = [{} for _ in blocks]
    inputs: list[torch.Tensor] = []

    def keep_kwargs(index):
        def hook(_module, _args, kwargs):
            block_kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return hook

    def stop(_module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    device = _device_of(model.get_input_embeddings())
    handles = [b.register_forward_pre_hook(keep_kwargs(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=calib_ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in calib_ids.split(1):
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(inputs), block_kwargs


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Block outputs [S, T, H], one sequence at a time."""
    device = _device_of(block)
    kwargs = {k: _move(v, device) for k, v in kwargs.items()}
    outputs = []
    for h in hidden.split(1):
        out = block(h.to(device), **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outputs)


def _capture(block: nn.Module, hidden: torch.Tensor, kwargs: dict, linears: dict[str, QuantLinear]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the block once; returns its outputs and each Linear's inputs [S*T, in] (float32, shared
    between Linears that read the same tensor)."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    first_ptr: dict[str, int] = {}

    def hook(name):
        def keep(_module, args):
            x = args[0]
            first_ptr.setdefault(name, x.data_ptr())
            captured[name].append(x.detach().reshape(-1, x.shape[-1]))
        return keep

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            outputs = _run_block(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    shared: dict[int, torch.Tensor] = {}
    inputs = {}
    for name, chunks in captured.items():
        ptr = first_ptr[name]
        if ptr not in shared:
            shared[ptr] = torch.cat(chunks).float()
        inputs[name] = shared[ptr]
    return outputs, inputs


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "Inf"
        raise CalibrationError(
            f"{bad} in the calibration activations at {name}: the model overflows on this input "
            "(try --dtype float32 or other calibration data)"
        )


def _calibrate_linear(name: str, module: QuantLinear, x: torch.Tensor, settings: CalibSettings,
                      formats, budget: Budget) -> LayerParams:
    weight_format, act_format = formats
    _check_finite(name, x)
    problem = LinearProblem(x, module.weight.detach(), budget)
    per_tensor = settings.config.weight_granularity == "per_tensor"
    if weight_format is None or act_format is None:
        return _calibrate_partial(problem, weight_format, act_format, per_tensor)
    if settings.space is None:
        state = start = minmax_state(problem, weight_format, act_format, per_tensor)
    else:
        state, start = search_linear(problem, weight_format, act_format, settings.space, settings.rounds,
                                     settings.config.act_channel_shift, per_tensor)
    return LayerParams("linear", state.weight_format, state.weight_max_value, state.act_format,
                       state.act_max_value, state.act_channel_shift, state.loss, start.loss)


def _calibrate_partial(problem: LinearProblem, weight_format, act_format, per_tensor: bool) -> LayerParams:
    """16-bit weights or activations: MinMax ranges for the quantized side only."""
    weight_max = minmax_weight_max(problem, per_tensor)
    return LayerParams("linear", weight_format, weight_max if weight_format else None, act_format,
                       problem.act_absmax.clamp(min=TINY) if act_format else None)


def _final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    if norm is None:
        raise CalibrationError(f"cannot find the final norm (model.model.norm) of {type(model).__name__}")
    return norm


def calibrate(model: nn.Module, calib_ids: torch.Tensor, settings: CalibSettings) -> dict[str, LayerParams]:
    """Search and set quantization parameters of every swapped module of `model`.

    calib_ids: [S, T] token ids. The model must already hold QuantLinear / QuantEmbedding modules
    (quant_layers.modules.swap_modules). Returns {module name: LayerParams}; the modules are quantized.
    """
    weight_format, act_format, embed_format = settings.qbits.formats(settings.config.format_kind)
    names = {m: n for n, m in model.named_modules()}
    params: dict[str, LayerParams] = {}
    embedding = model.get_input_embeddings()
    if isinstance(embedding, QuantEmbedding) and embed_format is not None:
        device = _device_of(embedding)
        fmt, max_value, mse, mse_minmax = search_table(embedding.weight.detach(), embed_format, settings.space,
                                                       settings.budget(device))
        params[names[embedding]] = LayerParams("embedding", fmt, max_value, mse=mse, mse_minmax=mse_minmax)
        if settings.sequential:
            params[names[embedding]].apply(embedding)
    blocks = decoder_layers(model)
    hidden, block_kwargs = _first_block_inputs(model, blocks, calib_ids)
    started = time.perf_counter()
    progress = tqdm(list(enumerate(blocks)), desc="calibrating blocks", unit="block")
    for index, block in progress:
        linears = {names[m]: m for m in block.modules() if isinstance(m, QuantLinear)}
        outputs, inputs = _capture(block, hidden, block_kwargs[index], linears)
        _check_finite(f"the output of block {index}", outputs)
        budget = settings.budget(_device_of(block))
        for name, module in linears.items():
            params[name] = _calibrate_linear(name, module, inputs[name], settings, (weight_format, act_format), budget)
            params[name].apply(module)
        del inputs
        if settings.sequential:
            with torch.no_grad():
                outputs = _run_block(block, hidden, block_kwargs[index])
        hidden = outputs
        ratios = [p.mse / p.mse_minmax for n, p in params.items() if n in linears and p.mse_minmax > 0]
        if ratios:
            progress.set_postfix(mse_vs_minmax=f"{sum(ratios) / len(ratios):.3f}")
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):
        with torch.no_grad():
            norm = _final_norm(model)
            x = norm(hidden.to(_device_of(norm)))
        x = x.to(_device_of(head)).reshape(-1, x.shape[-1]).float()
        name = names[head]
        params[name] = _calibrate_linear(name, head, x, settings, (weight_format, act_format),
                                         settings.budget(_device_of(head)))
        params[name].apply(head)
    if embed_format is not None and not settings.sequential and names.get(embedding) in params:
        params[names[embedding]].apply(embedding)
    tqdm.write(f"calibration finished in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return params
