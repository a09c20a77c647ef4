"""How the quantized Linears of a ready model are executed (--execution): the simulated forward, the reference, or
an executor that computes the same quantized layer another way (QuantLinear.executor, quant_layers/modules.py).

`EXECUTIONS` maps each name to its `Execution`: the flag's help, the function that converts a quantized model in
place, and the check of a config before calibrating. A conversion takes `weight_codes(name, module) -> Encoded`,
the weight of each quantized QuantLinear as codes and scales (quant_layers/codes.py): `layer_codes(layers)` gives it
from the layers' QuantParams (as calibration returns them or utils/params.py loads them), a packed export from its
file's tensors (utils/export/load.py); it returns one line saying what it did. A new executor is one entry here and
one module in quant_layers/.

packed (quant_layers/packed_linear.py): every quantized QuantLinear gets a PackedLinear holding its NVFP4 / MXFP4
weight as 4-bit codes and block scales, decoded to bfloat16 by Triton kernels (packed_matmul), and its float weight
is dropped (4.5 or 4.25 bits per weight on the device instead of 16 in bfloat16).

fp8 (quant_layers/fp8_linear.py): every quantized QuantLinear gets an FP8Linear holding its weight as E4M3 codes and
per-row scales, and its float weight is dropped (1 byte per weight on the device instead of 2 in bfloat16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from configs import QBits, QuantConfig
from quant_layers.codes import Encoded
from quant_layers.fp8_linear import FP8Linear, fp8_format_error, fp8_weight, scaled_mm_reason
from quant_layers.modules import QuantLinear
from quant_layers.packed_linear import DEQUANTIZE_MIN_ROWS, PackedLinear, PackedWeight, packable_reason
from quant_layers.packed_linear import unavailable_reason as gemm_unavailable_reason
from utils.export.write import module_weight_codes
from utils.search.space import range_formats

WeightCodes = Callable[[str, QuantLinear], Encoded]


class ExecutionError(ValueError):
    """A model or config that an execution mode cannot run: one line."""


@dataclass(frozen=True)
class Execution:
    """help: the --execution choice's meaning; convert(model, weight_codes) -> a line of what it did (None: nothing to
    do); config_error(config, qbits) -> why a calibration under config cannot be executed so, or None (checked
    before calibrating)."""

    help: str
    convert: Callable[[nn.Module, WeightCodes], str] | None = None
    config_error: Callable[[QuantConfig, QBits], str | None] | None = None


def layer_codes(layers: dict) -> WeightCodes:
    """weight_codes from {module name: QuantParams}: utils/export/write.py's module_weight_codes (codes that decode to
    the module's weight bit for bit, FPQ shifts included)."""
    def weight_codes(name: str, module: QuantLinear) -> Encoded:
        if name not in layers:
            raise ValueError("no quantization parameters")
        return module_weight_codes(module, layers[name])

    return weight_codes


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, QuantLinear) and module.is_quantized}


def packed_config_error(config: QuantConfig, qbits: QBits) -> str | None:
    """Why the Linears calibrated under config and qbits may not run packed: weights that are not E2M1 in NVFP4 /
    MXFP4 blocks (packable_reason), 16-bit weights included."""
    reason = packable_reason(qbits.formats(config)[0])
    return f"{config.name} {qbits.tag()}: {reason}" if reason else None


