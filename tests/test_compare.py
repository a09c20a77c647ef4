"""The side-by-side table of results files."""

import json
from pathlib import Path

import pytest

from conftest import ROOT
from utils.report.compare import comparison_table, main


def _write(path, acc, ppl, quant):
    path.write_text(json.dumps({"results": {"piqa": {"acc,none": acc},
                                            "lambada_openai": {"acc,none": 0.5, "perplexity,none": ppl}},
                                "quantization": quant}))
    return path


def test_table_columns_rows_and_mean(tmp_path):
    fp = _write(tmp_path / "fp.json", 0.7, 20.0, {"quant_config": None})
    fpq = _write(tmp_path / "fpq.json", 0.6, 80.5, {"quant_config": {"name": "FPQ_config_llama"},
                                                     "qbits": [4, 4, 4, 2, 2, 2], "search": {"sequential": True}})
    lines = comparison_table([fp, fpq]).splitlines()
    assert lines[0] == "| task | full precision | FPQ W4A4E4 sequential |"
    assert "| piqa | 70.00 | 60.00 |" in lines
    assert "| lambada_openai ppl | 20.00 | 80.50 |" in lines
    assert lines[-1] == "| mean accuracy | 60.00 | 55.00 |"


def test_missing_file_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such results file: {tmp_path / 'nope.json'}"


def test_results_report_informative_tasks_and_averages():
    """A task counts as informative when full precision is >= 5 points above chance; averages need every task."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import results_report

    accs = {"boolq": 0.41, "piqa": 0.647, "hellaswag": 0.337, "winogrande": 0.506, "arc_easy": 0.516,
            "arc_challenge": 0.247, "openbookqa": 0.206, "lambada_openai": 0.28}
    results = {"results": {t: {"acc,none": a} for t, a in accs.items()}}
    assert results_report.informative_tasks(results) == ["piqa", "hellaswag", "arc_easy", "lambada_openai"]
    assert results_report.mean([1.0, 2.0]) == 1.5 and results_report.mean([1.0, None]) is None
    assert results_report.signed(100 * (26.472 / 26.474 - 1), 1) == "+0.0"  # -0.008 %: no "-0.0"
    assert results_report.signed(-0.004, 2) == "+0.00" and results_report.signed(-0.26, 1) == "-0.3"
    assert results_report.signed(2.849, 2) == "+2.85"


def test_results_report_appends_notes_in_number_order():
    """Notes 1 .. 15 follow each other by their number, not their name ("10_" sorts before "9_" as text)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import results_report

    names = ["15_e.md", "9_d.md", "10_c.md", "1_b.md", "1_a.md"]
    ordered = sorted((Path(n) for n in names), key=results_report.note_order)
    assert [p.name for p in ordered] == ["1_a.md", "1_b.md", "9_d.md", "10_c.md", "15_e.md"]


