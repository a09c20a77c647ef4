"""Calibration: the exponent-bias / max-value search of LLM-FP4, block by block.

For each decoder block, one pass over the calibration set captures the inputs of all its Linears
(forward hooks; Linears that read the same tensor, like q/k/v, share one copy), each Linear is
searched (utils/search/problem.py) and its parameters are set, which quantizes its weight once. Only one
block's inputs live in memory. The block's outputs feed the next block: the full-precision outputs
of the capture pass (the paper: every layer sees full-precision inputs), or with `sequential` the
outputs of the block already quantized. The output head is calibrated last on the final norm's
output (after the config's head transforms, if any); the token embedding by a weight-only search.

With a checkpoint, progress is saved after the embedding and after every block; a resumed run sets the
saved parameters, recomputes the hidden states entering the next block exactly as an uninterrupted run
did (through full-precision blocks, or quantized ones with `sequential`) and goes on from there.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from configs import QBits, QuantConfig
from configs.attention import AttentionPolicy
from quant_layers.modules import QuantEmbedding, QuantLinear, QuantParams, untie_head
from quant_layers.quantize import abs_max
from utils.attention import attention_modules, calibrate_attention, recording
from utils.data.architecture import Architecture, architecture_of, decoder_layers, final_norm, head_architecture
from utils.params import Checkpoint, Entry, TransformParams, apply_params
from utils.search.problem import Budget, LinearProblem
from utils.search.shared_ranges import share_tensor_ranges
from utils.search.space import TINY, SearchSpace
from utils.search.steps import fpq_steps, minmax_state, minmax_weight_max, round_to_nearest_loss, search_linear
from utils.search.table import search_table


class CalibrationError(RuntimeError):
    """Calibration cannot go on (non-finite activations, unsupported model structure)."""


@dataclass(frozen=True)
class CalibSettings:
    """What to search. space None = MinMax (no search)."""

    config: QuantConfig
    qbits: QBits
    space: SearchSpace | None
    sequential: bool = False
    budget_bytes: int | None = None
    offload_device: str | None = None  # blocks kept on the CPU run here, one at a time
    attention: AttentionPolicy | None = None  # KV cache / attention matmuls (the model prepared by utils.attention)
    attention_space: SearchSpace | None = None  # their static ranges' search (None: MinMax)

    def budget(self, device: torch.device) -> Budget:
        return Budget(self.budget_bytes) if self.budget_bytes is not None else default_budget(device)


def default_budget(device: torch.device | str) -> Budget:
    """The search's working memory per batched evaluation: 512 MiB on a GPU, 256 MiB on the CPU."""
    return Budget(512 << 20 if torch.device(device).type == "cuda" else 256 << 20)


class _Stop(Exception):
    pass


def _device_of(module: nn.Module) -> torch.device:
    device = next(module.parameters()).device
    if device.type == "meta":
        raise CalibrationError("the model's weights are offloaded by accelerate (device_map put blocks on disk or "
                               "CPU): calibration needs them in memory; use --offload instead of use_accelerate")
    return device


@contextmanager
def _placed(block: nn.Module, device: str | None):
    """Run the body with `block` moved to device (None: where it is), then move it back."""
    home = _device_of(block)
    if device is None or home == torch.device(device):
        yield
        return
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


