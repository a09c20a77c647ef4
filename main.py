"""LLM-FP4: calibrate FP (or INT) post-training quantization of a causal LM, save it, evaluate it with lm-eval.

    python main.py --model hf-causal-experimental --model_args pretrained=PATH,use_accelerate=True \
        --tasks piqa --device cuda --batch_size auto --no_cache --num_fewshot 0 \
        --quant_config FPQ_config_llama --qbits 4 4 4 2 2 2 --calib_size 32 --search_round 3 \
        --search_intervals 0.01 1.2 100

Every flag is explained by `python main.py --help` and in README.md.
"""

from __future__ import annotations

import sys

from utils.run.reproducible import pin_cpu_numerics

pin_cpu_numerics()  # before torch loads: the same parameter file on every CPU (utils/run/reproducible.py)


def main(argv: list[str] | None = None) -> int:
    """Parse, build, call. Bad input: one line on stderr, exit code 2, no traceback."""
    from utils.run.errors import USER_ERRORS

    try:
        from utils.run.cli import parse_args
        from utils.run.pipeline import run

        run(parse_args(argv))
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to continue a calibration from its checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
