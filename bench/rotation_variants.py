"""main.py with the rotation variants of the CPU rotation probe (bench/cpu_rotation.sh) as extra --quant_config
names: `<recipe>~<variant>`, a config or recipe (e.g. NVFP4_config_llama, MXFP4_gptq_config_llama) with its
transforms replaced by the variant's (VARIANTS). Registered in this process only, so a probe can compare rotations the
recipes do not name.

    python bench/rotation_variants.py <main.py flags> --quant_config 'NVFP4_gptq_config_llama~rot16'
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main  # noqa: E402  (pins CPU numerics before torch loads)
from configs import get_config  # noqa: E402
from configs.recipes import O_PROJ_INPUT, RECIPES  # noqa: E402
from utils.search.residual_rotation import ResidualRotation  # noqa: E402
from utils.search.transforms import BlockHadamard  # noqa: E402

VARIANTS = {
    "none": (),
    "rot": (ResidualRotation(),),  # full-width Hadamard of the residual stream + online Hadamard before down_proj
    "rotnoonline": (ResidualRotation(online_down_proj=False),),
    **{f"rot{size}": (ResidualRotation(hidden_block=size, down_proj_block=size),) for size in (16, 32, 64)},
    **{f"had{size}": (BlockHadamard(size),) for size in (16, 32, 64)},  # online block Hadamard of every Linear
    "rot_ohad64": (ResidualRotation(), BlockHadamard(64, linears=O_PROJ_INPUT)),  # the recipes' rot + ohad32 at 64
}


def register(name: str) -> None:
    """Add `<recipe>~<variant>` to RECIPES (the recipe's name without a variant is left as it is)."""
    base, _, variant = name.partition("~")
    if variant:
        RECIPES[name] = dataclasses.replace(get_config(base), name=name, transforms=VARIANTS[variant])


if __name__ == "__main__":
    argv = sys.argv[1:]
    register(argv[argv.index("--quant_config") + 1])
    sys.exit(main.main(argv))
