"""The packed checkpoint's layout: file names, tensor names, and a quantized weight as tensors and back.

A packed export is a folder (docs/deployment.md, "Packed checkpoints"):

    model.safetensors      every tensor of the quantized model: the non-quantized ones under their state_dict
                           names, in the dtype the model had (norms, biases, unquantized Linears, transform
                           buffers such as '<linear>.input_rotation.inner'), and per quantized module M:
                             M.weight.codes           uint8 (two 4-bit codes per byte, low nibble first, when
                                                      the format has 4 bits and the row an even length), int32
                                                      for 9..16-bit formats; codes of the unfolded weight
                             M.weight.grid_inverse    float32 [rows, 1]          (ExMy, INT)
                             M.weight.block_scale     float8_e4m3fn [rows, in / 16], M.weight.tensor_scale
                                                      float32 [rows, 1]          (NVFP4)
                                                      (grid_inverse and tensor_scale are [] where every row
                                                      has the same range: per-tensor configs)
                             M.weight.block_exponent  uint8 [rows, in / 32]      (MX)
                             M.act_channel_shift      int8 [in]                  (FPQ's shifts k)
                             M.act_max_value          float32 []                 (the input's range)
                             M.act_block_clip         float32 []                 (a block format's searched clip)
                           header metadata "llm_fp4": a JSON object with format, version, the model dtype, the
                           module swap, per module its kind, formats, shape and ranges, and tensor aliases
    config.json            the Hugging Face config of the quantized model (untied head), to rebuild it offline
    tokenizer files        tokenizer.save_pretrained's
    llm_fp4_export.json    the marker: format, version, every file's bytes and sha256, the run that made it
                           (model fingerprint, config, qbits, search, parameter file and its sha256), the sizes

Only safetensors and JSON are read back; nothing in the folder is executed.
"""

from __future__ import annotations

import torch

from quant_layers.codes import Encoded, pack_nibbles, unpack_nibbles
from quant_layers.formats import QuantFormat

FORMAT = "llm-fp4-export"
VERSION = 1
MARKER = "llm_fp4_export.json"
WEIGHTS = "model.safetensors"
HEADER_KEY = "llm_fp4"
SCALE_FIELDS = ("grid_inverse", "block_scale", "tensor_scale", "block_exponent")
SCALE_DTYPES = {"grid_inverse": torch.float32, "block_scale": torch.float8_e4m3fn, "tensor_scale": torch.float32,
                "block_exponent": torch.uint8}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ExportError(ValueError):
    """A packed export that cannot be written or read (missing, truncated, tampered, mismatched, unknown
    version, or an unusable target folder): one line naming the file and what to do."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_key(name: str, kind: str) -> str:
    """The state_dict name of a quantized module's weight: QuantLinear 'M.weight', QuantEmbedding 'M.embedding.weight'."""
    return f"{name}.embedding.weight" if kind == "embedding" else f"{name}.weight"


def is_packed(fmt: QuantFormat, shape: tuple[int, ...]) -> bool:
    """Whether the codes of a weight of this format and shape are stored two per byte."""
    return fmt.bits == 4 and shape[-1] % 2 == 0


def weight_tensors(name: str, encoded: Encoded) -> dict[str, torch.Tensor]:
    """The file tensors of an encoded weight: M.weight.codes (packed where `is_packed`) and its scales."""
    codes = encoded.codes
    tensors = {f"{name}.weight.codes": pack_nibbles(codes) if is_packed(encoded.fmt, codes.shape) else codes}
    for field in SCALE_FIELDS:
        value = getattr(encoded, field)
        if value is not None:
            tensors[f"{name}.weight.{field}"] = value
    return tensors


def encoded_range_dims(encoded: Encoded) -> int | None:
    """How many dimensions the range-derived scale of an encoded weight has: 0 per tensor, 2 per row [rows, 1];
    None for MX (its scales are all per block)."""
    scale = encoded.grid_inverse if encoded.grid_inverse is not None else encoded.tensor_scale
    return None if scale is None else scale.dim()


def expected_scales(fmt: QuantFormat, rows: int, columns: int, ranges: str) -> dict[str, tuple[int, ...]]:
    """The scale tensors a weight [rows, columns] of fmt has, with their shapes; ranges "row" or "tensor"."""
    range_shape = (rows, 1) if ranges == "row" else ()
    if fmt.block is None:
        return {"grid_inverse": range_shape}
    blocks = (rows, columns // fmt.block.size)
    return {"block_exponent": blocks} if fmt.block.power_of_two else {"block_scale": blocks,
                                                                      "tensor_scale": range_shape}


def _checked(tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in tensors:
        raise ExportError(f"{WEIGHTS} has no tensor {key!r}, which its metadata needs")
    tensor = tensors[key]
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise ExportError(f"{WEIGHTS}: tensor {key!r} is {dtype_name(tensor.dtype)} {list(tensor.shape)}, expected "
                          f"{dtype_name(dtype)} {list(shape)}")
    return tensor


def weight_from_tensors(name: str, fmt: QuantFormat, shape: tuple[int, int], ranges: str, dtype: torch.dtype,
                        tensors: dict[str, torch.Tensor]) -> Encoded:
    """The Encoded weight of module `name` (codes unpacked; ranges "row" or "tensor"), every tensor checked for
    dtype and shape."""
    rows, columns = shape
    if ranges not in ("row", "tensor"):
        raise ExportError(f"{WEIGHTS}: module {name!r} has ranges {ranges!r}, expected 'row' or 'tensor'")
    code_dtype = torch.uint8 if fmt.bits <= 8 else torch.int32
    if fmt.block is not None and columns % fmt.block.size:
        raise ExportError(f"module {name!r}: {fmt.name} needs a multiple of {fmt.block.size} columns, got {columns}")
    if is_packed(fmt, shape):
        codes = unpack_nibbles(_checked(tensors, f"{name}.weight.codes", code_dtype, (rows, columns // 2)))
    else:
        codes = _checked(tensors, f"{name}.weight.codes", code_dtype, shape)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**fmt.bits):
        raise ExportError(f"{WEIGHTS}: tensor {name + '.weight.codes'!r} holds codes outside {fmt.name}'s {fmt.bits} bits")
    scales = {field: _checked(tensors, f"{name}.weight.{field}", SCALE_DTYPES[field], field_shape)
              for field, field_shape in expected_scales(fmt, rows, columns, ranges).items()}
    return Encoded(fmt, codes, dtype, **scales)