def test_results_report_gap_closed_and_probe_runs(tmp_path):
    """The share of a gap is (value - reference) / (full - reference); a log without its JSON still gives its held-out
    perplexity and calibration seconds, a JSON takes precedence over its own log, an unfinished log gives nothing."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import results_report

    assert results_report.gap_closed(40.0, 30.0, 50.0) == 50.0
    assert results_report.gap_closed(-27.6, -36.43, -19.82) == pytest.approx(100 * 8.83 / 16.61)
    assert results_report.gap_closed(1.0, 2.0, 2.0) is None and results_report.gap_closed(None, 1.0, 2.0) is None
    (tmp_path / "A_gptq.log").write_text("calibration finished in 97.5 s\nheld-out perplexity (16 x 1024 tokens of "
                                         "x (sha256 ab)): 31.691\nRunning loglikelihood requests: 15%")
    (tmp_path / "B.log").write_text("calibrating blocks: 23/30")
    (tmp_path / "C.log").write_text("held-out perplexity (t): 99.0")
    (tmp_path / "C.json").write_text(json.dumps({"quantization": {"calib_seconds": 5.0,
                                                                  "heldout_perplexity": {"perplexity": 12.5}}}))
    runs = {r["recipe"]: (r["ppl"], r["calib_seconds"]) for r in results_report.probe_runs(tmp_path)}
    assert runs == {"A_gptq": (31.691, 97.5), "C": (12.5, 5.0)}


def test_results_report_judges_only_recipes_with_the_reference_coverage(tmp_path, monkeypatch):
    """Issue 20's targets compare recipes that quantize what the reference rows quantize: a recipe with the head and
    embedding in full precision (fpends) is listed but never the family's judged best, however low its perplexity."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import results_report

    assert results_report.covers_all("FPQ_gptq_rot") and not results_report.covers_all("FPQ_gptq_rot_fpends")

    def row(ppl: float, acc: float) -> dict:
        return {"results": {t: {"acc,none": acc} for t in results_report.PAPER_TASKS},
                "quantization": {"heldout_perplexity": {"perplexity": ppl}}}

    for name, (ppl, acc) in {"FPQ_gptq_rot": (18.0, 0.55), "FPQ_gptq_rot_fpends": (15.0, 0.60)}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(row(ppl, acc)))
    base = {"full_precision": row(10.0, 0.60), "MinMax_FP": row(1e6, 0.30)}
    monkeypatch.setitem(results_report.RECIPE_FAMILIES, "FPQ", ("MinMax_FP", {"M": 85}))
    lines = results_report.recipes_section("M", tmp_path, base)
    judged = [line for line in lines if line.startswith("- FPQ:")]
    assert judged == ["- FPQ: `FPQ_gptq_rot` (of 1 FPQ recipes run) closes 83% (6-task) and 83% (informative) of the "
                      "gap from MinMax_FP; target 85% on both: **missed**."]


def test_results_report_reads_recipe_rows_run_with_other_settings(tmp_path, monkeypatch):
    """A row named <recipe>_calib128 is that recipe run with --calib_size 128: listed after its recipe, judged with the
    recipe's coverage, said so above the table; a suffix on a name that is no recipe is not a row."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import results_report

    assert results_report.recipe_of("FPQ_gptq_rot_calib128") == "FPQ_gptq_rot"
    assert results_report.recipe_of("FPQ_gptq_rot") == "FPQ_gptq_rot"
    assert not results_report.covers_all("FPQ_gptq_rot_fpends_calib128")

    def row(ppl: float, acc: float) -> dict:
        return {"results": {t: {"acc,none": acc} for t in results_report.PAPER_TASKS},
                "quantization": {"heldout_perplexity": {"perplexity": ppl}}}

    for name, (ppl, acc) in {"FPQ_gptq_rot_calib128": (17.0, 0.58), "FPQ_gptq_rot": (18.0, 0.55),
                             "FPQ_gptq_rot_fpends_calib128": (15.0, 0.60), "FPQ_bogus_calib128": (1.0, 0.6)}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(row(ppl, acc)))
    assert list(results_report.recipe_rows(tmp_path)) == ["FPQ_gptq_rot", "FPQ_gptq_rot_calib128",
                                                          "FPQ_gptq_rot_fpends_calib128"]
    base = {"full_precision": row(10.0, 0.60), "MinMax_FP": row(1e6, 0.30)}
    monkeypatch.setitem(results_report.RECIPE_FAMILIES, "FPQ", ("MinMax_FP", {"M": 85}))
    lines = results_report.recipes_section("M", tmp_path, base)
    assert any("`<recipe>_calib128`: the recipe run with `--calib_size 128`." in line for line in lines)
    judged = [line for line in lines if line.startswith("- FPQ:")]
    assert judged == ["- FPQ: `FPQ_gptq_rot_calib128` (of 2 FPQ recipes run) closes 93% (6-task) and 93% "
                      "(informative) of the gap from MinMax_FP; target 85% on both: **met**."]


def test_results_report_ablation_takes_probes_where_no_row_ran():
    """A component alone with a row shows its task average; one with only a GPU probe shows the probe's perplexity
    (marked, no task average); a combination only probed is listed after the rows; one with neither is named."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import results_report

    ppl = {"NVFP4": 40.0, "NVFP4_search": 30.0, "NVFP4_search_gptq": 25.0, "full_precision": 20.0}
    info = {"NVFP4": 38.0, "NVFP4_search": 40.5, "NVFP4_search_gptq": 41.0, "full_precision": 44.0}
    recipes = {"NVFP4_search": {}, "NVFP4_search_gptq": {}}
    probed = {"NVFP4_gptq": {"ppl": 32.0}, "NVFP4_search_gptq_fpends": {"ppl": 24.0}, "NVFP4_bogus_x": {"ppl": 1.0}}
    lines = results_report.ablation_lines(recipes, {"NVFP4": {}}, ppl, info, probed)
    assert "| search | 30.00 | 0.75x | 40.50 | +2.50 |" in lines
    assert "| gptq (probe) | 32.00 | 0.80x | - | - |" in lines
    assert "| search + gptq | 25.00 | 0.62x | 41.00 | +3.00 |" in lines
    assert "| search + gptq + fpends (probe) | 24.00 | 0.60x | - | - |" in lines
    assert not any("bogus" in line for line in lines)
    named = next(line for line in lines if line.startswith("Not run alone yet:"))
    assert "search," not in named and "gptq," not in named and "rot" in named and "fpends" in named


