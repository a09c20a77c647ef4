"""The search, in one place.

space.py    the knobs (SearchSpace: candidates, rounds, refinement; each field is also a flag and a metadata key)
problem.py  LinearProblem: the output error of many candidate quantizers of one Linear, batched
steps.py    the search as steps over one state (QuantParams): MinMax start, FPQ's channel shifts, weight and
            activation range steps, search_linear
block_scales.py  BlockScaleStep: the weight step at block granularity for block-scaled formats (NVFP4, MX)
gptq.py     GPTQStep: GPTQ's rounding of the weight under the state's frozen scales, stored as weight codes (aimed at
            W, or at the exact output error's minimiser: GPTQOutputStep)
act_blocks.py  ActBlockClipStep: the clipping multiplier of block-scaled activations' dynamic block scales
shared_ranges.py  share_tensor_ranges: one tensor range for Linears sharing an input (fused q/k/v, gate/up)
table.py    the token embedding's weight-only search
transforms.py  function-preserving transforms of a block fit on its inputs (SmoothQuant)
utils/quant_calib.py runs all of it block by block.
"""
