"""SmoothQuant W4A4 as the paper's comparison row: migration strength alpha 0.5 folded into the norms in
front of q/k/v and gate/up, then INT4 MinMax ranges (per output channel for weights, static per tensor for
activations); the token embedding stays in 16 bits."""

from configs import QuantConfig
from utils.search.transforms import SmoothQuant

CONFIG = QuantConfig(name="SmoothQuant_config_llama", format_kind="int", search=False, act_channel_shift=False,
                     embedding=False, transforms=(SmoothQuant(alpha=0.5),))
