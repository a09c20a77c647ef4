"""NVIDIA NVFP4 as a reference row: E2M1 elements in blocks of 16 with FP8 E4M3 scales under one float32
scale per tensor, round to nearest, dynamic block scales (the per-tensor scale from calibration maxima)."""

from configs import QuantConfig
from quant_layers.formats import NVFP4_BLOCKS

CONFIG = QuantConfig(name="NVFP4_config_llama", format_kind="fp", search=False, act_channel_shift=False,
                     weight_granularity="per_tensor", block=NVFP4_BLOCKS)
