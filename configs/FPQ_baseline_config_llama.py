"""LLM-FP4's FPQ baseline: searched FP formats and ranges, per-tensor activations without shifts."""

from configs import QuantConfig

CONFIG = QuantConfig(name="FPQ_baseline_config_llama", format_kind="fp", search=True, act_channel_shift=False)
