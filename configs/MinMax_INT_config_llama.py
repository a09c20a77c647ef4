"""MinMax INT (the paper's "MinMax INT Quant" row): symmetric INT, ranges from absolute maxima."""

from configs import QuantConfig

CONFIG = QuantConfig(name="MinMax_INT_config_llama", format_kind="int", search=False, act_channel_shift=False)
