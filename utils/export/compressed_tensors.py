"""The compressed-tensors checkpoint layout for NVFP4 and MXFP4 models: what llm-compressor writes and vLLM serves.

`export_compressed_tensors(model, layers, directory, config_name)` writes a quantized model (its QuantLinear modules
set, transforms folded) as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads with the
`compressed-tensors` package installed: config.json with a `quantization_config`, model.safetensors (sharded with an
index above `max_shard_bytes`), the tokenizer if given. Nothing here imports compressed-tensors.

Per packed Linear <name> (weight [out, in], one scheme for the whole model, config group "group_0", targets Linear):

    NVFP4, format "nvfp4-pack-quantized", strategy tensor_group, groups of 16
      weight_packed        uint8 [out, in / 2]          E2M1 codes, two per byte, low nibble first (pack_nibbles)
      weight_scale         float8_e4m3fn [out, in / 16]  the block-scale bytes c (codes.encode's block_scale)
      weight_global_scale  float32 [1]                  gs ~ 448 * 6 / max_value, the reciprocal of the tensor scale t
      input_global_scale   float32 [1]                  448 * 6 / act_max_value (W4A4 only)
    MXFP4, format "mxfp4-pack-quantized", strategy group, groups of 32
      weight_packed        uint8 [out, in / 2]          as above
      weight_scale         uint8 [out, in / 32]         the E8M0 bytes (codes.encode's block_exponent)

The E2M1 codes are the OCP FP4 codes compressed-tensors unpacks (sign 0x8, magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6).
The library decodes a weight element as, f its FP4 value:
    NVFP4  bfloat16(fl32(f * fl32(c / gs)))        this project: fl32(2f * fl32(fl32(fl32(6c) * t) / 12)), model dtype
    MXFP4  bfloat16(f * 2^(byte - 127))            this project: fl32(2f * 0.5) * 2^(byte - 127), exact
so MXFP4 weights decode bit for bit, and NVFP4's do where a float32 gs gives the simulation's products after the
rounding to bfloat16: gs is the float32 nearest fl32(448 * 6 / max_value) (llm-compressor's value), within
GLOBAL_SCALE_ULPS ulps, for which every (code, block scale) pair of the tensor decodes to the simulated value. Where
none does, the report counts the elements, each one bfloat16 ulp away: their exact value f c max_value / 2688 is a
bfloat16 tie, which the simulation's float32 chain reaches (and rounds to even) and the library's quotient c / gs,
gs never exactly 2688 / max_value there, misses by a float32 ulp.

vLLM fuses q/k/v and gate/up and takes the largest global scale of the parts (an NVFP4 requirement: one global
scale per fused weight). `share_global_scales` (default) gives every Linear of such a group the group's largest
range (smallest gs) and re-encodes the others' simulated weights under it (`quantize` again, under the shared tensor
scale): those weights then differ from the simulation, and the report says by how much. Their input ranges are the
same tensor's and already equal; where not, the smallest is shared (what vLLM's max of the input scales uses).

Not expressible, refused with one line: formats other than NVFP4 / MXFP4 (E2M1 elements) for every quantized
Linear, FPQ's channel shifts, online input rotations (BlockHadamard, ResidualRotation's online Hadamard), explicit
block scales, NVFP4 with per-row ranges, models not in bfloat16 (the library decodes to bfloat16), mixed W4A4 / W4A16.
Written dense, as their simulated values in bfloat16: the token embedding (vLLM quantizes Linears only), and the
output head unless head="quantized" (vLLM's compressed-tensors path serves the head unquantized, so its input is
then not quantized: the report lists it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from configs import get_config
from quant_layers.codes import Encoded, code_table, decode, encode, pack_nibbles
from quant_layers.formats import BLOCK_ALIASES, QuantFormat
from quant_layers.modules import QuantEmbedding, QuantLinear, QuantParams
from quant_layers.quantize import quantize
from utils.data.architecture import architecture_of, decoder_layers
from utils.run.fileio import current_umask

NVFP4, MXFP4 = BLOCK_ALIASES["NVFP4"], BLOCK_ALIASES["MXFP4"]
COMPRESSION_FORMATS = {NVFP4: "nvfp4-pack-quantized", MXFP4: "mxfp4-pack-quantized"}  # compressed-tensors' names
SERVING_DTYPE = torch.bfloat16
GLOBAL_SCALE_ULPS = 64  # how far from 448 * 6 / max_value the weight global scale may move to decode exactly
_MAGNITUDE_BITS = 0x7  # an E2M1 code's magnitude; 0x8 is its sign
_TINY = 1e-30  # the range floor of NVFP4's tensor scale (quantize.py)


@dataclass(frozen=True)
class ExportReport:
    """What `export_compressed_tensors` wrote and where it differs from the simulated model.

    packed: Linears written packed; dense_quantized: quantized modules written as their simulated values (bfloat16);
    input_quantization_dropped: modules whose simulated input quantization the layout does not carry (a dense head);
    reencoded: {Linear: (elements changed, max |change|)} by a shared global scale; weight_mismatches: {packed
    Linear: elements the library decodes one bfloat16 ulp away from the written values}; global_scale_ulps:
    {NVFP4 Linear: ulps of its weight_global_scale from fl32(448 * 6 / range)}; shared_input_range: Linears whose
    input range was replaced by their fused group's smallest.
    """

    directory: Path
    compression_format: str
    packed: tuple[str, ...]
    dense_quantized: tuple[str, ...]
    input_quantization_dropped: tuple[str, ...]
    reencoded: dict[str, tuple[int, float]]
    weight_mismatches: dict[str, int]
    global_scale_ulps: dict[str, int]
    shared_input_range: tuple[str, ...]


def export_compressed_tensors(model: nn.Module, layers: dict, directory: str | Path, config_name: str, *,
                              tokenizer=None, share_global_scales: bool = True, head: str = "dense",
                              max_shard_bytes: int = 4 << 30) -> ExportReport:
    """Write `model` (quantized: QuantLinear modules set, transforms folded) in the compressed-tensors layout.

    layers: the calibration's {module name: QuantParams or TransformParams}; config_name: its --quant_config (an
    NVFP4 or MXFP4 config); directory: a new or empty folder, written whole or not at all (a temporary folder beside
    it, renamed at the end). share_global_scales: one NVFP4 weight global scale per fused q/k/v and gate/up group
    (vLLM needs it; False keeps every weight exactly as simulated). head: "dense" (what vLLM serves) or "quantized"
    (packed like the other Linears; transformers runs it, vLLM's compressed-tensors path does not). ValueError (one
    line) for what the layout cannot express.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"{directory} exists and is not an empty folder; choose a new export folder")
    if head not in ("dense", "quantized"):
        raise ValueError(f"head must be 'dense' or 'quantized', got {head!r}")
    fmt = _block_format(config_name)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {SERVING_DTYPE}:
        raise ValueError(f"the model is {', '.join(sorted(map(str, dtypes)))}: compressed-tensors decodes FP4 weights "
                         "to bfloat16, so export a model loaded and calibrated in bfloat16")
    packed, dense_quantized, dropped = _plan(model, layers, fmt, head)
    if not packed:
        raise ValueError(f"no Linear of the model is quantized with {fmt}: nothing to pack")
    activations = {layers[name].act_format is not None for name in packed}
    if len(activations) > 1:
        raise ValueError("some packed Linears quantize their inputs and some do not; the layout holds one scheme")
    groups = _fused_groups(model, packed) if share_global_scales and fmt == NVFP4 else [[n] for n in packed]
    tensors, findings = {}, _Findings()
    for group in groups:
        tensors.update(_pack_group(group, packed, layers, fmt, findings))
    tensors = _storable({**tensors, **_dense_tensors(model, packed)})
    config = model.config.to_dict()
    config["dtype"] = "bfloat16"
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    if "torch_dtype" in config:
        config["torch_dtype"] = "bfloat16"
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) and n not in packed)
    config["quantization_config"] = quantization_config(fmt, activations == {True}, ignore)
    _write(directory, tensors, config, model, tokenizer, max_shard_bytes, config_name)
    return ExportReport(directory, COMPRESSION_FORMATS[fmt], tuple(packed), tuple(dense_quantized), tuple(dropped),
                        findings.reencoded, findings.mismatches, findings.ulps, tuple(findings.shared_input))


