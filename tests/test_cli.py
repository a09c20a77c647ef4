"""main.py end to end on a tiny generated Llama: the paper's two commands and --only_eval.

Bad input is tested in test_reliability.py."""

import json
import shlex

import pytest

from conftest import ROOT, run_main
from utils.run.cli import parse_args
from utils.search.space import SearchSpace

CALIBRATE = (
    "--model hf-causal-experimental --model_args pretrained={model},use_accelerate=True "
    "--tasks arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande --device cpu --batch_size auto "
    "--no_cache --num_fewshot 0 --quant_config FPQ_config_llama --qbits 4 4 4 2 2 2 --calib_size 32 "
    "--search_round 3 --search_intervals 0.01 1.2 100"
)
EVALUATE = (
    "--model hf-causal-experimental --model_args pretrained={model},use_accelerate=True "
    "--tasks arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande --device cpu --batch_size auto "
    "--no_cache --num_fewshot 0 --quant_config FPQ_config_llama --qbits 4 4 4 2 2 2 --only_eval "
    "--ptq_param_path ./search_result/FPQ_config_llama/W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt"
)


def test_paper_commands_parse(tiny_llama_dir):
    args = parse_args(shlex.split(CALIBRATE.format(model=tiny_llama_dir)))
    assert args.model_args.pretrained == str(tiny_llama_dir) and args.model_args.use_accelerate
    assert args.qbits.tag() == "W4A4E4" and args.space.search_intervals == (0.01, 1.2, 100)
    assert args.calib_size == 32 and args.space.search_round == 3 and not args.only_eval
    assert len(args.tasks) == 7 and args.batch_size == "auto" and args.no_cache
    args = parse_args(shlex.split(EVALUATE.format(model=tiny_llama_dir)))
    assert args.only_eval and args.ptq_param_path.endswith("search_intervals(0.01,1.2,100).pt")


def test_calibrate_then_only_eval_end_to_end(tiny_llama_dir, calib_text_file, tmp_path):
    """The paper's command shape on a tiny random Llama (CPU, small settings); then --only_eval on the file."""
    common = ["--model", "hf-causal-experimental", "--model_args", f"pretrained={tiny_llama_dir},use_accelerate=True",
              "--tasks", "piqa,lambada_openai", "--device", "cpu", "--batch_size", "4", "--no_cache",
              "--num_fewshot", "0", "--quant_config", "FPQ_config_llama", "--qbits", "4", "4", "4", "2", "2", "2",
              "--limit", "6"]
    results = tmp_path / "calibrated.json"
    first = run_main(*common, "--calib_size", "2", "--calib_seqlen", "48", "--search_round", "2",
                     "--search_intervals", "0.01", "1.2", "10", "--calib_data", calib_text_file,
                     "--output_path", results, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    param_file = tmp_path / "search_result/FPQ_config_llama/W4A4E4_search_round2_search_intervals(0.01,1.2,10).pt"
    assert param_file.is_file() and param_file.with_suffix(".safetensors").is_file()
    calibrated = json.loads(results.read_text())
    quant = calibrated["quantization"]
    assert quant["quant_config"]["name"] == "FPQ_config_llama" and quant["qbits"] == [4, 4, 4, 2, 2, 2]
    assert quant["param_file_sha256"] and quant["search"]["search_round"] == 2
    assert "|piqa" in first.stdout.replace(" ", "")  # lm-eval's markdown table
    again = tmp_path / "only_eval.json"
    original_spelling = str(param_file).replace(",10).pt", ",10.0).pt")
    second = run_main(*common, "--only_eval", "--ptq_param_path", original_spelling, "--output_path", again,
                      cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(again.read_text())["results"] == calibrated["results"]
    assert json.loads(again.read_text())["quantization"]["param_file_sha256"] == quant["param_file_sha256"]
    assert quant["code_fingerprint"] == json.loads(again.read_text())["quantization"]["code_fingerprint"]


def test_full_precision_run_has_no_quantization(tiny_llama_dir, tmp_path):
    out = tmp_path / "fp.json"
    result = run_main("--model_args", f"pretrained={tiny_llama_dir}", "--tasks", "piqa", "--device", "cpu",
                      "--limit", "4", "--output_path", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["quantization"]["quant_config"] is None


@pytest.mark.parametrize("script", sorted(p for p in (ROOT / "complete_scripts").glob("*/*.sh")
                                          if p.name not in ("env.sh", "fetch_model.sh")))
def test_every_row_script_parses(script):
    """Each complete_scripts row is one main.py command whose flags pass validation (env variables filled)."""
    text = script.read_text().replace("\\\n", " ")
    command = next(line for line in text.splitlines() if line.startswith("python3 main.py"))
    filled = (command.replace('"$MODEL_ARGS"', "use_accelerate=True").replace('"$TASKS"', "piqa")
              .replace('"$DEVICE"', "cpu").replace('"$BATCH_SIZE"', "auto").replace("$OUT", "out"))
    args = parse_args(shlex.split(filled)[2:])
    assert args.output_path == f"out/{script.stem}.json"
    assert args.quant_config is None or args.calib_size in (32, 128)


def test_search_flags_reach_the_search_space():
    """--search_intervals, --search_space and the cheaper-step flags become the SearchSpace the calibration uses."""
    from configs import get_config
    from utils.run.pipeline import _calib_settings

    args = parse_args(["--quant_config", "FPQ_config_llama", "--search_intervals", "0.5", "1.5", "20",
                       "--search_space", "bias", "--act_coarse_tokens", "1024", "--act_refine", "2",
                       "--weight_refine", "8"])
    space = _calib_settings(args, get_config("FPQ_config_llama")).space
    assert (space.search_intervals, space.search_space) == ((0.5, 1.5, 20), "bias")
    assert (space.act_coarse_tokens, space.act_refine, space.weight_refine) == (1024, 2, 8)
    defaults = _calib_settings(parse_args(["--quant_config", "FPQ_config_llama"]), get_config("FPQ_config_llama"))
    assert defaults.space == SearchSpace()  # the flags' defaults are the knobs' own


def test_every_search_knob_is_a_flag_with_its_help_and_default():
    """One source of truth: each SearchSpace knob appears in --help with its help text and default, and the
    parameter file's search metadata has one key per knob."""
    from utils.run.cli import build_parser

    text = build_parser().format_help().replace("\n", " ")
    for knob in SearchSpace.flags():
        assert f"--{knob.name}" in text
        assert knob.metadata["help"].split()[0] in text
    assert set(SearchSpace().metadata()) == {knob.name for knob in SearchSpace.flags()}
    assert "(default: 32)" in text and "(default: 0.01 1.2 100)" in text
