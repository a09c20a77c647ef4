"""OCP MXFP4 as a reference row: E2M1 elements in blocks of 32 with power-of-two (E8M0) scales, round to
nearest, dynamic block scales."""

from configs import QuantConfig
from quant_layers.formats import MX_BLOCKS

CONFIG = QuantConfig(name="MXFP4_config_llama", format_kind="fp", search=False, act_channel_shift=False,
                     weight_granularity="per_tensor", block=MX_BLOCKS)