def test_results_report_attention_rows_against_their_w4a4_row(tmp_path, monkeypatch):
    """A base's KV and attention rows are read against the base's W4A4 row (perplexity ratio, informative points),
    a GPU probe's log stands in for a row without results (marked), and a variant with neither says so."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import results_report

    monkeypatch.setattr(results_report, "ROOT", tmp_path)
    (tmp_path / "complete_scripts" / "M").mkdir(parents=True)
    for row in ("B_kv8", "B_kv4", "B_kv4_attn4"):
        (tmp_path / "complete_scripts" / "M" / f"{row}.sh").write_text("")
    folder = tmp_path / "results"
    (folder / "heldout_wave9_gpu").mkdir(parents=True)

    def write(row, acc, ppl, **quant):
        (folder / f"{row}.json").write_text(json.dumps({"results": {"piqa": {"acc,none": acc}}, "quantization": {
            "heldout_perplexity": {"perplexity": ppl}, "device": "NVIDIA H100 80GB HBM3", **quant}}))

    write("full_precision", 0.70, 10.0)
    write("B", 0.60, 20.0)
    write("B_kv8", 0.59, 21.0, kv_cache={"format": "E4M3", "key_granularity": "per_channel",
                                         "value_granularity": "per_token"})
    (folder / "heldout_wave9_gpu" / "B_kv4.log").write_text("held-out perplexity (t): 30.0")
    lines = results_report.attention_section("M", folder)
    assert "| B | + KV8 | 21.00 | +5.0% | 59.00 | -1.00 | E4M3 K per_channel, V per_token | - | H100 |" in lines
    assert "| B | + KV4 | 30.00 | +50.0% | - |  | - | - | (probe) |" in lines
    assert "| B | + KV4, Q and P at 4 bits | not run | | | | | | |" in lines


def test_runs_of_one_config_get_titles_that_say_what_differs(tmp_path):
    """Two FPQ runs that differ in calib_size are told apart by it; a rerun identical in every setting gets its
    file's name; search settings an older file lacks count as their legacy value (weight_refine 0)."""
    def fpq(calib_size, **more):
        return {"quant_config": {"name": "FPQ_config_llama"}, "qbits": [4, 4, 4, 2, 2, 2],
                "search": {"search_round": 3, "sequential": False, "calib_size": calib_size, **more}}

    small = _write(tmp_path / "calib32.json", 0.6, 80.0, fpq(32))
    large = _write(tmp_path / "calib128.json", 0.62, 70.0, fpq(128))
    assert comparison_table([small, large]).splitlines()[0] == (
        "| task | FPQ W4A4E4 calib_size=32 | FPQ W4A4E4 calib_size=128 |")
    rerun = _write(tmp_path / "rerun.json", 0.61, 79.0, fpq(32, weight_refine=0))
    assert comparison_table([small, large, rerun]).splitlines()[0] == (
        "| task | FPQ W4A4E4 (calib32) | FPQ W4A4E4 calib_size=128 | FPQ W4A4E4 (rerun) |")


