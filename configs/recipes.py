"""Recipes beyond the paper (issue 20), built from components instead of one file each.

A recipe is a family and the components it adds, named `<family>_<components>_config_llama`, e.g.
`NVFP4_search_gptq_rot_config_llama`:

family   NVFP4  E2M1 in blocks of 16, E4M3 block scales under a float32 tensor scale (NVFP4_BLOCKS)
         MXFP4  E2M1 in blocks of 32, E8M0 block scales (MX_BLOCKS)
         FPQ    the paper's per-channel ExMy search with per-tensor static activations and FPQ's shifts
search   (block families) each weight block's scale searched against the layer-output error (BlockScaleStep)
gptq     GPTQ's error-compensating rounding under the frozen scales (GPTQStep, --gptq_damping, --gptq_block)
rot      QuaRot's randomised Hadamard rotation of the residual stream, with the online Hadamard before down_proj
         (ResidualRotation; refused on Gemma3)
fpends   the output head and the token embedding left in full precision, as other toolkits ship them by default
         (without it, both are quantized: the project's stricter default)

Steps run in the order search, gptq after the family's own range search (FPQ) or MinMax (block families).
"""

from __future__ import annotations

import dataclasses
import itertools

from configs import QuantConfig
from quant_layers.formats import MX_BLOCKS, NVFP4_BLOCKS
from utils.search.block_scales import BlockScaleStep
from utils.search.gptq import GPTQStep
from utils.search.residual_rotation import ResidualRotation

FAMILIES = {
    "NVFP4": QuantConfig(name="NVFP4", format_kind="fp", search=False, act_channel_shift=False,
                         weight_granularity="per_tensor", block=NVFP4_BLOCKS),
    "MXFP4": QuantConfig(name="MXFP4", format_kind="fp", search=False, act_channel_shift=False,
                         weight_granularity="per_tensor", block=MX_BLOCKS),
    "FPQ": QuantConfig(name="FPQ", format_kind="fp", search=True, act_channel_shift=True),
}
COMPONENTS = {  # name: the change it makes to a config
    "search": lambda config: dataclasses.replace(config, steps=config.steps + (BlockScaleStep,)),
    "gptq": lambda config: dataclasses.replace(config, steps=config.steps + (GPTQStep,)),
    "rot": lambda config: dataclasses.replace(config, transforms=(ResidualRotation(),) + config.transforms),
    "fpends": lambda config: dataclasses.replace(config, lm_head=False, embedding=False),
}


def recipe(family: str, components: tuple[str, ...]) -> QuantConfig:
    """The recipe of `family` with `components` (in COMPONENTS order; "search" only for block families)."""
    config = FAMILIES[family]
    for component in components:
        config = COMPONENTS[component](config)
    return dataclasses.replace(config, name=f"{family}_{'_'.join(components)}_config_llama")


def _component_sets(family: str):
    own = [c for c in COMPONENTS if c != "search" or FAMILIES[family].block is not None]
    for count in range(1, len(own) + 1):
        for components in itertools.combinations(own, count):
            if components != ("fpends",):
                yield components


RECIPES = {config.name: config for config in (recipe(family, components) for family in FAMILIES
                                                for components in _component_sets(family))}
