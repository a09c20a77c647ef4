"""How the quantized Linears of a ready model are executed (--execution): the simulated forward, the reference, or
an executor that computes the same quantized layer another way (QuantLinear.executor, quant_layers/modules.py).

`EXECUTIONS` maps each name to its `Execution`: the flag's help and the function that converts a quantized model in
place, given the layers' QuantParams (as calibration returns them or utils/params.py loads them), and returns one
line saying what it did. A new executor is one entry here and one module in quant_layers/.

fp8 (quant_layers/fp8_linear.py): every quantized QuantLinear gets an FP8Linear holding its weight as E4M3 codes and
per-row scales, and its float weight is dropped (1 byte per weight on the device instead of 2 in bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from configs import QBits, QuantConfig
from quant_layers.fp8_linear import FP8Linear, fp8_format_error, fp8_weight, scaled_mm_reason
from quant_layers.modules import QuantLinear, QuantParams
from utils.export.write import module_weight_codes
from utils.search.space import range_formats


class ExecutionError(ValueError):
    """A model or config that an execution mode cannot run: one line."""


@dataclass(frozen=True)
class Execution:
    """help: the --execution choice's meaning; convert(model, layers) -> a line of what it did (None: nothing to do);
    config_error(config, qbits) -> why a calibration under config cannot be executed so, or None (checked before
    calibrating)."""

    help: str
    convert: Callable[[nn.Module, dict], str] | None = None
    config_error: Callable[[QuantConfig, QBits], str | None] | None = None


def fp8_config_error(config: QuantConfig, qbits: QBits) -> str | None:
    """Why the Linears calibrated under config and qbits may not run on FP8 codes: block scaling, a weight or input
    left in full precision, or a format the search may choose (every format of the width) that is not exact in E4M3."""
    weight, act, _ = qbits.formats(config)
    if weight is None or act is None:
        return f"--qbits {qbits.tag()}: FP8 execution needs quantized weights and activations (no 16 bits)"
    for fmt in (weight, act, *(range_formats(weight) + range_formats(act) if config.search else ())):
        error = fp8_format_error(fmt)
        if error:
            return f"{config.name} {qbits.tag()}: {error}"
    return None


def _fp8_executor(module: QuantLinear, params: QuantParams | None) -> FP8Linear:
    """The FP8Linear of one quantized QuantLinear; ValueError (one line) if it cannot have one."""
    if params is None:
        raise ValueError("no quantization parameters")
    if module.weight_format is None or module.act_format is None:
        part = "weight" if module.weight_format is None else "input"
        raise ValueError(f"its {part} is not quantized: FP8 execution needs both")
    error = fp8_format_error(module.act_format)
    if error:
        raise ValueError(error)
    return FP8Linear(*fp8_weight(module_weight_codes(module, params)))


def use_fp8_execution(model: nn.Module, layers: dict) -> str:
    """Give every quantized QuantLinear of model its FP8Linear and drop its float weight. Every executor is built
    before any module changes, so an ExecutionError (one line, naming the first module that cannot run on FP8 codes)
    leaves the model as it was. Returns a line: how many Linears, and where the GEMM is not torch._scaled_mm, why."""
    modules = {name: module for name, module in model.named_modules()
               if isinstance(module, QuantLinear) and module.is_quantized}
    executors = {}
    for name, module in modules.items():
        try:
            executors[name] = _fp8_executor(module, layers.get(name))
        except ValueError as error:
            raise ExecutionError(f"--execution fp8: {name}: {error}") from None
    reasons = set()
    for name, module in modules.items():
        module.executor = executors[name]
        module.weight = None  # the E4M3 codes replace it
        codes = executors[name].weight_codes
        reasons.add(scaled_mm_reason(codes.new_empty((1, codes.shape[1])), codes))
    where = "torch._scaled_mm" if reasons == {None} else (
        "the float32 reference GEMM where torch._scaled_mm cannot run: " + "; ".join(sorted(filter(None, reasons))))
    return f"fp8 execution: {len(modules)} Linears on E4M3 codes, {where}"


EXECUTIONS = {
    "simulated": Execution("the reference: fake-quantized float weights and activations, a float GEMM"),
    "fp8": Execution("the paper's element formats as E4M3 codes: a fused activation quantizer and an FP8 GEMM "
                     "(torch._scaled_mm on CUDA sm89+, a float32 GEMM of the codes elsewhere), equal to simulated up "
                     "to float32 summation order (docs/deployment.md)", use_fp8_execution, fp8_config_error),
}


def use_execution(model: nn.Module, name: str, layers: dict) -> str | None:
    """Convert model to execution `name` (EXECUTIONS); returns its line, None for the simulated forward."""
    execution = EXECUTIONS[name]
    return execution.convert(model, layers) if execution.convert else None
