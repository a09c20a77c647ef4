"""Command line of main.py: the original LLM-FP4 flags, plus a few of our own, and their validation."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from configs import CONFIG_FILES, QBits, get_config
from configs.attention import AttentionPolicy
from configs.recipes import COMPONENTS, FAMILIES
from quant_layers.attention import GRANULARITIES
from utils.execution import EXECUTIONS
from utils.export.load import is_packed_export
from utils.search.space import SearchSpace

HF_MODEL_TYPES = ("hf-causal-experimental", "hf-causal", "hf", "hf-auto", "huggingface")
MODEL_ARG_KEYS = ("pretrained", "use_accelerate", "dtype", "trust_remote_code", "revision")
PAPER_TASKS = "arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande"


DEFAULT_QBITS = [4, 4, 4, 2, 2, 2]


class UsageError(ValueError):
    """A bad command line: one line saying what and how to fix it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + exits 2; we want one line via UsageError
        raise UsageError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag with a default shows it: '(default: 32)'."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
            text += f" (default: {shown})"
        return text


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    """One flag per SearchSpace knob (utils/search/space.py): name, default, help and validation come from there."""
    for knob in SearchSpace.flags():
        options = {k: v for k, v in knob.metadata.items() if k not in ("help", "legacy", "flag")}
        default = list(knob.default) if isinstance(knob.default, tuple) else knob.default
        p.add_argument(f"--{knob.name}", default=default, help=knob.metadata["help"], **options)


