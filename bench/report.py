"""Write docs/performance.md from the JSON files in bench/results/ (and its figure, when the scaling data exists).

    python bench/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
FIGURE = ROOT / "docs" / "figures" / "calib_scaling.png"

ORDER = ["calib_7b_minutes", "calib_speedup_vs_original", "calib_peak_mem_over_block_budget",
         "calib_7b_best_recipe_minutes", "calib_best_recipe_peak_mem_over_block_budget", "eval_throughput_ratio",
         "kernel_bandwidth_fraction", "cpu_quickstart_minutes", "packed_checkpoint_size_ratio",
         "fp8_gemm_speedup_vs_bf16", "fp8_eval_throughput_ratio", "packed_weight_memory_ratio",
         "packed_eval_throughput_ratio", "accumulation_noise_cpu"]
TITLES = {
    "calib_7b_minutes": "FPQ calibration of a LLaMA-7B shape (3 rounds x 100 candidates, 32 x 1024 tokens, all 4-bit formats)",
    "calib_speedup_vs_original": "our search vs a re-implementation of the original algorithm (the fastest of our "
                                 "configurations whose final MSE is not above the original's)",
    "calib_peak_mem_over_block_budget": "peak GPU memory / (one block's weights + its calibration activations + 2 GiB)",
    "calib_7b_best_recipe_minutes": "calibration of a LLaMA-7B shape (32 layers, 32 x 1024 tokens) with the best "
                                    "recipe, the NVFP4 pick (issue 20)",
    "calib_best_recipe_peak_mem_over_block_budget": "the best recipe's peak GPU memory / (one block's weights + its "
                                                    "calibration activations + 2 GiB) (issue 20)",
    "eval_throughput_ratio": "W4A4 simulated evaluation throughput / bf16 (lm-eval loglikelihood)",
    "kernel_bandwidth_fraction": "activation fake-quant kernel bytes/s / device-to-device copy bytes/s",
    "cpu_quickstart_minutes": "README command one on 2 CPU cores",
    "packed_checkpoint_size_ratio": "packed W4 checkpoint (--export_dir) / the bf16 checkpoint, SmolLM2-135M, worst "
                                    "W4 config",
    "fp8_gemm_speedup_vs_bf16": "FP8 execution's GEMM (fused activation quantizer + torch._scaled_mm) / bf16 GEMM, "
                                "LLaMA-7B shapes at 4096 and 16384 tokens, the worst shape",
    "fp8_eval_throughput_ratio": "--execution fp8 W4A4 evaluation throughput / bf16, Qwen2.5-Coder-1.5B",
    "packed_weight_memory_ratio": "packed NVFP4 Linear weights on the GPU / their bf16 bytes, Qwen2.5-Coder-1.5B",
    "packed_eval_throughput_ratio": "--execution packed NVFP4 evaluation throughput / bf16, Qwen2.5-Coder-1.5B",
    "accumulation_noise_cpu": "held-out perplexity spread of one W4A4 parameter file under three GEMM summation "
                              "orders (simulated, float64, fp8's reference), SmolLM2-135M FPQ",
}
TARGETS = {"calib_7b_minutes": "<= 10", "calib_speedup_vs_original": ">= 30x, equal or lower final layer MSE",
           "calib_peak_mem_over_block_budget": "<= 1.0 at 8 and 32 layers", "calib_7b_best_recipe_minutes": "<= 15",
           "calib_best_recipe_peak_mem_over_block_budget": "<= 1.0 at every layer count",
           "eval_throughput_ratio": ">= 0.8",
           "kernel_bandwidth_fraction": ">= 0.8", "cpu_quickstart_minutes": "<= 10",
           "packed_checkpoint_size_ratio": "<= 0.3", "fp8_gemm_speedup_vs_bf16": ">= 1.6",
           "fp8_eval_throughput_ratio": ">= 1.25", "packed_weight_memory_ratio": "<= 0.3",
           "packed_eval_throughput_ratio": ">= 0.9", "accumulation_noise_cpu": "informative (no target)"}
HOW = {
    "calib_7b_minutes": (
        "`bench/calib_7b.py`: `LlamaConfig` with LLaMA-7B sizes, random bf16 weights, random tokens, `--offload` "
        "(blocks in CPU memory, one on the GPU at a time), FPQ W4A4E4 with channel shifts, `SearchSpace((0.01, 1.2, "
        "100))`, 3 rounds, activation candidates ranked on 4096 strided tokens and the best 8 re-scored on all 32768. "
        "Each run writes `calib_7b_L<layers>.json`; `--summarize` turns them into the two target files."),
    "calib_7b_best_recipe_minutes": (
        "`bench/calib_7b.py --quant_config NVFP4_4over6_search_gptq_smooth_headsmooth_config_llama`: the same shape, "
        "tokens and offload as calib_7b_minutes, the recipe's steps (SmoothQuant and the head's smoothing, the NVFP4 "
        "4/6 block-scale search, the activation block clip, GPTQ). Run files "
        "`calib_7b_NVFP4_4over6_search_gptq_smooth_headsmooth_config_llama_L<layers>.json`; the minutes only from a "
        "32-layer run."),
    "calib_best_recipe_peak_mem_over_block_budget": (
        "`bench/calib_7b.py` with the recipe, as calib_peak_mem_over_block_budget (the worst ratio over the run "
        "files' layer counts; met only with more than one). Where the peak sits, step by step: `bench/mem_trace.py "
        "--quant_config ...` (`bench/results/mem_offload_llama7b_L2_S32_NVFP4_4over6_search_gptq_smooth_headsmooth_"
        "config_llama.txt`, GPU, the target's tokens; `mem_cpu_llama7b_L1_S2_..._config_llama.txt`, CPU, 2 x 1024 "
        "tokens)."),
    "calib_speedup_vs_original": (
        "`bench/original_search.py`: block 0 of the 32-layer 7B shape. The original (from "
        "`../shared/reference/original-code-digest.md`): one full 32-sequence forward of the whole model per Linear "
        "to capture its input and output, then one candidate at a time, losses summed one sequence at a time, "
        "the input re-quantized for every weight candidate, bias-multiplier candidates. Favoured here: its cached "
        "activations stay on the GPU and its products run in bf16. Measured on q_proj, gate_proj and down_proj "
        "(one Linear of each weight shape); k/v/o_proj and up_proj are counted at the time of the measured Linear "
        "of their shape. Ours: one capture pass of the block and our search on all 7 Linears, 3 rounds x 100 "
        "candidates, once per configuration (table below): the original's bias-multiplier candidates (the same "
        "search), our default max-value candidates, and the opt-in cheaper steps (`--weight_refine 8`, "
        "`--act_coarse_tokens 1024`, `--act_refine 2`). With `--repeats 3` every time is taken three times (each "
        "run: the original, then each of ours) and ratios are medians of the runs' ratios. The headline is the "
        "fastest configuration whose final MSE is not above the original's on every measured Linear; every "
        "configuration's ratio is in the file. Every block of the "
        "original costs the same, so the block ratio is the whole-model ratio; the whole-model time of the "
        "original is extrapolated (32 x block 0)."),
    "calib_peak_mem_over_block_budget": (
        "`bench/calib_7b.py`: `torch.cuda.max_memory_allocated()` over the whole calibration, against one block's "
        "bf16 weights + the activations calibration keeps for it (the captured inputs of q/k/v, o_proj, gate/up "
        "and down_proj in bf16, and the block's input and output hidden states) + 2 GiB, at 8 and 32 layers."),
    "eval_throughput_ratio": (
        "`bench/eval_throughput.py`: lm-eval 0.4 `simple_evaluate` through `HFLM`, batch 64, a 20-document warm-up "
        "before each timed run. SmolLM2-135M: full hellaswag (40168 requests), bf16, then the same model quantized "
        "with the saved FPQ file of `docs/results/SmolLM2-135M/gpu_piqa/`. LLaMA-7B shape (random weights, "
        "SmolLM2's tokenizer): hellaswag's first 200 documents, W4A4 E2M1 with channel scales. The value is the "
        "worse of the two."),
    "kernel_bandwidth_fraction": (
        "`bench/kernel_bandwidth.py`: x bf16 [32768, 4096]; the kernel reads x and writes q(x) (4 bytes per "
        "element), `y.copy_(x)` moves the same bytes; median of 50 CUDA-event timings after warm-up; the value is "
        "the worst of E2M1 per tensor, E2M1 with channel shifts and E4M3."),
    "cpu_quickstart_minutes": (
        "`bench/cpu_quickstart.sh`: `complete_scripts/quickstart.sh` (README command one) timed end to end on the "
        "development machine's 2 CPU cores (Intel Xeon), from a fresh clone, venv and empty cache (the one-time "
        "fetch of the model, tasks and calibration text included), with the pinned CPU numerics of "
        "`utils/run/reproducible.py` (calibration 242 s of it; docs/reliability.md)."),
    "packed_checkpoint_size_ratio": (
        "`bench/packed_size.py`: main.py calibrates the embedded SmolLM2-135M with tiny settings (sizes do not depend "
        "on them) and writes `--export_dir`; the value is model.safetensors' bytes over the bf16 checkpoint that "
        "`save_pretrained` writes for the original model (its tied head stored once), the worst of FPQ, NVFP4 and "
        "MXFP4 (W4A4E4; an fpends config is listed in the file, not judged). The export unties the head: it is a "
        "second 4-bit table of 49152 x 576, which is why the ratio is above 0.25; against the bf16 size of the "
        "same untied model FPQ is 0.254 (4.07 bits per parameter)."),
    "fp8_gemm_speedup_vs_bf16": (
        "`bench/fp8_gemm.py`: an FPQ E2M1 Linear (per-row weight ranges, shifts 0..3) as E4M3 codes; x bf16 [M, in]; "
        "fp8 = the fused Triton quantizer (E4M3 codes) + `torch._scaled_mm` with row-wise scales, against "
        "`torch.matmul` in bf16; median of 20 CUDA-event timings of one call after 5 warm-up calls (and, in the "
        "file, of 20 back-to-back calls and of `_scaled_mm` alone). Codes checked bit-exact against the reference and "
        "the GEMM against the float32 GEMM of the codes before timing. The value is the worst shape."),
    "fp8_eval_throughput_ratio": (
        "`bench/fp8_eval_throughput.py`: hellaswag's first 1000 documents through lm-eval in bf16, simulated FPQ "
        "W4A4 and `--execution fp8`, one run, a 20-document warm-up before each."),
    "packed_weight_memory_ratio": (
        "`bench/packed_gemm.py --parts model`: `torch.cuda.memory_allocated` before and after `use_execution(model, "
        "\"packed\", ...)` (the float weights freed) against the Linears' bf16 bytes."),
    "packed_eval_throughput_ratio": (
        "`bench/packed_gemm.py --parts model`: hellaswag's first 400 documents in bf16, simulated NVFP4 and packed "
        "NVFP4, one run, every kernel shape autotuned before timing."),
    "accumulation_noise_cpu": (
        "`bench/accumulation_noise.py`: the FPQ parameter file of the H100 row (committed as "
        "`docs/results/SmolLM2-135M/fp8_check/FPQ_params_h100.pt`) on the CPU in float32, held-out perplexity on 4 x "
        "1024 tokens with the simulated forward, with each Linear's operands summed in float64, and with "
        "`--execution fp8` (its float32 reference GEMM); the value is largest / smallest - 1, in %."),
}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def scaling_figure(data: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_size = {int(k): v for k, v in data["seconds_by_calib_size_at_100_candidates"].items()}
    by_count = {int(k): v for k, v in data["seconds_by_candidates_at_32_sequences"].items()}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot([s * data["shapes"]["seqlen"] for s in by_size], list(by_size.values()), "o-")
    axes[0].set_xlabel("calibration tokens")
    axes[1].plot(list(by_count), list(by_count.values()), "o-")
    axes[1].set_xlabel("candidates per format")
    for ax in axes:
        ax.set_ylabel("seconds per block")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)  # growth read against the whole time, not a zoomed axis
        ax.grid(alpha=0.3)
    fig.suptitle(f"FPQ search cost of one block: {data['shapes']['block'].split(' {')[0]} ({data['device']})",
                 fontsize=9)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120)
    return f"![calibration cost]({FIGURE.relative_to(DOC.parent).as_posix()})"


def speedup_section(data: dict, source: str, note: str) -> list[str]:
    """Each of our configurations in a bench/original_search.py file: time, ratio, final MSE against the original."""
    if "ours" not in data:
        return []
    original = data.get("original_block0_seconds_per_run", [data["original_block0_seconds"]])
    runs = (f"the original: {data['original_block0_seconds']:.1f} s per block" if len(original) == 1 else
            f"{len(original)} runs, each the original then ours; the original: "
            f"{' / '.join(f'{s:.1f}' for s in original)} s per block; times and ratios are medians over the runs")
    lines = [f"Configurations of `{source}` ({data['device']}, commit {data.get('commit', '?')}; {runs}){note}:", "",
             "| configuration | main.py flags | seconds per block | speedup | speedup per run | mean final MSE / "
             "original's | not above the original's |", "|---|---|---:|---:|---|---:|---|"]
    for spec, result in data["ours"].items():
        flags = data["configurations"][spec]
        flag_text = (f"`--search_space {flags['search_space']} --weight_refine {flags['weight_refine']} "
                     f"--act_coarse_tokens {flags['act_coarse_tokens']} --act_refine {flags.get('act_refine', 8)}`")
        per_run = " / ".join(f"{r:.1f}x" for r in result.get("speedup_per_run", [result["speedup"]]))
        mark = " (headline)" if spec == data["headline_configuration"] else ""
        lines.append(f"| {spec}{mark} | {flag_text} | {result['seconds']:.1f} | {result['speedup']:.1f}x | "
                     f"{per_run} | {result['mean_mse_over_original']:.4f} | "
                     f"{result['layers_with_mse_not_above_original']} |")
    return lines + [""]


SPEEDUP_FILES = {"calib_speedup_vs_original.json": "",
                 "history/calib_speedup_vs_original_H200_8b14b54.json": ", every configuration, before the weight proxy "
                                                                        "became one fused kernel (7e55bd7)"}


def scaling_text(data: dict) -> str:
    """How the block's time grows, in numbers read off the scaling file."""
    by_size = {int(k): v for k, v in data["seconds_by_calib_size_at_100_candidates"].items()}
    by_count = {int(k): v for k, v in data["seconds_by_candidates_at_32_sequences"].items()}
    (s0, t0), (s1, t1) = min(by_size.items()), max(by_size.items())
    (c0, u0), (c1, u1) = min(by_count.items()), max(by_count.items())
    slope = (u1 - u0) / (c1 - c0)
    return (f"From {s0} to {s1} calibration sequences the time per block goes from {t0:.1f} s to {t1:.1f} s "
            f"({t1 / t0:.2f}x for {s1 // s0}x the tokens): activation candidates are ranked on a fixed 4096-token "
            "subset and only the best 8 are scored on all tokens, and the weight step's cost (candidates x rows x "
            "inputs^2, through the inputs' second moments) does not depend on the token count. In candidates the "
            f"time grows nearly linearly: {slope:.3f} s per candidate (every format, round and Linear of the block) "
            f"above a fixed {u0 - slope * c0:.1f} s "
            f"({c0} candidates: {u0:.1f} s, {c1}: {u1:.1f} s).")