def quantization_config(fmt: QuantFormat, activations: bool, ignore: list[str]) -> dict:
    """config.json's quantization_config: compressed-tensors' NVFP4 / MXFP4 presets (W4A4, or W4A16 without
    activations) for every Linear not in `ignore`, packed ("compressed")."""
    nvfp4 = fmt == NVFP4
    weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": fmt.block.size,
               "strategy": "tensor_group" if nvfp4 else "group", "dynamic": False,
               "scale_dtype": "torch.float8_e4m3fn" if nvfp4 else "torch.uint8"}
    inputs = {**weights, "dynamic": "local" if nvfp4 else True} if activations else None
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs, "output_activations": None,
             "format": COMPRESSION_FORMATS[fmt]}
    return {"quant_method": "compressed-tensors", "format": COMPRESSION_FORMATS[fmt],
            "quantization_status": "compressed", "config_groups": {"group_0": group}, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def library_weight_values(fp4: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """What compressed-tensors decodes (bfloat16): fp4 the FP4 values (float32); NVFP4: scale the block-scale values
    (float32 of the E4M3 bytes) and gs, fl32(fp4 * fl32(scale / gs)); MX (global_scale None): scale = 2^(byte - 127),
    fp4 * scale (exact). Shapes broadcast."""
    if global_scale is None:
        return (fp4 * scale).to(SERVING_DTYPE)
    return (fp4 * (scale / global_scale)).to(SERVING_DTYPE)


def _block_format(config_name: str) -> QuantFormat:
    config = get_config(config_name)
    for fmt in COMPRESSION_FORMATS:
        if config.block == fmt.block and config.format_kind == "fp":
            return fmt
    raise ValueError(f"{config_name} has no NVFP4 / MXFP4 block scaling: the compressed-tensors export writes only "
                     "those (use NVFP4_config_llama or MXFP4_config_llama)")


def _plan(model: nn.Module, layers: dict, fmt: QuantFormat, head: str
          ) -> tuple[dict[str, QuantLinear], list[str], list[str]]:
    """({packed name: module}, quantized modules written dense, modules whose input quantization is dropped)."""
    output_head = model.get_output_embeddings()
    packed, dense, dropped = {}, [], []
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding) and module.is_quantized:
            dense.append(name)
        if not isinstance(module, QuantLinear):
            continue
        if module.input_rotation.inner is not None:
            raise ValueError(f"{name} rotates its input online (BlockHadamard / ResidualRotation's online Hadamard), "
                             "which the compressed-tensors export cannot express")
        if not module.is_quantized:
            continue
        params = layers.get(name)
        if not isinstance(params, QuantParams):
            raise ValueError(f"{name} is quantized but `layers` has no QuantParams for it")
        _check_params(name, params, fmt)
        if module is output_head and head == "dense":
            dense.append(name)
            if params.act_format is not None:
                dropped.append(name)
        else:
            packed[name] = module
    return packed, dense, dropped


def _check_params(name: str, params: QuantParams, fmt: QuantFormat) -> None:
    if params.act_channel_shift is not None:
        raise ValueError(f"{name} has FPQ channel shifts, which the compressed-tensors layout cannot express")
    if params.weight_format != fmt or params.act_format not in (None, fmt):
        raise ValueError(f"{name} is {params.weight_format} weights / {params.act_format} inputs; the export writes "
                         f"{fmt} weights with {fmt} or unquantized inputs")
    if params.weight_block_scale is not None:
        raise ValueError(f"{name} has searched block scales (BlockScaleStep), which the export does not write yet")
    if fmt == NVFP4 and torch.unique(params.weight_max_value).numel() != 1:
        raise ValueError(f"{name} has per-row NVFP4 ranges; compressed-tensors holds one global scale per tensor "
                         "(weight_granularity per_tensor)")


def _fused_groups(model: nn.Module, packed: dict[str, QuantLinear]) -> list[list[str]]:
    """The packed Linears as groups: the ones reading one norm's output (q/k/v, gate/up: what vLLM fuses) together,
    every other alone."""
    names = {id(module): name for name, module in model.named_modules()}
    grouped: list[list[str]] = []
    for block in decoder_layers(model):
        prefix = names[id(block)]
        for _, linears in architecture_of(block).norm_linear_pairs:
            group = [f"{prefix}.{linear}" for linear in linears if f"{prefix}.{linear}" in packed]
            if len(group) > 1:
                grouped.append(group)
    members = {name for group in grouped for name in group}
    return grouped + [[name] for name in packed if name not in members]


@dataclass
class _Findings:
    """ExportReport's per-Linear entries, filled group by group."""

    reencoded: dict[str, tuple[int, float]] = field(default_factory=dict)
    mismatches: dict[str, int] = field(default_factory=dict)
    ulps: dict[str, int] = field(default_factory=dict)
    shared_input: list[str] = field(default_factory=list)


def _pack_group(group: list[str], packed: dict[str, QuantLinear], layers: dict, fmt: QuantFormat,
                findings: _Findings) -> dict[str, torch.Tensor]:
    """The tensors of one group's Linears, encoded under one range (NVFP4: the group's largest)."""
    ranges = {name: layers[name].weight_max_value.detach().float().max().cpu() for name in group}
    shared_range = max(ranges.values())
    encoded, tensors = {}, {}
    for name in group:
        # on the weight's own device: quantize's float32 steps round differently on the CPU and on CUDA, so a weight
        # quantized on a GPU is encoded (and re-encoded) there, and only the codes move
        weight = packed[name].weight.detach()
        group_range = shared_range.to(weight.device)
        if fmt == NVFP4 and ranges[name] != shared_range:
            written = quantize(weight.float(), fmt, group_range).to(weight.dtype)
            changed = written != weight
            findings.reencoded[name] = (int(changed.sum()), float((written.float() - weight.float()).abs().max()))
            weight = written
        here = encode(weight.float(), fmt, group_range)
        if not torch.equal(decode(here).to(weight.dtype), weight):
            raise RuntimeError(f"{name}: its weight is not on the {fmt} grid of its range (changed after calibration?)")
        encoded[name] = here.to("cpu")
    global_scale = None
    if fmt == NVFP4:
        pairs = _code_pairs(list(encoded.values()))
        global_scale, distance, _ = _global_scale(pairs, encoded[group[0]].tensor_scale, shared_range)
    for name in group:
        tensors[f"{name}.weight_packed"] = pack_nibbles(encoded[name].codes)
        pairs = _code_pairs([encoded[name]])
        if fmt == NVFP4:
            tensors[f"{name}.weight_scale"] = encoded[name].block_scale
            tensors[f"{name}.weight_global_scale"] = global_scale.reshape(1)
            findings.ulps[name] = distance
            findings.mismatches[name] = _mismatches(pairs, encoded[name].tensor_scale, global_scale)
        else:
            tensors[f"{name}.weight_scale"] = encoded[name].block_exponent
            findings.mismatches[name] = _mismatches(pairs, None, None)
    act_ranges = {name: layers[name].act_max_value for name in group if layers[name].act_format is not None}
    if fmt == NVFP4 and act_ranges:  # MX activation scales are per block only
        smallest = min(value.detach().float().cpu().reshape(()) for value in act_ranges.values())
        for name, value in act_ranges.items():
            if value.detach().float().cpu().reshape(()) != smallest:
                findings.shared_input.append(name)
            tensors[f"{name}.input_global_scale"] = _reciprocal_scale(smallest).reshape(1)
    return tensors


def _reciprocal_scale(max_value: torch.Tensor) -> torch.Tensor:
    """fl32(448 * 6 / max_value): compressed-tensors' global scale of a tensor with absolute maximum max_value
    (llm-compressor's generate_gparam), the range floored as this project's tensor scale floors it."""
    return torch.tensor(448.0 * 6.0) / max_value.float().clamp(min=_TINY)


class _Pairs(NamedTuple):
    """The distinct (E2M1 magnitude code, block-scale byte) pairs of some tensors' non-zero elements, and how many
    elements hold each: what an element decodes to depends on nothing else (and, for NVFP4, the global scale)."""

    magnitude: torch.Tensor
    byte: torch.Tensor
    count: torch.Tensor
    fmt: QuantFormat


def _code_pairs(encoded: list[Encoded]) -> _Pairs:
    counts = torch.zeros(8 * 256, dtype=torch.int64)
    for item in encoded:
        scale = item.block_scale.view(torch.uint8) if item.block_scale is not None else item.block_exponent
        byte = scale.to(torch.int64).repeat_interleave(item.fmt.block.size, dim=-1)
        counts += torch.bincount(((item.codes & _MAGNITUDE_BITS).to(torch.int64) * 256 + byte).flatten(),
                                 minlength=8 * 256)
    keys = torch.nonzero(counts).flatten()
    keys = keys[keys >= 256]  # magnitude 0 decodes to zero under any scale
    return _Pairs(keys // 256, keys % 256, counts[keys], encoded[0].fmt)


def _pair_values(pairs: _Pairs, tensor_scale: torch.Tensor | None, global_scale: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(simulated, library) bfloat16 values of each pair: the project's decode of a block holding the pair's code,
    and `library_weight_values`."""
    magnitude, byte, _, fmt = pairs
    size = fmt.block.size
    codes = torch.zeros(len(byte), size, dtype=torch.uint8)
    codes[:, 0] = magnitude.to(torch.uint8)
    fp4 = code_table(fmt)[magnitude] / 2  # the E2M1 table is twice OCP's FP4 values
    if fmt == NVFP4:
        scale = byte.to(torch.uint8).view(torch.float8_e4m3fn)
        block = Encoded(fmt, codes, SERVING_DTYPE, block_scale=scale.unsqueeze(-1), tensor_scale=tensor_scale)
        library = library_weight_values(fp4, scale.float(), global_scale)
    else:
        block = Encoded(fmt, codes, SERVING_DTYPE, block_exponent=byte.to(torch.uint8).unsqueeze(-1))
        library = library_weight_values(fp4, torch.exp2(byte.float() - 127), None)
    return decode(block)[:, 0], library


def _mismatches(pairs: _Pairs, tensor_scale: torch.Tensor | None, global_scale: torch.Tensor | None) -> int:
    simulated, library = _pair_values(pairs, tensor_scale, global_scale)
    return int(pairs.count[simulated != library].sum())


def _global_scale(pairs: _Pairs, tensor_scale: torch.Tensor, max_value: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(gs, its distance in ulps from fl32(448 * 6 / max_value), elements decoded differently): the nearest float32
    within GLOBAL_SCALE_ULPS under which every pair decodes to its simulated value, else the one with fewest
    mismatches (nearest first)."""
    start = _reciprocal_scale(max_value).reshape(()).view(torch.int32)
    best = None
    for distance in sorted(range(-GLOBAL_SCALE_ULPS, GLOBAL_SCALE_ULPS + 1), key=lambda d: (abs(d), d < 0)):
        candidate = (start + distance).view(torch.float32)
        count = _mismatches(pairs, tensor_scale, candidate)
        if best is None or count < best[2]:
            best = (candidate, distance, count)
        if count == 0:
            break
    return best


def _dense_tensors(model: nn.Module, packed: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """Every state_dict tensor the packed ones do not replace, under the names of the unswapped model: a QuantLinear
    keeps weight (unless packed) and bias, not its activation buffers; a QuantEmbedding's table is <name>.weight."""
    linears = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    embeddings = {n for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    tensors = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in linears:
            if leaf == "bias" or (leaf == "weight" and owner not in packed):
                tensors[key] = tensor
            continue
        if owner.rpartition(".")[0] in linears:  # input_rotation's buffers (refused unless empty)
            continue
        parent = owner.removesuffix(".embedding")
        tensors[f"{parent}.{leaf}" if parent in embeddings else key] = tensor
    return tensors


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, contiguous, none sharing memory with another (safetensors stores no shared memory)."""
    stored, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        stored[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return stored


def _write(directory: Path, tensors: dict, config: dict, model: nn.Module, tokenizer, max_shard_bytes: int,
           config_name: str) -> None:
    """The folder, built in a temporary folder beside `directory` and renamed onto it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        shards = _shards(tensors, max_shard_bytes)
        metadata = {"format": "pt", "quant_config": config_name}
        weight_map = {}
        for index, shard in enumerate(shards, 1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, temporary / file, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (temporary / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
        (temporary / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        os.chmod(temporary, 0o777 & ~current_umask())
        if directory.exists():
            directory.rmdir()  # empty, checked on entry
        os.rename(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most max_shard_bytes each (a larger tensor alone)."""
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards
