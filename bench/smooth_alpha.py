"""main.py with `NVFP4_smooth<ALPHA>_config_llama`: NVFP4 round to nearest after SmoothQuant's migration at one strength
alpha for every norm (the `smooth` recipe has 0.5; `smoothfit` fits it per norm). A probe's config, registered for
this process only, so that bench/cpu_smooth_alpha.sh can sweep alpha through main.py's own pipeline.

    python bench/smooth_alpha.py ALPHA [main.py's flags, without --quant_config]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from main import main  # noqa: E402  (first: it pins the CPU numerics before torch loads)
from configs.recipes import RECIPES, recipe  # noqa: E402
from utils.search.transforms import SmoothQuant  # noqa: E402


def smooth_config_name(alpha: float) -> str:
    """Register NVFP4 round to nearest with SmoothQuant(alpha); returns its --quant_config name."""
    config = recipe("NVFP4", ("smooth",))
    name = f"NVFP4_smooth{alpha:g}_config_llama"
    RECIPES[name] = dataclasses.replace(config, name=name, transforms=(SmoothQuant(alpha=alpha),))
    return name


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    try:
        name = smooth_config_name(float(sys.argv[1]))
    except ValueError:  # not a number, or TransformError: outside (0, 1)
        sys.exit(f"bench/smooth_alpha.py: ALPHA must be a number in (0, 1), got {sys.argv[1]!r}")
    sys.exit(main(sys.argv[2:] + ["--quant_config", name]))