def use_packed_execution(model: nn.Module, weight_codes: WeightCodes) -> str:
    """Give every quantized QuantLinear of model its PackedLinear and drop its float weight. Every module's format is
    checked before any changes (an ExecutionError names the first that cannot run packed); the executors are then
    built one at a time, so memory never holds two copies of the weights. Returns a line: how many Linears, their
    weights' bytes against bfloat16's, and where the GEMM is not the Triton kernel, why."""
    modules = quantized_linears(model)
    if not modules:
        raise ExecutionError("--execution packed: the model has no quantized Linear")
    for name, module in modules.items():
        reason = packable_reason(module.weight_format)
        if reason:
            raise ExecutionError(f"--execution packed: {name}: {reason}")
    packed_bytes, reasons = 0, set()
    for name, module in modules.items():
        try:
            weight = PackedWeight.from_encoded(weight_codes(name, module), module.weight)
        except ValueError as error:
            raise ExecutionError(f"--execution packed: {name}: {error}") from None
        module.executor = PackedLinear(weight.to(module.weight.device))
        module.weight = None  # the packed codes replace it
        packed_bytes += weight.nbytes
        reasons.add(gemm_unavailable_reason(weight.codes.new_empty((1, 1), dtype=weight.dtype)))
    bf16_bytes = sum(2 * m.in_features * m.out_features for m in modules.values())
    where = "the Triton kernel" if reasons == {None} else (
        "the float32 reference GEMM where the kernel cannot run: " + "; ".join(sorted(filter(None, reasons))))
    ratio = packed_bytes / bf16_bytes
    return (f"packed execution: {len(modules)} Linears, weights {packed_bytes:,} bytes = {ratio:.3f} of bf16's "
            f"{bf16_bytes:,}, {where}")


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


def _fp8_executor(name: str, module: QuantLinear, weight_codes: WeightCodes) -> FP8Linear:
    """The FP8Linear of one quantized QuantLinear (its weight codes asked for once its formats pass); ValueError (one
    line) if it cannot have one."""
    if module.weight_format is None or module.act_format is None:
        part = "weight" if module.weight_format is None else "input"
        raise ValueError(f"its {part} is not quantized: FP8 execution needs both")
    error = fp8_format_error(module.act_format)
    if error:
        raise ValueError(error)
    return FP8Linear(*fp8_weight(weight_codes(name, module)))


def use_fp8_execution(model: nn.Module, weight_codes: WeightCodes) -> str:
    """Give every quantized QuantLinear of model its FP8Linear and drop its float weight. Every executor is built
    before any module changes, so an ExecutionError (one line, naming the first module that cannot run on FP8 codes)
    leaves the model as it was. Returns a line: how many Linears, and where the GEMM is not torch._scaled_mm, why."""
    modules = quantized_linears(model)
    executors = {}
    for name, module in modules.items():
        try:
            executors[name] = _fp8_executor(name, module, weight_codes)
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
    "packed": Execution("NVFP4 / MXFP4 weights as 4-bit codes and block scales (0.28 / 0.27 of bf16's bytes), decoded "
                        "to bfloat16 inside a Triton GEMM for few input rows, by a Triton decode before torch's GEMM "
                        f"from {DEQUANTIZE_MIN_ROWS} rows (CUDA; the float32 reference GEMM elsewhere), inputs quantized "
                        "as simulated (docs/deployment.md)", use_packed_execution, packed_config_error),
}


def use_execution(model: nn.Module, name: str, weight_codes: WeightCodes) -> str | None:
    """Convert model to execution `name` (EXECUTIONS); returns its line, None for the simulated forward."""
    execution = EXECUTIONS[name]
    return execution.convert(model, weight_codes) if execution.convert else None


def executed_weight_bytes(model: nn.Module) -> dict:
    """{"modules", "weight_bytes" (the executors' buffers), "bf16_weight_bytes" (2 per weight)} of the QuantLinears
    that have an executor: what the results JSON records."""
    executed = [m for m in model.modules() if isinstance(m, QuantLinear) and m.executor is not None]
    return {"modules": len(executed),
            "weight_bytes": sum(b.numel() * b.element_size() for m in executed for b in m.executor.buffers()),
            "bf16_weight_bytes": sum(2 * m.in_features * m.out_features for m in executed)}


__all__ = ["EXECUTIONS", "Execution", "ExecutionError", "executed_weight_bytes", "layer_codes", "use_execution",
           "use_fp8_execution", "use_packed_execution"]