def gib(peaks: dict) -> str:
    return " / ".join(f"{value:.2f}" for value in peaks.values())


def multi_gpu_section() -> list[str]:
    """The split-calibration runs of bench/multi_gpu.py (issue 8), one table row per results file."""
    lines = ["## Calibration split over several GPUs", "",
             "`bench/multi_gpu.py`: the LLaMA-7B shape of `calib_7b.py` (same settings, all blocks on the GPUs, no "
             "`--offload`) dispatched by accelerate over every visible GPU with a balanced device map, as "
             "`use_accelerate=True` does; Triton's kernels warmed up on a 1-layer model first. `--compare` calibrates "
             "the same model on one GPU in the same run and compares formats, weight ranges and the logits of a "
             "probe batch. Peak memory is `torch.cuda.max_memory_allocated` per GPU.", "",
             "| layers | GPUs | card | seconds | peak GiB per GPU | `--compare` on one GPU: seconds | `--compare` on "
             "one GPU: peak GiB (cuda:0 / cuda:1) | split = one GPU | file |",
             "|---|---|---|---|---|---|---|---|---|"]
    files = sorted(RESULTS.glob("multi_gpu_L*gpu.json"),
                   key=lambda p: (json.loads(p.read_text())["layers"], json.loads(p.read_text())["gpus"]))
    notes = []
    for path in files:
        data = json.loads(path.read_text())
        if "note" in data:
            notes.append(f"- `{path.name}`: {data['note']}")
        if "single_gpu_seconds" in data:
            same = ("identical formats, weight ranges and logits" if data["same_formats"]
                    and data["max_relative_weight_range_difference"] == 0 and data["max_logit_difference"] == 0
                    else f"formats same: {data['same_formats']}, max logit difference {data['max_logit_difference']:g}")
            single = f"{data['single_gpu_seconds']:.1f} | {gib(data['single_gpu_peak_gib'])} | {same}"
        else:
            single = "| | "
        lines.append(f"| {data['layers']} | {data['gpus']} | {data['device']} | {data['seconds']:.1f} | "
                     f"{gib(data['peak_gib_per_gpu'])} | {single} | `bench/results/{path.name}` |")
    if not files:
        lines.append("| | | not measured yet | | | | | | |")
    return lines + ([""] + notes if notes else []) + [""]