def _move(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


def first_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor, offload: str | None
                        ) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering block 0 for every sequence [S, T, H], and each block's keyword arguments
    (masks, rotary embeddings: they differ per block in e.g. Gemma3), captured from sequence 0.
    offload: blocks on the CPU visit this device for that one pass."""
    block_kwargs: list[dict] = [{} for _ in blocks]
    inputs: list[torch.Tensor] = []
    homes = [_device_of(b) for b in blocks]

    def keep_kwargs(index):
        def hook(module, _args, kwargs):
            block_kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if offload is not None:
                module.to(offload)
        return hook

    def go_home(index):
        def hook(module, _args, _output):
            module.to(homes[index])
        return hook

    def stop(_module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    device = _device_of(model.get_input_embeddings())
    handles = [b.register_forward_pre_hook(keep_kwargs(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(go_home(i)) for i, b in enumerate(blocks)]
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


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, before_each=None) -> torch.Tensor:
    """Block outputs [S, T, H], one sequence at a time; before_each(s) is called before sequence s."""
    device = _device_of(block)
    kwargs = {k: _move(v, device) for k, v in kwargs.items()}
    outputs = None  # [S, T, H], allocated at the first output: no list of outputs to concatenate at the end
    for index, h in enumerate(hidden.split(1)):
        if before_each is not None:
            before_each(index)
        out = block(h.to(device), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if outputs is None:
            outputs = out.new_empty((hidden.shape[0], *out.shape[1:]))
        outputs[index : index + 1].copy_(out)
    return outputs


def capture_inputs(block: nn.Module, hidden: torch.Tensor, kwargs: dict, linears: dict[str, QuantLinear]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the block once; returns its outputs and each Linear's inputs [S*T, in] (the model's dtype, written
    into one preallocated buffer per distinct tensor: Linears that read the same tensor share it). An input is what
    the Linear's weight multiplies: after its input rotation (ResidualRotation's online Hadamard before down_proj,
    folded into that weight), which hands an unrotated input on as the same tensor."""
    tokens_per_sequence = hidden.shape[1]
    buffers: dict[str, torch.Tensor] = {}
    first_inputs: list[tuple[torch.Tensor, str]] = []  # held during sequence 0, so no address is reused
    leader: dict[str, str] = {}
    offset = 0

    def hook(name):
        def keep(_module, _args, output):
            x = output.detach().reshape(-1, output.shape[-1])
            if name not in leader:  # sequence 0: group the Linears that read one tensor
                same = [owner for seen, owner in first_inputs if seen is output]
                leader[name] = same[0] if same else name
                if not same:
                    first_inputs.append((output, name))
                    buffers[name] = torch.empty(hidden.shape[0] * tokens_per_sequence, x.shape[1], dtype=x.dtype,
                                                device=x.device)
            if leader[name] == name:
                buffers[name][offset : offset + x.shape[0]].copy_(x)
        return keep

    def next_sequence(index: int) -> None:
        nonlocal offset
        offset = index * tokens_per_sequence
        first_inputs.clear()  # grouping is settled after sequence 0

    handles = [m.input_rotation.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            outputs = run_block(block, hidden, kwargs, next_sequence)
    finally:
        for h in handles:
            h.remove()
    return outputs, {name: buffers[leader[name]] for name in linears}


def _check_finite(what: str, x: torch.Tensor) -> None:
    """Stop on NaN or Inf in x (found through max |x|, which either propagates: no full-size mask)."""
    bound = abs_max(x)
    if not torch.isfinite(bound):
        bad = "NaN" if torch.isnan(bound) else "Inf"
        raise CalibrationError(
            f"{bad} in {what} during calibration: the model overflows on this input; "
            "try --model_args dtype=float32 or other calibration data"
        )


def _check_inputs(inputs: dict[str, torch.Tensor]) -> None:
    """Name the first Linear (in module order) whose captured input is not finite."""
    checked: set[int] = set()
    for name, x in inputs.items():
        if id(x) not in checked:
            checked.add(id(x))
            _check_finite(f"the input of {name}", x)


def range_steps(settings: CalibSettings, weight_format, act_format) -> tuple:
    """LLM-FP4's range search (utils/search/steps.py) where the config searches and the run has a SearchSpace."""
    config, space = settings.config, settings.space
    if space is None or not config.search:
        return ()
    return fpq_steps(weight_format, act_format, space, config.act_channel_shift,
                     config.weight_granularity == "per_tensor")


def further_steps(settings: CalibSettings) -> tuple:
    """The config's further steps, built from the run's SearchSpace; none for MinMax runs."""
    return () if settings.space is None else tuple(step.from_space(settings.space) for step in settings.config.steps)


def linear_steps(settings: CalibSettings, weight_format, act_format) -> tuple:
    """The search steps of a Linear: the range search, then the config's further steps."""
    return range_steps(settings, weight_format, act_format) + further_steps(settings)


def _calibrate_group(module_of: dict[str, QuantLinear], x: torch.Tensor, settings: CalibSettings, formats,
                     budget: Budget) -> dict[str, QuantParams]:
    """The parameters of the Linears that read one input x: MinMax, then the config's search steps; a 16-bit side
    stays unquantized (MinMax for the other side). With `share_input_ranges` (and more than one Linear) the range
    phase runs for each, `share_tensor_ranges` gives them one weight and one input range, and the further steps run
    from there."""
    weight_format, act_format = formats
    per_tensor = settings.config.weight_granularity == "per_tensor"

    def problem_of(name: str) -> LinearProblem:
        return LinearProblem(x, module_of[name].weight.detach(), budget)

    if weight_format is None or act_format is None:
        states = {}
        for name in module_of:
            problem = problem_of(name)
            weight_max = minmax_weight_max(problem, per_tensor)
            states[name] = QuantParams(weight_format, weight_max if weight_format else None, act_format,
                                       problem.act_absmax.clamp(min=TINY) if act_format else None)
        return states
    if not settings.config.share_input_ranges or len(module_of) == 1:  # one Linear's problem at a time
        steps = linear_steps(settings, weight_format, act_format)
        states = {}
        for name in module_of:
            problem = problem_of(name)
            states[name] = search_linear(problem, minmax_state(problem, weight_format, act_format, per_tensor), steps)
        return states
    problems = {name: problem_of(name) for name in module_of}
    ranges = range_steps(settings, weight_format, act_format)
    searched = [search_linear(problem, minmax_state(problem, weight_format, act_format, per_tensor), ranges)
                for problem in problems.values()]
    states, further = {}, further_steps(settings)
    for (name, problem), shared in zip(problems.items(), share_tensor_ranges(searched)):
        shared.mse = problem.loss(shared)
        states[name] = search_linear(problem, shared, further)
    return states


@dataclass
class _Run:
    """What the steps of one calibration share: the model, the settings, module names and the results so far."""

    model: nn.Module
    settings: CalibSettings
    params: dict[str, Entry]
    formats: tuple  # (weight, activation) starting formats of the Linears
    names: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = {m: n for n, m in self.model.named_modules()}

    def linears(self, block: nn.Module) -> dict[str, QuantLinear]:
        return {self.names[m]: m for m in block.modules() if isinstance(m, QuantLinear)}

    def attention(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's attention modules to calibrate: none without an attention policy."""
        if self.settings.attention is None:
            return {}
        prefix = self.names[block] + "."
        return {name: m for name, m in attention_modules(self.model).items() if name.startswith(prefix)}


def _calibrate_embedding(run: _Run, embed_format) -> bool:
    """Search the token embedding's ranges unless run.params has them (resumed); applied now with `sequential`.
    Returns whether a search ran."""
    embedding = run.model.get_input_embeddings()
    if not isinstance(embedding, QuantEmbedding) or embed_format is None:
        return False
    name = run.names[embedding]
    searched = name not in run.params
    if searched:
        space = run.settings.space if run.settings.config.search else None  # further steps are for Linears
        run.params[name] = search_table(embedding.weight.detach(), embed_format, space,
                                        run.settings.budget(_device_of(embedding)))
    if run.settings.sequential:
        embedding.set_quant_params(run.params[name])
    return searched


def _replay(run: _Run, blocks: nn.ModuleList, count: int, hidden: torch.Tensor, block_kwargs: list[dict]
            ) -> torch.Tensor:
    """Set the saved parameters of blocks [0, count) and return the hidden states entering block `count`,
    computed as an uninterrupted run computed them: through full-precision blocks, or quantized ones with
    `sequential`."""
    sequential = run.settings.sequential
    with torch.no_grad():
        for index in range(count):
            if sequential:
                _apply_block(run, blocks[index])
            with _placed(blocks[index], run.settings.offload_device):
                hidden = run_block(blocks[index], hidden, block_kwargs[index])
            if not sequential:
                _apply_block(run, blocks[index])
    return hidden


def _apply_block(run: _Run, block: nn.Module) -> None:
    """Set a block's saved parameters (apply_params: transforms first, then the Linears')."""
    prefix = run.names[block] + "."
    apply_params(run.model, {name: p for name, p in run.params.items() if name.startswith(prefix)})


def _transform_model(run: _Run) -> None:
    """The config's model-wide transforms (ResidualRotation), before anything is calibrated: fit on the model (or
    taken from a resumed run's params) and folded in; saved under the transform's name."""
    for transform in (t for t in run.settings.config.transforms if t.scope == "model"):
        if transform.name not in run.params:
            value = transform.fit(run.model)[transform.tensor_name]
            run.params[transform.name] = TransformParams(transform.to_dict(), value)
        transform.apply(run.model, {transform.tensor_name: run.params[transform.name].value})


def _transform_block(run: _Run, block: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """The config's per-block transforms on one block and the captured inputs of its Linears (full names)."""
    transforms = [t for t in run.settings.config.transforms if t.scope == "block"]
    if not transforms:
        return
    prefix = run.names[block] + "."
    relative = {name.removeprefix(prefix): x for name, x in inputs.items()}  # the same tensors, renamed
    _fit_transforms(run, transforms, block, relative, architecture_of(block), prefix, _device_of(block))


def _fit_transforms(run: _Run, transforms: list, block: nn.Module, inputs: dict[str, torch.Tensor],
                    arch: Architecture | None, prefix: str, device: torch.device) -> None:
    """Each transform in turn: fit on the captured inputs {Linear name relative to block: [tokens, in]}, fold into
    block, and change the captured inputs the same way (what the transformed block now feeds its Linears); its
    tensors go into run.params under prefix + their names."""
    if not transforms:
        return
    weight_format, act_format = run.formats
    loss = None if weight_format is None or act_format is None else round_to_nearest_loss(
        weight_format, act_format, run.settings.config.weight_granularity == "per_tensor", run.settings.budget(device))
    for transform in transforms:
        fitted = transform.fit(block, inputs, arch, loss)
        transform.apply(block, fitted, arch)
        transform.transform_inputs(fitted, inputs, arch)
        for name, value in fitted.items():
            run.params[prefix + name] = TransformParams(transform.to_dict(), value)


def _calibrate_block(run: _Run, index: int, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Search and set the Linears of one block (moved to the offload device for the time, if any; its parameter
    entries then go back with it); returns the hidden states entering the next block."""
    with _placed(block, run.settings.offload_device):
        outputs = _search_block(run, index, block, hidden, kwargs)
    _entries_home(run, run.names[block] + ".", _device_of(block))
    return outputs


def _entries_home(run: _Run, prefix: str, home: torch.device) -> None:
    """Move run.params' entries under prefix to home (a block's or the head's device once it left the offload
    device): left on the GPU, an NVFP4 recipe's codes and block scales add about 236 MB a LLaMA-7B block, so the
    offloaded calibration's peak grew with depth (9.14 GiB at 8 layers, 12.31 GiB at 32; 2026-12-07, H100)."""
    for name in [name for name in run.params if name.startswith(prefix)]:
        entry = run.params[name]
        tensors = {spec.name: value.to(home) for spec in fields(entry)
                   if isinstance(value := getattr(entry, spec.name), torch.Tensor) and value.device != home}
        if tensors:
            run.params[name] = replace(entry, **tensors)


def _search_block(run: _Run, index: int, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    linears, attention = run.linears(block), run.attention(block)
    with recording(attention) as records:  # the attention inputs of the same pass (K, V after RoPE)
        outputs, inputs = capture_inputs(block, hidden, kwargs, linears)
    _check_inputs(inputs)
    _check_finite(f"the output of block {index}", outputs)
    _transform_block(run, block, inputs)
    budget = run.settings.budget(_device_of(block))
    groups: dict[int, dict[str, QuantLinear]] = {}  # by input tensor: Linears that read one input, in module order
    for name, module in linears.items():
        groups.setdefault(id(inputs[name]), {})[name] = module
    for group in groups.values():
        states = _calibrate_group(group, inputs[next(iter(group))], run.settings, run.formats, budget)
        for name, module in group.items():
            run.params[name] = states[name]
            module.set_quant_params(states[name])
            del inputs[name]  # no later group reads it: the last group (down_proj, the widest) searches beside no other
    for name, module in attention.items():
        run.params[name] = calibrate_attention(module, records[name], run.settings.attention,
                                               run.settings.attention_space)
    del records
    if run.settings.sequential:
        with torch.no_grad():
            outputs = run_block(block, hidden, kwargs)
    return outputs


def _calibrate_head(run: _Run, hidden: torch.Tensor, transforms: list, arch: Architecture | None) -> None:
    """Search and set the head on the final norm's output, after the config's head transforms (at_head) with their
    layout `arch` (head_architecture; None without head transforms)."""
    head = run.model.get_output_embeddings()
    if not isinstance(head, QuantLinear):
        return
    if transforms:
        untie_head(run.model)  # before the head moves to the offload device: a tied embedding stays where it is
    with _placed(head, run.settings.offload_device):
        with torch.no_grad():
            norm = final_norm(run.model)
            x = norm(hidden.to(_device_of(norm)))
        x = x.to(_device_of(head)).reshape(-1, x.shape[-1])
        name = run.names[head]
        _check_finite(f"the input of {name}", x)
        _fit_transforms(run, transforms, run.model, {name: x}, arch, "", x.device)
        budget = run.settings.budget(_device_of(head))
        run.params[name] = _calibrate_group({name: head}, x, run.settings, run.formats, budget)[name]
        head.set_quant_params(run.params[name])
    _entries_home(run, name, _device_of(head))


def _mse_ratio(run: _Run, block: nn.Module) -> str:
    found = [run.params[name] for name in run.linears(block)]
    ratios = [p.mse / p.mse_minmax for p in found if p.mse_minmax > 0]
    return f"{sum(ratios) / len(ratios):.3f}" if ratios else "-"


def calibrate(model: nn.Module, calib_ids: torch.Tensor, settings: CalibSettings,
              checkpoint: Checkpoint | None = None) -> dict[str, Entry]:
    """Search and set quantization parameters of every swapped module of `model`.

    calib_ids: [S, T] token ids. The model must already hold QuantLinear / QuantEmbedding modules
    (quant_layers.modules.swap_modules). Returns {module name: QuantParams or TransformParams}; the modules are
    quantized.
    checkpoint: saved after the embedding and after every block, and continued from if it holds progress;
    a resumed calibration returns exactly what an uninterrupted one returns.
    """
    weight_format, act_format, embed_format = settings.qbits.formats(settings.config)
    run = _Run(model, settings, dict(checkpoint.layers) if checkpoint else {}, (weight_format, act_format))
    head_transforms = [t for t in settings.config.transforms if t.scope == "head"]  # at_head: final norm -> head
    head_arch = head_architecture(model) if head_transforms else None  # refused here, not after every block
    start = checkpoint.next_block if checkpoint else 0
    _transform_model(run)
    if _calibrate_embedding(run, embed_format) and checkpoint:
        checkpoint.save(run.params, 0)
    blocks = decoder_layers(model)
    hidden, block_kwargs = first_block_inputs(model, blocks, calib_ids, settings.offload_device)
    if settings.offload_device is not None:  # GPU memory for one block: the table, the head and the entries so far
        model.get_input_embeddings().to("cpu")  # (the table's ranges, model-wide transforms) wait on the CPU
        model.get_output_embeddings().to("cpu")
        _entries_home(run, "", torch.device("cpu"))
    hidden = _replay(run, blocks, start, hidden, block_kwargs)
    started = time.perf_counter()
    progress = tqdm(range(start, len(blocks)), desc="calibrating blocks", unit="block", initial=start,
                    total=len(blocks))
    for index in progress:
        hidden = _calibrate_block(run, index, blocks[index], hidden, block_kwargs[index])
        progress.set_postfix(mse_vs_minmax=_mse_ratio(run, blocks[index]))
        if checkpoint:
            checkpoint.save(run.params, index + 1)
    _calibrate_head(run, hidden, head_transforms, head_arch)
    embedding = model.get_input_embeddings()
    if not settings.sequential and run.names.get(embedding) in run.params:
        with _placed(embedding, settings.offload_device):
            embedding.set_quant_params(run.params[run.names[embedding]])
    tqdm.write(f"calibration finished in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return run.params
