"""Full precision through plain lm-eval: lm-eval's own `hf` model class loads the model folder by itself (no code
of main.py on the model path), on the same local task data. docs/results.md compares it with the full_precision
row (the issue asks for 0.1 point).

    python bench/plain_lm_eval.py --output docs/results/SmolLM2-135M/plain_lm_eval.json
    python bench/plain_lm_eval.py --model path/to/model.gguf --output ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.report.evaluation import write_results  # noqa: E402
from utils.data.models import ModelLoadError, gguf_to_folder, smollm2_gguf_path  # noqa: E402
from utils.data.task_data import get_task_specs  # noqa: E402

TASKS = "arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande,lambada_openai"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder or .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--batch_size", default="64")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=None, help="first N documents per task (a quick check)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    import lm_eval

    path = Path(args.model) if args.model else smollm2_gguf_path()
    try:
        folder = gguf_to_folder(path) if path.suffix == ".gguf" else path
    except ModelLoadError as e:
        sys.exit(str(e))
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype={args.dtype}",
                                      tasks=get_task_specs(args.tasks.split(",")), num_fewshot=0,
                                      batch_size=args.batch_size, device=args.device, limit=args.limit)
    results.pop("samples", None)
    results["plain_lm_eval"] = {"model": str(path), "hf_folder": str(folder),
                                "eval_seconds": time.perf_counter() - start}
    write_results(args.output, results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