def search_space(args: argparse.Namespace) -> SearchSpace:
    """The SearchSpace of the parsed flags."""
    return SearchSpace(**{knob.name: tuple(value) if isinstance(value := getattr(args, knob.name), list) else value
                          for knob in SearchSpace.flags()})


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="main.py", formatter_class=_HelpFormatter,
                description="LLM-FP4: FP post-training quantization (calibrate, save, evaluate with lm-eval).")
    p.add_argument("--model", default="hf-causal-experimental",
                   help="lm-eval model type; hf-causal-experimental is an alias of lm-eval 0.4's 'hf'")
    p.add_argument("--model_args", default="",
                   help="pretrained=PATH|HUB_ID|FILE.gguf|EXPORT_DIR (empty: the embedded SmolLM2-135M-Instruct; "
                        "a folder written by --export_dir is evaluated as it is, with no --quant_config), "
                        "use_accelerate=True (device_map=auto), dtype=auto|float32|bfloat16|float16, "
                        "trust_remote_code=False, revision=main")
    p.add_argument("--tasks", default=PAPER_TASKS, help="comma-separated lm-eval task names")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--batch_size", default="1",
                   help="evaluation batch size: an integer or 'auto' (lm-eval probes the largest that fits on a GPU; "
                        "on the CPU, where that probe takes minutes, auto means 8)")
    p.add_argument("--no_cache", action="store_true",
                   help="accepted for the original commands; lm-eval 0.4 does not cache model answers unless asked")
    p.add_argument("--num_fewshot", type=int, default=0, help="few-shot examples per task")
    p.add_argument("--limit", type=float, default=None,
                   help="evaluate only the first N documents of each task (a fraction if < 1)")
    p.add_argument("--output_path", default=None,
                   help="results JSON file (lm-eval's results + a 'quantization' block); default "
                        "results/<config>_<qbits>_<date-time>.json")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and of lm-eval")
    p.add_argument("--quant_config", default=None,
                   help=f"one of {', '.join(CONFIG_FILES)}, or a recipe "
                        f"<{'|'.join(FAMILIES)}>_<components>_config_llama (configs/recipes.py; components in this "
                        f"order: {', '.join(COMPONENTS)}); omit for the full-precision model")
    p.add_argument("--qbits", type=int, nargs="+", default=None,
                   help="W A E w_exp a_exp e_exp: bits of weights, activations, embedding, then their (starting) "
                        f"exponent bits; 16 bits = not quantized (default with --quant_config: "
                        f"{' '.join(map(str, DEFAULT_QBITS))}; with --only_eval: the parameter file's)")
    p.add_argument("--calib_size", type=int, default=32, help="number of calibration sequences")
    p.add_argument("--calib_seqlen", type=int, default=1024, help="tokens per calibration sequence")
    p.add_argument("--calib_data", default=None,
                   help="calibration text: .txt or .jsonl with a 'text' field (default: C4, or its packaged excerpt offline)")
    _add_search_flags(p)
    p.add_argument("--kv_format", default=None, metavar="FORMAT",
                   help="quantize the KV cache (keys after RoPE and values, as cached; also the K and V inputs of the "
                        "attention matmuls) to FORMAT: E2M1, E4M3, INT8, INT4, NVFP4, MXFP4, ... (at most 8 bits, "
                        "signed); default: full precision")
    p.add_argument("--kv_granularity", nargs=2, default=["per_channel", "per_token"], metavar=("KEY", "VALUE"),
                   choices=GRANULARITIES,
                   help="ranges of K and V: per_tensor, per_head, per_channel (K only; static ranges searched against "
                        "the attention output on the calibration data) or per_token (dynamic: each token's own maximum)")
    p.add_argument("--attn_format", default=None, metavar="FORMAT",
                   help="quantize Q before Q K^T to FORMAT (per token, dynamic); K and V are the cache's (--kv_format)")
    p.add_argument("--attn_p_format", default=None, metavar="FORMAT",
                   help="quantize the softmax probabilities P before P V to FORMAT with range 1 (P lies in [0, 1]; "
                        "an unsigned format fits it, e.g. UE3M1 at 4 bits); attention then runs eagerly")
    p.add_argument("--offload", action="store_true",
                   help="keep the decoder blocks in CPU memory and move one at a time to --device for calibration "
                        "(GPU memory: one block), then place the model for evaluation with accelerate (GPU first)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate block l+1 on the outputs of the already quantized block l")
    p.add_argument("--only_eval", action="store_true", help="skip calibration: load --ptq_param_path and evaluate")
    p.add_argument("--heldout_ppl", type=int, default=0, metavar="N",
                   help="also report perplexity on N windows of --calib_seqlen tokens of held-out text (exllamav2's "
                        "Wikipedia excerpt: neither calibration nor evaluation data), a development metric")
    p.add_argument("--plot", action="store_true",
                   help="also write the per-layer figure of the parameter file (formats, exponent biases, MSE vs "
                        "MinMax) next to the results JSON, as <results>.layers.png")
    p.add_argument("--ptq_param_path", default=None,
                   help="parameter file written by a calibration run; with --only_eval its --quant_config and --qbits "
                        "are used where the command gives none")
    p.add_argument("--search_result_dir", default="search_result", help="where calibration writes parameter files")
    p.add_argument("--export_dir", default=None, metavar="DIR",
                   help="after calibration (or with --only_eval, from the parameter file) write the quantized model "
                        "as a packed checkpoint to DIR: model.safetensors (4-bit codes two per byte, scales, shifts "
                        "and the non-quantized tensors), config.json, the tokenizer and llm_fp4_export.json; "
                        "evaluate it with --model_args pretrained=DIR. A non-empty DIR is refused unless it holds an "
                        "export of the same run")
    p.add_argument("--execution", default="simulated", choices=list(EXECUTIONS),
                   help="how evaluation computes the quantized Linears: "
                        + "; ".join(f"{name}: {execution.help}" for name, execution in EXECUTIONS.items()))
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted calibration from its checkpoint (<file>.partial.pt), or reuse the "
                        "finished file; an error if the checkpoint was made for another run. Without it a matching "
                        "checkpoint is continued too, and one that does not match is replaced")
    return p


@dataclass(frozen=True)
class ModelArgs:
    pretrained: str | None = None
    use_accelerate: bool = False
    dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None


def _bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UsageError(f"--model_args {key}={value}: expected True or False")