def test_help_exits_zero_and_no_files_is_a_one_line_usage_error(capsys):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "utils.report.compare", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: python -m utils.report.compare RESULTS.json [RESULTS.json ...]")
    assert "Side-by-side table of several results JSON files" in done.stdout
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the following arguments are required: RESULTS.json")


def test_a_file_that_is_not_results_is_one_line(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    assert main([str(other)]) == 2
    assert capsys.readouterr().err == f"error: {other} is not a results JSON written by main.py (no 'results' table)\n"


def test_calib_7b_runs_a_recipe_with_transforms(tmp_path, monkeypatch):
    """bench/calib_7b.py on the CPU's tiny LLaMA shape with a recipe whose parameters include a transform
    (SmoothQuant's scales carry no MSE): one run file and the two target files, the MSE mean over Linears only."""
    import subprocess
    import sys

    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    recipe = "NVFP4_smooth_config_llama"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "calib_7b.py"), "--layers", "1", "--calib_size", "2",
                           "--seqlen", "32", "--candidates", "4", "--rounds", "1", "--quant_config", recipe],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-400:]
    run = json.loads((tmp_path / f"calib_7b_{recipe}_L1.json").read_text())
    assert run["layers"] == 1 and 0 < run["mean_mse_over_minmax"] <= 1 + 1e-4
    # one layer is not LLaMA-7B's 32: no minutes target from it, the peak ratio (every layer count) is written
    assert not (tmp_path / "calib_7b_best_recipe_minutes.json").exists()
    assert "minutes target not written: the largest run has 1 layers" in done.stdout
    assert json.loads((tmp_path / "calib_best_recipe_peak_mem_over_block_budget.json").read_text())["met"] is False


def test_calib_7b_minutes_come_from_the_32_layer_run(tmp_path, monkeypatch):
    """--summarize over an 8- and a 32-layer run file: the minutes are the 32-layer run's seconds / 60, the peak
    ratio the worst of the two."""
    import subprocess
    import sys

    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    recipe = "NVFP4_smooth_config_llama"
    common = {"config": {}, "calib_tokens": [32, 1024], "rounds": 3, "candidates": 100, "formats": "W4A4E4",
              "act_coarse_tokens": 4096, "offload": True, "device": "GPU X", "torch": "t", "triton": "t",
              "command": "c", "block_weights": 1, "calib_activations": 1, "mean_mse_over_minmax": 0.5,
              "search_dtype": "torch.bfloat16"}
    for layers, seconds, peak in ((8, 120.0, 30), (32, 540.0, 45)):
        run = {**common, "layers": layers, "seconds": seconds, "peak_bytes": peak, "budget": 50}
        (tmp_path / f"calib_7b_{recipe}_L{layers}.json").write_text(json.dumps(run))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "calib_7b.py"), "--summarize", "--quant_config",
                           recipe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-400:]
    minutes = json.loads((tmp_path / "calib_7b_best_recipe_minutes.json").read_text())
    assert minutes["value"] == 9.0 and minutes["met"] is True and minutes["target"] == "<= 15"
    peak = json.loads((tmp_path / "calib_best_recipe_peak_mem_over_block_budget.json").read_text())
    assert peak["value"] == 0.9 and peak["met"] is True
