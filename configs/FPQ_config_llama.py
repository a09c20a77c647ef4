"""LLM-FP4's FPQ: searched FP formats and ranges, plus per-channel activation exponent shifts."""

from configs import QuantConfig

CONFIG = QuantConfig(name="FPQ_config_llama", format_kind="fp", search=True, act_channel_shift=True)
