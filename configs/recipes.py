"""Recipes beyond the paper (issue 20), built from components instead of one file each.

A recipe is a family and the components it adds, named `<family>_<components>_config_llama`, e.g.
`NVFP4_search_gptq_rot_config_llama`:

family   NVFP4  E2M1 in blocks of 16, E4M3 block scales under a float32 tensor scale (NVFP4_BLOCKS)
         MXFP4  E2M1 in blocks of 32, E8M0 block scales (MX_BLOCKS)
         FPQ    the paper's per-channel ExMy search with per-tensor static activations and FPQ's shifts
4over6   (NVFP4) each block scaled to 6 or to 4, whichever has the lower error (NVFP4_4OVER6_BLOCKS)
search   (block families) the paper's search on the block format: a static clip of the activations' dynamic block
         maxima (ActBlockClipStep), then each weight block's scale against the layer-output error (BlockScaleStep)
tensor   (NVFP4) the paper's range search on the float32 tensor scales of weights and activations (the range steps;
         MX scales are powers of two from the data and have none). Not in `search`: on a random 1536 x 576 Linear
         it lowered the output error by 0.12% in 34 s, where the clip, block-scale and GPTQ steps together took 10 s
         and lowered it by 25% (bench/step_costs.py, 2-core CPU; bench/results/step_costs_cpu.json).
gptq     GPTQ's error-compensating rounding under the frozen scales (GPTQStep, --gptq_damping, --gptq_block)
gptqout  GPTQ aimed at the exact output error's minimiser W* = W - V G'^-1 instead of W (GPTQOutputStep): its
         rounding also compensates the error of the Linear's own quantized input (GPTAQ's asymmetric calibration).
         In place of gptq; not in the combinations: EXTRA_RECIPES runs it alone and on the best recipes. It fits the
         calibration tokens: CPU probe NVFP4_gptqout 39.78 against NVFP4_gptq 31.59 held-out ppl, and per Linear at
         32k calibration tokens a lower calibration error than GPTQ but a higher held-out one (docs/results.md note 8)
rot      QuaRot's randomised Hadamard rotation of the residual stream, with the online Hadamard before down_proj
         (ResidualRotation; refused on Gemma3)
had32    (MXFP4, in place of rot) an online Hadamard of each run of 32 input channels (one MX block) before every
         decoder Linear, folded into its weight (BlockHadamard(32)); the norms keep their gains. On SmolLM2-135M at the
         CPU probe scale, MXFP4 W4A4 round to nearest: held-out ppl 218.9 without rotation, 158.8 with rot, 100.3 with
         had32; rot folds the norm gains into gate/up and whitens the error, which the model's massive activation
         channels then amplify (docs/results/SmolLM2-135M/rotation_probe_cpu/README.md). GPU rows (SmolLM2-135M,
         docs/results.md note 6): MXFP4_gptq 74.76 -> MXFP4_gptq_had32 44.38; the block-scale search on top, 50.87
had16    (NVFP4, in place of rot) the same with runs of 16 input channels (one NVFP4 block), BlockHadamard(16): round
         to nearest alone lost at the CPU probe scale (held-out ppl 46.2 against 37.4), kept to measure it with GPTQ,
         with which published results report a gain
smooth   (NVFP4) SmoothQuant's migration (alpha 0.5) folded into the norms before q/k/v and gate/up, ahead of any block
         Hadamard: the activations' outlier channels moved into the weights before both are cut into blocks. Not in
         the combinations: EXTRA_RECIPES runs it on round to nearest and on the best recipe. On the GPU (SmolLM2-135M,
         16 x 1024 held-out tokens, docs/results.md note 6): NVFP4_4over6_search_gptq 27.68 -> 26.57 with it
smoothfit (NVFP4) `smooth` with each norm's strength fitted: of no migration and alpha in SMOOTH_ALPHAS, the one
         with the lowest round-to-nearest output error of the Linears after the norm (SmoothQuant(search_alphas)).
         Round to nearest at the CPU probe scale on SmolLM2-135M: held-out ppl 37.4 without migration, 32.2 with
         alpha 0.5 for every norm, 30.9 fitted; on the best recipe 27.4 at 0.5 and 27.6 fitted
         (docs/results/SmolLM2-135M/recipes_heldout_cpu/). One alpha for every norm, 0.2 .. 0.95: 36.0, 34.3, 31.7,
         32.2, 31.4, 31.2, 30.6, 31.9, 30.5 (bench/cpu_smooth_alpha.sh, smooth_alpha_cpu/): none stands out from
         0.6 up; ahead of the best recipe 0.5 .. 0.8 all lie within 27.2 .. 27.6. Not in the combinations:
         EXTRA_RECIPES runs it like `smooth`
ohad32   (FPQ, after rot) an online Hadamard of each run of 32 channels of o_proj's input, the attention output,
         which the residual rotation leaves unrotated (BlockHadamard(32) on self_attn.o_proj; QuaRot rotates it per
         head). Not in the combinations: EXTRA_RECIPES runs FPQ_gptq_rot_ohad32. CPU probe (SmolLM2-135M,
         recipes_heldout_cpu/, held-out ppl): FPQ 122.74, FPQ_gptq_rot 69.02, FPQ_gptq_rot_ohad32 66.62;
         64-channel blocks (one head of SmolLM2) 68.76 (rotation_probe_cpu/, bench/cpu_rotation.sh)
headsmooth SmoothQuant's migration (alpha 0.5) between the final norm and the output head: the final norm absorbs
         1 / s, the head's columns take s (SmoothQuant(at_head=True)); `smooth` stops at the decoder blocks. Only the
         head quantized, round to nearest, on Qwen2.5-Coder-1.5B (bench/head_probe.py, 4 x 1024 held-out tokens, 2-core
         CPU): NVFP4 13.85 -> 13.65 (full precision 13.40), alpha 0.75 13.64, 0.25 13.85; MXFP4 14.96 -> 14.45.
         Not in the combinations: EXTRA_RECIPES runs it on round to nearest and on the best NVFP4 recipe
headhad32 an online Hadamard of each run of 32 channels of the head's input, folded into the head's weight
         (BlockHadamard(32, at_head=True)); `had32` stops at the decoder blocks. The same probe: MXFP4 14.96 -> 13.90,
         NVFP4 13.85 -> 13.81 (16-blocks 14.03). Not in the combinations: EXTRA_RECIPES runs it on round to nearest
         and on the best MXFP4 recipe, alone and after headsmooth. CPU probe (SmolLM2-135M, recipes_heldout_cpu/):
         MXFP4 218.86 -> 128.10 with headhad32, 110.02 with headsmooth and headhad32; MXFP4_gptq_had32 45.64 ->
         37.05 with headhad32, 36.47 with both
shared   (NVFP4) one weight range and one input range for the Linears that read one input (q/k/v, gate/up), taken
         after the range search and before the further steps: one float32 tensor scale per fused weight, what vLLM's
         fused NVFP4 kernels require (QuantConfig.share_input_ranges). Not in the combinations: EXTRA_RECIPES runs it
         on round to nearest and on the best recipe, to measure what it costs: nothing measurable on SmolLM2-135M's
         GPU row (NVFP4_4over6_search_gptq 27.68 either way, docs/results.md note 6)
fpends   the output head and the token embedding left in full precision, as other toolkits ship them by default
         (without it, both are quantized: the project's stricter default)

Per family: every combination of search (block families), gptq and rot, each also with NVFP4's 4over6 or tensor and,
in place of rot, with NVFP4's had16 or MXFP4's had32; each of these with fpends, and fpends alone (the family's round to nearest, or
FPQ, with the head and embedding in full precision). Steps run in the order listed, after the family's own range
search (FPQ) or MinMax.
"""

