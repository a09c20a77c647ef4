"""Executing a quantized model's Linears other than by simulation (`--execution`).

The simulated QuantLinear computes F.linear(Q_a(x), W_fold, bias) with W_fold stored in the model's dtype. An
execution replaces that product: every quantized QuantLinear gets an `executor` (a module called with the quantized
input and the bias) built from its weight's codes and scales, and its float weight is dropped, so the weight's
memory is the executor's. The input quantizer is untouched: activations are quantized exactly as in the simulation.

EXECUTIONS maps each name of `--execution` to an `Execution`: its help line, `reason(weight_format, act_format)` (why
a Linear of these formats cannot run this way, or None) and `build(module, encoded)` (the executor, from the module and
its weight's `Encoded`: codes, scales, FPQ shifts; quant_layers/codes.py). A new way to execute is one entry here;
`--execution` (utils/run/cli.py) takes its choices and help from this dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quant_layers.codes import Encoded
from quant_layers.formats import QuantFormat
from quant_layers.modules import QuantLinear
from quant_layers.packed_linear import PackedLinear, PackedWeight, packable_reason

SIMULATED = "simulated"


@dataclass(frozen=True)
class Execution:
    """One way to execute quantized Linears: help (the flag's text), reason(weight_format, act_format) -> why a
    Linear of these formats cannot run this way or None, build(module, encoded) -> the executor module."""

    help: str
    reason: Callable[[QuantFormat | None, QuantFormat | None], str | None]
    build: Callable[[QuantLinear, Encoded], nn.Module]


EXECUTIONS = {
    "packed": Execution(
        help="NVFP4 / MXFP4 weights kept as 4-bit codes and block scales (about 0.28x bf16 bytes), decoded to bfloat16 "
             "inside a Triton GEMM kernel (quant_layers/packed_linear.py)",
        reason=lambda weight_format, act_format: packable_reason(weight_format),
        build=lambda module, encoded: PackedLinear(PackedWeight.from_encoded(encoded, module.weight))),
}
CHOICES = (SIMULATED, *EXECUTIONS)


def execution_help() -> str:
    """The --execution flag's help, from EXECUTIONS."""
    ways = "; ".join(f"{name}: {execution.help}" for name, execution in EXECUTIONS.items())
    return (f"how quantized Linears compute: {SIMULATED} (float weights on the quantized grid, F.linear); {ways}. "
            "Activations are quantized as simulated either way")


def _on(encoded: Encoded, device: torch.device) -> Encoded:
    tensors = {f.name: getattr(encoded, f.name).to(device) for f in dataclasses.fields(encoded)
               if isinstance(getattr(encoded, f.name), torch.Tensor)}
    return dataclasses.replace(encoded, **tensors)


def use_execution(model: nn.Module, name: str, weight_codes: Callable[[str, QuantLinear], Encoded]) -> dict:
    """Give every quantized QuantLinear of model the executor of execution `name` and drop its float weight.

    weight_codes(module name, module) -> the module's weight as an Encoded (utils/export/write.py's
    module_weight_codes for a calibrated model, the file's tensors for a packed export). Every module is checked
    before any is changed: ValueError (one line) naming the first that cannot run this way. Returns {"execution":
    name, "modules": how many, "weight_bytes": the executors' buffer bytes, "bf16_weight_bytes": 2 bytes per weight}.
    """
    if name == SIMULATED:
        return {"execution": SIMULATED}
    if name not in EXECUTIONS:
        raise ValueError(f"unknown execution {name!r}; choose one of {', '.join(CHOICES)}")
    execution = EXECUTIONS[name]
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.is_quantized}
    if not modules:
        raise ValueError(f"--execution {name}: the model has no quantized Linear; add --quant_config")
    for module_name, module in modules.items():
        if module.executor is not None:
            raise ValueError(f"--execution {name}: module {module_name!r} already has an executor")
        reason = execution.reason(module.weight_format, module.act_format)
        if reason:
            raise ValueError(f"--execution {name}: module {module_name!r} cannot run this way: {reason}")
    weight_bytes = bf16_bytes = 0
    for module_name, module in modules.items():
        try:
            executor = execution.build(module, _on(weight_codes(module_name, module), module.weight.device))
        except ValueError as error:
            raise ValueError(f"--execution {name}: module {module_name!r}: {error}") from None
        bf16_bytes += 2 * module.weight.numel()
        weight_bytes += sum(b.numel() * b.element_size() for b in executor.buffers())
        module.executor = executor
        module.weight = None  # the float weight goes (freed once nothing else holds it)
    return {"execution": name, "modules": len(modules), "weight_bytes": weight_bytes, "bf16_weight_bytes": bf16_bytes}