def main() -> None:
    lines = ["# Performance", "",
             "Generated by `python bench/report.py` from `bench/results/*.json` (each written by the script named in "
             "its `command`; `commit` is the code that ran). GPU figures come from the lent GPU machine "
             "(the card is named per row), CPU figures from the 2-core development machine.", "",
             "| measure | target | measured | met | machine | file |", "|---|---|---|---|---|---|"]
    for name in ORDER:
        data = load(name)
        if data is None:
            lines.append(f"| {TITLES[name]} | {TARGETS[name]} | not measured yet | | | |")
            continue
        lines.append(f"| {TITLES[name]} | {data['target']} | {fmt(data['value'])} {data['unit']} | "
                     f"{'yes' if data['met'] else '**no**'} | {data['device']} | `bench/results/{name}.json` |")
    lines += ["", "## How each figure was measured", ""]
    for name in ORDER:
        lines += [f"**{name}**: {HOW[name]}", ""]
        if name == "calib_speedup_vs_original":
            for file, note in SPEEDUP_FILES.items():
                if (RESULTS / file).exists():
                    lines += speedup_section(json.loads((RESULTS / file).read_text()), f"bench/results/{file}", note)
    notes = RESULTS / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    lines += multi_gpu_section()
    scaling = load("calib_scaling")
    lines += ["## How the calibration cost grows", ""]
    if scaling:
        lines += [scaling_figure(scaling), "", f"Data: `bench/results/calib_scaling.json` (`bench/calib_scaling.py`; "
                  f"{scaling['shapes']['block']}, {scaling['device']}, commit {scaling.get('commit', '?')}). "
                  + scaling_text(scaling), ""]
    else:
        lines += ["`bench/calib_scaling.py` (one 7B-shaped block over calibration sizes and candidate counts) has not "
                  "run on the GPU yet; its figure appears here once `bench/results/calib_scaling.json` exists.", ""]
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
