"""Packed checkpoints: a quantized model as codes, scales and its other tensors in one safetensors file, and the
loader that evaluates it (layout.py says what is where; docs/deployment.md, "Packed checkpoints")."""

from utils.export.layout import MARKER, WEIGHTS, ExportError
from utils.export.load import is_packed_export, load_packed, read_marker
from utils.export.write import check_target, export_packed, module_weight_codes

__all__ = ["MARKER", "WEIGHTS", "ExportError", "check_target", "export_packed", "is_packed_export", "load_packed",
           "module_weight_codes", "read_marker"]
