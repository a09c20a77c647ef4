"""main.py with `<RECIPE>_smooth<ALPHA>_config_llama`: a recipe (default NVFP4, round to nearest; e.g.
NVFP4_4over6_search_gptq) after SmoothQuant's migration at one strength alpha for every norm (the `smooth` component
has 0.5; `smoothfit` fits it per norm). A probe's config, registered for this process only, so that
bench/cpu_smooth_alpha.sh can sweep alpha through main.py's own pipeline.

    python bench/smooth_alpha.py ALPHA [RECIPE] [main.py's flags, without --quant_config]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from main import main  # noqa: E402  (first: it pins the CPU numerics before torch loads)
from configs.recipes import RECIPES, recipe  # noqa: E402
from utils.search.transforms import SmoothQuant  # noqa: E402


def smooth_config_name(alpha: float, base: str = "NVFP4") -> str:
    """Register the recipe `base` (family_components) with `smooth` at SmoothQuant(alpha); returns its --quant_config
    name. ValueError for an alpha outside (0, 1) or a base that is not a family and components of configs/recipes.py."""
    family, *components = base.split("_")
    config = recipe(family, (*components, "smooth"))
    name = f"{base}_smooth{alpha:g}_config_llama"
    transforms = tuple(SmoothQuant(alpha=alpha) if isinstance(t, SmoothQuant) else t for t in config.transforms)
    RECIPES[name] = dataclasses.replace(config, name=name, transforms=transforms)
    return name


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    flags = sys.argv[2:]
    base = flags.pop(0) if flags and not flags[0].startswith("-") else "NVFP4"
    try:
        name = smooth_config_name(float(sys.argv[1]), base)
    except ValueError as error:  # not a number, TransformError (outside (0, 1)), or an unknown recipe
        sys.exit(f"bench/smooth_alpha.py: ALPHA in (0, 1) and a recipe of configs/recipes.py: {error}")
    sys.exit(main(flags + ["--quant_config", name]))
