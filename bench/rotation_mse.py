"""Why QuaRot's rotation (ResidualRotation, the `rot` recipe component) hurts NVFP4 on SmolLM2-135M: per Linear, the
relative quantization error of its weight and of its input, and what each does to the Linear's output, with and
without the rotation (and its variants), on the full-precision model's calibration activations.

For every Linear (and the head) of the embedded SmolLM2-135M, with X the input its weight multiplies (after any
online Hadamard) on 2 x 512 calibration tokens, W the weight as folded:
    weight_rel   ||Q(W) - W||^2 / ||W||^2                      Q: round to nearest, `quantize`, tensor range amax|W|
    weight_out   ||X (Q(W) - W)^T||^2 / ||X W^T||^2            what the weight's error does to the output
    act_rel      ||Q(X) - X||^2 / ||X||^2                      Q: tensor range amax|X| (MinMax), dynamic blocks
    act_out      ||(Q(X) - X) W^T||^2 / ||X W^T||^2
    isotropic_gain  ||W||^2 ||X||^2 / (in ||X W^T||^2): the *_out an error of relative size 1 would have if it were
                 white (the same in every direction), so a white error's *_out is its *_rel times this gain
    x_top4_share / w_top4_share: the share of ||X||^2 in X's 4 channels of most energy, and of ||W||^2 in them
Q is the project's `quantize`; `reference_mismatch` counts the weights where an independent plain-torch NVFP4 / MXFP4
quantizer (E4M3 block scales by torch.float8_e4m3fn, OCP MX E8M0 scales, nearest E2M1 grid point, ties to the even
code) differs from it by more than 1e-6 relative. The embedding table is not measured (its rows are looked up, not
multiplied). Writes bench/results/rotation_mse_cpu.json; arguments: the VARIANTS to measure (default all).

    python bench/rotation_mse.py [none rot ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.run.reproducible import pin_cpu_numerics  # noqa: E402

pin_cpu_numerics()  # before torch loads
import torch  # noqa: E402

from bench.common import RESULTS, environment  # noqa: E402

from quant_layers.formats import BLOCK_ALIASES  # noqa: E402
from quant_layers.hadamard import block_hadamard, hadamard_matrix  # noqa: E402
from quant_layers.modules import QuantLinear, swap_modules  # noqa: E402
from quant_layers.quantize import quantize  # noqa: E402
from utils.data.calib_data import get_calib_data  # noqa: E402
from utils.data.models import load_model  # noqa: E402
from utils.search.residual_rotation import ResidualRotation  # noqa: E402
from utils.search.transforms import BlockHadamard  # noqa: E402

FAMILIES = ("NVFP4", "MXFP4")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
VARIANTS = {"none": None, "rot": ResidualRotation(), "rotnoonline": ResidualRotation(online_down_proj=False),
            "rot16": ResidualRotation(hidden_block=16, down_proj_block=16),
            "rot32": ResidualRotation(hidden_block=32, down_proj_block=32),
            "had16": BlockHadamard(16), "had32": BlockHadamard(32)}


def reference(x: torch.Tensor, family: str, tensor_max: torch.Tensor) -> torch.Tensor:
    """Independent NVFP4 / MXFP4 round to nearest of x [rows, n] (blocks along the last dimension), float64 math;
    tensor_max: the range NVFP4's tensor scale is made from."""
    size = 16 if family == "NVFP4" else 32
    blocks = x.double().reshape(x.shape[0], -1, size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if family == "NVFP4":
        tensor_scale = tensor_max.double() / (6 * 448)
        scale = (amax / (6 * tensor_scale)).float().to(torch.float8_e4m3fn).double() * tensor_scale
    else:  # OCP MX: 2^(floor(log2 amax) - emax(E2M1) = 2)
        scale = torch.exp2(torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - 2)
    y = (blocks / torch.where(scale > 0, scale, 1)).clamp(-6, 6)
    grid = E2M1.double()
    distance = (y.abs()[..., None] - grid).abs()
    nearest = distance == distance.min(dim=-1, keepdim=True).values
    even = nearest & (torch.arange(len(grid)) % 2 == 0)  # a tie goes to the even code (0, 1, 2, 4)
    pick = torch.where(even.any(dim=-1, keepdim=True), even, nearest).to(torch.int8).argmax(dim=-1)
    q = grid[pick] * y.sign()
    return torch.where(scale > 0, q * scale, 0).reshape(x.shape).to(x.dtype)


def rel(error: torch.Tensor, signal: torch.Tensor) -> float:
    return float(error.double().square().sum() / signal.double().square().sum())


def measure(variant: str, calib: torch.Tensor) -> dict[str, dict]:
    """{Linear name: {family: the measures}} of the model under `variant` (full precision throughout)."""
    model, _, _ = load_model(None, device="cpu", dtype="float32")
    swap_modules(model, embedding=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    transform = VARIANTS[variant]
    if isinstance(transform, ResidualRotation):
        transform.apply(model, transform.fit(model))
    elif isinstance(transform, BlockHadamard):  # as BlockHadamard folds it: W -> W H, x -> x H online
        for name, module in linears.items():
            if name != "lm_head":
                module.weight.data = block_hadamard(module.weight.data, transform.size)
                module.input_rotation.inner = hadamard_matrix(transform.size)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    def keep(name):
        return lambda _module, _args, out: captured[name].append(out.detach().reshape(-1, out.shape[-1]))

    handles = [m.input_rotation.register_forward_hook(keep(n)) for n, m in linears.items()]
    with torch.no_grad():
        for sequence in calib:
            model(sequence[None])
    for handle in handles:
        handle.remove()
    rows = {}
    for name, module in linears.items():
        x = torch.cat(captured.pop(name))
        if name == "lm_head":
            x = x[:256]  # the head's output is [tokens, 49152]: a quarter of the tokens
        w = module.weight.detach()
        exact = x @ w.T
        top = x.square().sum(dim=0).topk(4).indices  # the input's 4 channels of most energy
        rows[name] = {"isotropic_gain": float(w.double().square().sum() * x.double().square().sum()
                                              / (x.shape[1] * exact.double().square().sum())),
                      "x_top4_share": rel(x[:, top], x), "w_top4_share": rel(w[:, top], w)}
        for family in FAMILIES:
            fmt = BLOCK_ALIASES[family]
            qw, qx = quantize(w, fmt, w.abs().max()), quantize(x, fmt, x.abs().max())
            checked = slice(0, 2048)  # the head's first 2048 rows are enough for the reference check
            mismatch = (reference(w[checked], family, w.abs().max()) - qw[checked]).abs() > 1e-6 * qw[checked].abs()
            rows[name][family] = {"weight_rel": rel(qw - w, w), "weight_out": rel(x @ (qw - w).T, exact),
                                  "act_rel": rel(qx - x, x), "act_out": rel((qx - x) @ w.T, exact),
                                  "reference_mismatch": int(mismatch.sum())}
    return rows


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def summary(rows: dict[str, dict]) -> dict[str, dict]:
    """{family: {Linear kind: {measure: mean over the layers}}}."""
    out: dict[str, dict] = {}
    for family in FAMILIES:
        for name, row in rows.items():
            shared = {k: v for k, v in row.items() if k not in FAMILIES}
            for measure, value in {**row[family], **shared}.items():
                out.setdefault(family, {}).setdefault(kind(name), {}).setdefault(measure, []).append(value)
    return {f: {k: {m: sum(v) / len(v) for m, v in ms.items()} for k, ms in kinds.items()} for f, kinds in out.items()}


def main() -> None:
    torch.manual_seed(0)
    _, tokenizer, _ = load_model(None, device="cpu", dtype="float32")
    calib = get_calib_data(tokenizer, calib_size=2, seqlen=512, seed=0)
    variants = sys.argv[1:] or list(VARIANTS)
    result = {"tokens": list(calib.shape), "per_layer": {}, "mean_per_kind": {}}
    for variant in variants:
        rows = measure(variant, calib)
        result["per_layer"][variant] = rows
        result["mean_per_kind"][variant] = summary(rows)
        (RESULTS / "rotation_mse_cpu.json").write_text(json.dumps({**result, **environment()}, indent=1) + "\n")
        for family, kinds in result["mean_per_kind"][variant].items():
            print(variant, family, " ".join(f"{k}:w{v['weight_rel']:.4f}/{v['weight_out']:.4f},"
                                            f"a{v['act_rel']:.4f}/{v['act_out']:.4f},g{v['isotropic_gain']:.2f},"
                                            f"x{v['x_top4_share']:.2f},mm{v['reference_mismatch']:.0f}"
                                            for k, v in kinds.items()), flush=True)


if __name__ == "__main__":
    main()