from __future__ import annotations

import dataclasses
import itertools

from configs import QuantConfig
from quant_layers.formats import MX_BLOCKS, NVFP4_4OVER6_BLOCKS, NVFP4_BLOCKS
from utils.search.act_blocks import ActBlockClipStep
from utils.search.block_scales import BlockScaleStep
from utils.search.gptq import GPTQOutputStep, GPTQStep
from utils.search.residual_rotation import ResidualRotation
from utils.search.transforms import BlockHadamard, SmoothQuant

FAMILIES = {
    "NVFP4": QuantConfig(name="NVFP4", format_kind="fp", search=False, act_channel_shift=False,
                         weight_granularity="per_tensor", block=NVFP4_BLOCKS),
    "MXFP4": QuantConfig(name="MXFP4", format_kind="fp", search=False, act_channel_shift=False,
                         weight_granularity="per_tensor", block=MX_BLOCKS),
    "FPQ": QuantConfig(name="FPQ", format_kind="fp", search=True, act_channel_shift=True),
}
def _before_block_transforms(config: QuantConfig, transform) -> tuple:
    """config's transforms with `transform` (a per-block one) after the model-wide ones and before the other per-block
    ones (SmoothQuant's per-channel scales must be folded before a Hadamard mixes the channels)."""
    model_wide = tuple(t for t in config.transforms if t.scope == "model")
    return model_wide + (transform,) + tuple(t for t in config.transforms if t.scope != "model")


O_PROJ_INPUT = ("self_attn.o_proj",)  # ohad32's Linear: the attention output, the input `rot` leaves unrotated
SMOOTH_ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # smoothfit's candidate strengths (besides no migration)

