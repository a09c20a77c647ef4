"""MinMax FP: the --qbits formats, ranges from absolute maxima, no search."""

from configs import QuantConfig

CONFIG = QuantConfig(name="MinMax_config_llama", format_kind="fp", search=False, act_channel_shift=False)