def parse_model_args(text: str) -> ModelArgs:
    """'pretrained=X,use_accelerate=True' -> ModelArgs; unknown keys are an error."""
    values: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in MODEL_ARG_KEYS:
            raise UsageError(f"--model_args: unknown entry {item!r}; known keys: {', '.join(MODEL_ARG_KEYS)}")
        values[key] = _bool(key, value) if key in ("use_accelerate", "trust_remote_code") else value
    if values.get("dtype", "auto") not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--model_args dtype={values['dtype']}: use auto, float32, bfloat16 or float16")
    return ModelArgs(**values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; UsageError (one line) on any bad value."""
    args = build_parser().parse_args(argv)
    if args.model not in HF_MODEL_TYPES:
        raise UsageError(f"--model {args.model}: only Hugging Face causal LMs are supported ({', '.join(HF_MODEL_TYPES)})")
    args.model_args = parse_model_args(args.model_args)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        raise UsageError("--tasks is empty: give at least one task, e.g. --tasks piqa")
    try:
        explicit_qbits = args.qbits is not None
        args.qbits = QBits.parse(args.qbits) if explicit_qbits else None
        if args.quant_config is not None:
            config = get_config(args.quant_config)
            args.qbits = args.qbits or QBits.parse(DEFAULT_QBITS)
            args.qbits.formats(config)  # every format must be one the quantizer can compute
        args.space = search_space(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        attention = AttentionPolicy(args.kv_format, *args.kv_granularity, args.attn_format, args.attn_p_format)
    except ValueError as error:
        raise UsageError(str(error)) from None
    args.attention = attention if attention.enabled else None
    if args.attention and args.quant_config is None and not args.only_eval:
        raise UsageError("--kv_format / --attn_format / --attn_p_format quantize attention within a quantization run: "
                         "add --quant_config NAME (e.g. MinMax_config_llama --qbits 16 16 16 2 2 2 for attention alone)")
    if args.attention and args.export_dir is not None:
        raise UsageError("--export_dir: packed exports do not hold attention quantization yet; export without "
                         "--kv_format / --attn_format / --attn_p_format")
    if explicit_qbits and args.quant_config is None and not args.only_eval:
        raise UsageError("--qbits sets the bits of a quantization config: add --quant_config NAME (without one the "
                         "model runs in full precision)")
    if args.heldout_ppl < 0:
        raise UsageError(f"--heldout_ppl must be >= 0 windows, got {args.heldout_ppl}")
    if args.offload and args.model_args.use_accelerate:
        raise UsageError("--offload and use_accelerate=True both place the model: use one of them")
    for flag in ("calib_size", "calib_seqlen"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.num_fewshot < 0:
        raise UsageError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None:
        if args.limit <= 0:
            raise UsageError(f"--limit must be positive, got {args.limit:g}")
        args.limit = int(args.limit) if args.limit >= 1 else args.limit
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) >= 1):
        raise UsageError(f"--batch_size {args.batch_size}: use a positive integer or 'auto'")
    if args.only_eval and not args.ptq_param_path:
        raise UsageError("--only_eval needs --ptq_param_path FILE (the file a calibration run wrote under search_result/)")
    if args.ptq_param_path and not args.only_eval:
        raise UsageError("--ptq_param_path is read only with --only_eval")
    if args.plot and args.quant_config is None and not args.only_eval:
        raise UsageError("--plot draws a parameter file: use it with --quant_config or --only_eval")
    if args.export_dir is not None and args.quant_config is None and not args.only_eval:
        raise UsageError("--export_dir writes a quantized model: use it with --quant_config or with --only_eval "
                         "--ptq_param_path FILE")
    if args.execution != "simulated" and args.quant_config is None and not args.only_eval and not is_packed_export(
            args.model_args.pretrained):
        raise UsageError(f"--execution {args.execution} computes quantized Linears: add --quant_config NAME, "
                         "--only_eval --ptq_param_path FILE, or --model_args pretrained=EXPORT_DIR")
    if args.execution != "simulated" and args.offload:
        raise UsageError(f"--execution {args.execution}: evaluate without --offload (the model is converted on "
                         "--device whole)")
    if args.resume and (args.only_eval or args.quant_config is None):
        raise UsageError("--resume continues a calibration: use it with --quant_config and without --only_eval")
    return args