COMPONENTS = {  # name: the change it makes to a config, applied in this order
    "4over6": lambda config: dataclasses.replace(config, block=NVFP4_4OVER6_BLOCKS),
    "tensor": lambda config: dataclasses.replace(config, search=True),
    "search": lambda config: dataclasses.replace(config, steps=config.steps + (ActBlockClipStep, BlockScaleStep)),
    "gptq": lambda config: dataclasses.replace(config, steps=config.steps + (GPTQStep,)),
    "gptqout": lambda config: dataclasses.replace(config, steps=config.steps + (GPTQOutputStep,)),
    "rot": lambda config: dataclasses.replace(config, transforms=(ResidualRotation(),) + config.transforms),
    "had16": lambda config: dataclasses.replace(config, transforms=config.transforms + (BlockHadamard(16),)),
    "had32": lambda config: dataclasses.replace(config, transforms=config.transforms + (BlockHadamard(32),)),
    "smooth": lambda config: dataclasses.replace(config, transforms=_before_block_transforms(config, SmoothQuant())),
    "smoothfit": lambda config: dataclasses.replace(
        config, transforms=_before_block_transforms(config, SmoothQuant(search_alphas=SMOOTH_ALPHAS))),
    "ohad32": lambda config: dataclasses.replace(
        config, transforms=config.transforms + (BlockHadamard(32, linears=O_PROJ_INPUT),)),
    "headsmooth": lambda config: dataclasses.replace(
        config, transforms=config.transforms + (SmoothQuant(at_head=True),)),
    "headhad32": lambda config: dataclasses.replace(
        config, transforms=config.transforms + (BlockHadamard(32, at_head=True),)),
    "shared": lambda config: dataclasses.replace(config, share_input_ranges=True),
    "fpends": lambda config: dataclasses.replace(config, lm_head=False, embedding=False),
}
FAMILY_COMPONENTS = {"NVFP4": ("search", "gptq", "rot"), "MXFP4": ("search", "gptq", "rot"), "FPQ": ("gptq", "rot")}
FAMILY_EXTRAS = {"NVFP4": ("4over6", "tensor")}  # each added to every combination of the family's own
FAMILY_ROTATIONS = {"NVFP4": ("had16",), "MXFP4": ("had32",)}  # in place of rot: added to every other combination
EXTRA_RECIPES = (("NVFP4", ("shared",)), ("NVFP4", ("4over6", "search", "gptq", "shared")),  # beside the combinations
                 ("NVFP4", ("smooth",)), ("NVFP4", ("4over6", "search", "gptq", "smooth")),
                 ("NVFP4", ("smoothfit",)), ("NVFP4", ("4over6", "search", "gptq", "smoothfit")),
                 ("NVFP4", ("gptqout",)), ("NVFP4", ("4over6", "search", "gptqout")),
                 ("NVFP4", ("4over6", "search", "gptqout", "smooth")), ("MXFP4", ("gptqout",)),
                 ("MXFP4", ("gptqout", "had32")), ("FPQ", ("gptqout", "rot")),
                 ("FPQ", ("gptq", "rot", "ohad32")),  # QuaRot's set on the paper's format: o_proj's input rotated too
                 ("NVFP4", ("headsmooth",)), ("NVFP4", ("4over6", "search", "gptq", "smooth", "headsmooth")),
                 ("MXFP4", ("headhad32",)), ("MXFP4", ("headsmooth", "headhad32")),
                 ("MXFP4", ("gptq", "had32", "headhad32")), ("MXFP4", ("gptq", "had32", "headsmooth", "headhad32")),
                 ("NVFP4", ("4over6", "search", "gptq", "smooth", "fpends")))  # the NVFP4 pick as toolkits ship it


def recipe(family: str, components: tuple[str, ...]) -> QuantConfig:
    """The recipe of `family` with `components` (names of COMPONENTS, applied in COMPONENTS' order); ValueError
    (one line) for an unknown family or component."""
    unknown = [c for c in components if c not in COMPONENTS]
    if family not in FAMILIES or unknown:
        raise ValueError(f"no recipe {family}_{'_'.join(components)}: families {', '.join(FAMILIES)}, components "
                         f"{', '.join(COMPONENTS)}")
    config = FAMILIES[family]
    ordered = [c for c in COMPONENTS if c in components]
    for component in ordered:
        config = COMPONENTS[component](config)
    return dataclasses.replace(config, name=f"{family}_{'_'.join(ordered)}_config_llama")


def _component_sets(family: str) -> list[tuple[str, ...]]:
    own = FAMILY_COMPONENTS[family]
    combos = [combo for count in range(len(own) + 1) for combo in itertools.combinations(own, count)]
    sets = combos + [(extra,) + combo for extra in FAMILY_EXTRAS.get(family, ()) for combo in combos]
    sets += [combo + (rotation,) for rotation in FAMILY_ROTATIONS.get(family, ()) for combo in list(sets)
             if "rot" not in combo]
    return sets[1:] + [components + ("fpends",) for components in sets]  # () + fpends: the family as toolkits ship it


RECIPES = {config.name: config for config in [recipe(family, components) for family in FAMILIES
                                                for components in _component_sets(family)]
           + [recipe(family, components) for family, components in EXTRA_RECIPES]}
