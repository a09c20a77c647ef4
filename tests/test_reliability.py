"""Reliability: bad input gives one line (exit 2, no traceback, nothing left behind); calibration writes
atomically, resumes exactly after SIGKILL and is deterministic; parameter files load without running code.

docs/reliability.md lists every case with what main.py printed."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import main
from configs import QBits, get_config
from conftest import ROOT, RunsCode, make_llama, run_main
from quant_layers.modules import swap_modules
from utils.run.cli import parse_args
from utils.data.models import load_model
from utils.params import Checkpoint, ParamFileError, checkpoint_path, load_checkpoint, load_params, save_params
from utils.run.pipeline import quantize_model
from utils.quant_calib import CalibSettings, calibrate
from utils.search.space import SearchSpace

PARAM_NAME = "W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt"
FINAL_FILES = [PARAM_NAME, PARAM_NAME.replace(".pt", ".safetensors")]
BASE = ["--model_args", "pretrained={model}", "--tasks", "piqa", "--device", "cpu"]
MINMAX = ["--quant_config", "MinMax_config_llama", "--calib_data", "{calib}", "--calib_size", "2",
          "--calib_seqlen", "32"]
ONLY_EVAL = ["--only_eval", "--ptq_param_path"]
MINMAX_EVAL = ["--quant_config", "MinMax_config_llama", *ONLY_EVAL]


def _save_model(folder: Path, tokenizer, model) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _calibrate_only(argv: list[str]) -> dict:
    """What main.py does before evaluating: parse, load the model, calibrate (or load) and write the file."""
    args = parse_args(argv)
    model, tokenizer, info = load_model(args.model_args.pretrained, device="cpu")
    return quantize_model(model, tokenizer, info, args)


def _fill(argv: list[str], files: dict[str, Path]) -> list[str]:
    return [str(a).format(**files) for a in argv]


@pytest.fixture(scope="session")
def files(tmp_path_factory, tiny_llama_dir, tiny_tokenizer, calib_text_file) -> dict[str, Path]:
    """Every crafted input of the battery, made once."""
    root = tmp_path_factory.mktemp("inputs")
    f = {"model": tiny_llama_dir, "calib": calib_text_file, "root": root, "marker": root / "code_ran"}
    _calibrate_only(_fill(BASE + MINMAX + ["--search_result_dir", str(root / "search_result")], f))
    f["param"] = root / "search_result" / "MinMax_config_llama" / PARAM_NAME
    good = f["param"].read_bytes()
    f.update({"truncated": root / "truncated.pt", "foreign": root / "foreign.pt", "notes": root / "notes.pt",
              "bad_twin": root / "bad.safetensors", "evil": root / "evil.pt", "bad_magic": root / "bad_magic.gguf",
              "bad_gguf": root / "truncated.gguf", "short": root / "short.txt", "blocker": root / "blocker"})
    f["truncated"].write_bytes(good[: len(good) // 2])
    torch.save({"weight": torch.zeros(2)}, f["foreign"])
    f["notes"].write_text("my notes, not a parameter file\n")
    f["bad_twin"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    torch.save({"format": "llm-fp4-params", "version": 1, "metadata": RunsCode(f["marker"]), "tensors": {}}, f["evil"])
    f["bad_magic"].write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 4)
    f["bad_gguf"].write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10, 99) + b"\x05\x00" * 8)
    f["short"].write_text("Far too short.")
    f["blocker"].write_text("a file where a folder is expected\n")
    f["other"] = _save_model(root / "other_model", tiny_tokenizer, make_llama(len(tiny_tokenizer), seed=1))
    overflowing = make_llama(len(tiny_tokenizer))
    with torch.no_grad():
        overflowing.model.layers[0].mlp.up_proj.weight[:4] = 3e38  # finite weights, infinite activations
    f["overflow"] = _save_model(root / "overflow_model", tiny_tokenizer, overflowing)
    (root / "no_config").mkdir()
    f["no_config"] = root / "no_config"
    (root / "corrupt_config").mkdir()
    (root / "corrupt_config" / "config.json").write_text('{"model_type": "llama", ')
    f["corrupt_config"] = root / "corrupt_config"
    return f


# case id: (argv after BASE, what the error line must say, what it must offer as the fix)
CASES = {
    "qbits_count": (["--qbits", "4", "4", "4", "2", "2"], "--qbits takes 6 integers", "e.g. 4 4 4 2 2 2"),
    "qbits_zero": (["--qbits", "0", "4", "4", "2", "2", "2"], "weight bits must be in 2..16", "got 0"),
    "qbits_negative": (["--qbits", "4", "-4", "4", "2", "2", "2"], "activation bits must be in 2..16", "got -4"),
    "qbits_above_16": (["--qbits", "4", "4", "17", "2", "2", "2"], "embedding bits must be in 2..16", "got 17"),
    "qbits_exponent_not_below_bits_minus_1": (["--qbits", "4", "4", "4", "3", "2", "2"],
                                              "weight exponent bits must be in 1..2 for 4 bits", "below bits-1"),
    "qbits_exponent_zero": (["--qbits", "4", "4", "4", "2", "0", "2"], "activation exponent bits must be in 1..2",
                            "got 0"),
    "qbits_without_quant_config": (["--qbits", "4", "4", "4", "2", "2", "2"],
                                   "--qbits sets the bits of a quantization config", "add --quant_config"),
    "qbits_beyond_float32": (["--quant_config", "FPQ_config_llama", "--qbits", "12", "12", "12", "8", "8", "8"],
                             "E8M3 has 8 exponent bits", "at most 7"),
    "unknown_quant_config": (["--quant_config", "FPQ_config_bert"], "unknown --quant_config 'FPQ_config_bert'",
                             "choose one of: FPQ_config_llama"),
    "only_eval_without_param_path": (["--only_eval", "--quant_config", "FPQ_config_llama"],
                                     "--only_eval needs --ptq_param_path", "search_result/"),
    "param_path_without_only_eval": (["--ptq_param_path", "x.pt"], "--ptq_param_path is read only", "with --only_eval"),
    "search_intervals_a_above_b": (["--search_intervals", "1.2", "0.01", "100"], "--search_intervals 1.2 0.01 100",
                                   "need 0 < a < b"),
    "search_intervals_a_equals_b": (["--search_intervals", "0.5", "0.5", "10"], "--search_intervals 0.5 0.5 10",
                                    "need 0 < a < b"),
    "search_intervals_n_zero": (["--search_intervals", "0.01", "1.2", "0"], "--search_intervals 0.01 1.2 0",
                                "integer n >= 1"),
    "search_intervals_count": (["--search_intervals", "0.01", "1.2"], "--search_intervals takes 3 numbers",
                               "e.g. 0.01 1.2 100"),
    "calib_size_zero": (["--calib_size", "0"], "--calib_size must be at least 1", "got 0"),
    "limit_negative": (["--limit", "-1"], "--limit must be positive", "got -1"),
    "batch_size_word": (["--batch_size", "big"], "--batch_size big", "positive integer or 'auto'"),
    "heldout_ppl_negative": (["--heldout_ppl", "-2"], "--heldout_ppl must be >= 0", "got -2"),
    "weight_refine_negative": (["--weight_refine", "-1"], "--weight_refine must be >= 0", "got -1"),
    "act_refine_zero": (["--act_refine", "0"], "--act_refine must be >= 1", "got 0"),
    "plot_without_config": (["--plot"], "--plot draws a parameter file", "--quant_config"),
    "offload_with_accelerate": (["--offload", "--model_args", "use_accelerate=True"], "--offload and use_accelerate",
                                "use one of them"),
    "model_type": (["--model", "openai-completions"], "only Hugging Face causal LMs", "hf-causal-experimental"),
    "resume_with_only_eval": (["--resume", "--only_eval", "--quant_config", "FPQ_config_llama", "--ptq_param_path",
                               "x.pt"], "--resume continues a calibration", "without --only_eval"),
    "device_cuda_without_gpu": (["--device", "cuda"], "--device cuda: no CUDA GPU is visible", "use --device cpu"),
    "unknown_task": (["--tasks", "piqa,no_such_task"], "no offline data for task(s) no_such_task",
                     "known: arc_challenge"),
    "param_file_missing": ([*MINMAX_EVAL, "missing.pt"],
                           "parameter file not found: missing.pt", "run the calibration first"),
    "param_file_truncated": ([*MINMAX_EVAL, "{truncated}"], "cannot read parameter file", "recalibrate"),
    "param_file_foreign_torch_file": ([*MINMAX_EVAL, "{foreign}"],
                                      "is not an LLM-FP4 parameter file", "pass a file written by main.py"),
    "param_file_text": ([*MINMAX_EVAL, "{notes}"],
                        "is not an LLM-FP4 parameter file", "pass a file written by main.py"),
    "param_file_bad_safetensors": ([*MINMAX_EVAL, "{bad_twin}"], "cannot read parameter file", "recalibrate"),
    "param_file_runs_code": ([*MINMAX_EVAL, "{evil}"], "refused to load", "do not trust this file"),
    "param_file_other_model": (["--model_args", "pretrained={other}", "--quant_config", "MinMax_config_llama",
                                *ONLY_EVAL, "{param}"], "calibrated on another model", "recalibrate"),
    "param_file_other_config": (["--quant_config", "FPQ_config_llama", *ONLY_EVAL, "{param}"],
                                "made with --quant_config MinMax_config_llama, not FPQ_config_llama",
                                "use the model and flags it was made with"),
    "param_file_other_qbits": (["--quant_config", "MinMax_config_llama", "--qbits", "8", "8", "8", "4", "4", "4",
                                *ONLY_EVAL, "{param}"], "made with --qbits 4 4 4 2 2 2, not 8 8 8 4 4 4",
                               "use the model and flags it was made with"),
    "model_path_missing": (["--model_args", "pretrained=/no/such/model"], "cannot load model /no/such/model",
                           "check the path"),
    "model_folder_without_config": (["--model_args", "pretrained={no_config}"], "folder has no config.json",
                                    "pass a folder written by save_pretrained"),
    "model_config_corrupt": (["--model_args", "pretrained={corrupt_config}"], "cannot load model",
                             "check that it is a complete HF causal-LM checkpoint"),
    "gguf_bad_magic": (["--model_args", "pretrained={bad_magic}"], "not a GGUF file (bad magic bytes)",
                       "pass a valid .gguf file"),
    "gguf_truncated": (["--model_args", "pretrained={bad_gguf}"], "GGUF conversion failed",
                       "check the file is a complete GGUF"),
    "calib_text_too_short": ([*MINMAX[:2], "--calib_data", "{short}"], "gives only", "provide more text"),
    "calib_file_missing": ([*MINMAX[:2], "--calib_data", "missing.txt"],
                           "cannot read calibration file missing.txt", "pass a readable UTF-8 .txt or .jsonl file"),
    "search_result_dir_is_a_file": ([*MINMAX, "--search_result_dir", "{blocker}"],
                                    "--search_result_dir: cannot write to", "pass a writable folder"),
    "output_path_folder_is_a_file": (["--output_path", "{blocker}/out.json"], "--output_path: cannot write to",
                                     "pass a writable folder"),
    "export_dir_without_config": (["--export_dir", "exp"], "--export_dir writes a quantized model", "--quant_config"),
    "export_dir_is_a_file": ([*MINMAX, "--export_dir", "{blocker}"], "is a file", "choose a folder"),
    "export_dir_holds_other_files": ([*MINMAX, "--export_dir", "{root}"], "holds no LLM-FP4 export",
                                     "choose a new folder or empty it"),
    "nan_inf_in_activations": (["--model_args", "pretrained={overflow}", *MINMAX],
                               "in the input of model.layers.0.mlp.down_proj during calibration",
                               "dtype=float32"),
}
SUBPROCESS_CASES = ["qbits_count", "param_file_runs_code", "gguf_truncated", "nan_inf_in_activations",
                    "search_result_dir_is_a_file"]


def _argv(case: str, files: dict[str, Path]) -> list[str]:
    argv = CASES[case][0]
    base = BASE if "--model_args" not in argv else BASE[2:]
    return _fill(base + argv, files)


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def assert_one_line_error(code: int, stderr: str, problem: str, fix: str) -> str:
    """Exit 2, no traceback, exactly one 'error:' line, the last one, naming the problem and the fix."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], stderr[-2000:]
    assert problem in lines[-1] and fix in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture
def work(tmp_path, monkeypatch, files) -> Path:
    """An empty working folder as cwd, offline."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def _skip_if_unsupported(case: str) -> None:
    if case == "device_cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_in_process(case, files, work, capsys):
    _skip_if_unsupported(case)
    code = main.main(_argv(case, files))
    assert_one_line_error(code, capsys.readouterr().err, *CASES[case][1:])
    assert not _files_under(work)
    assert not files["marker"].exists()


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_through_main_py(case, files, tmp_path):
    """The real entry point: the same cases as a process, so nothing else reaches the terminal."""
    result = run_main(*_argv(case, files), cwd=tmp_path)
    line = assert_one_line_error(result.returncode, result.stderr, *CASES[case][1:])
    assert not _files_under(tmp_path) and not files["marker"].exists()
    if case == "param_file_runs_code":
        assert f"refused to load {files['evil']}" in line and "unsupported GLOBAL posix.system" in line


def test_other_model_is_named(files, work, capsys):
    code = main.main(_argv("param_file_other_model", files))
    line = assert_one_line_error(code, capsys.readouterr().err, *CASES["param_file_other_model"][1:])
    assert str(files["model"]) in line and str(files["other"]) in line


def test_read_only_search_result_fails_before_calibrating(files, work, capsys, monkeypatch):
    """search_result/ with mode 0555 (as root, who may write there anyway, creating a file there is made to fail)."""
    (work / "search_result").mkdir(mode=0o555)
    if os.geteuid() == 0:
        real = tempfile.TemporaryFile

        def denied(*args, dir=None, **kwargs):
            if Path(dir).name == "search_result":
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    monkeypatch.setattr("utils.run.pipeline.load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    code = main.main(_fill(BASE + MINMAX, files))
    assert_one_line_error(code, capsys.readouterr().err, "--search_result_dir: cannot write to "
                          "search_result/MinMax_config_llama: cannot create files in search_result (Permission "
                          "denied)", "pass a writable folder")


def test_disk_full_writing_the_checkpoint(files, work, capsys, monkeypatch):
    """Every write fails with ENOSPC: one line naming the file and the fix, nothing left."""
    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    code = main.main(_fill(BASE + MINMAX, files))
    line = assert_one_line_error(code, capsys.readouterr().err, "No space left on device", "free disk space")
    assert ".partial.pt" in line
    assert not _files_under(work)


def test_resume_refuses_another_runs_checkpoint(files, work, capsys):
    """--resume never throws work away: a checkpoint of another run is an error, and is kept."""
    _calibrate_only(_fill(BASE + MINMAX, files))
    target = work / "search_result" / "MinMax_config_llama" / PARAM_NAME
    layers, metadata = load_params(target)
    del metadata["modules"]
    Checkpoint(checkpoint_path(target), {**metadata, "search": {**metadata["search"], "seed": 7}}).save(layers, 1)
    before = {p: p.read_bytes() for p in _files_under(work)}
    code = main.main(_fill(BASE + MINMAX + ["--resume"], files))
    assert_one_line_error(code, capsys.readouterr().err, "cannot be continued (made with seed = 7, not 0)",
                          "rerun with the flags it was made with, or without --resume")
    assert {p: p.read_bytes() for p in _files_under(work)} == before


# --- atomic, resumable calibration ---------------------------------------------------------------------------


class StopAfter(Checkpoint):
    """A checkpoint whose n-th save is followed by an interruption (as a kill right after it would be)."""

    def __init__(self, path: Path, metadata: dict, n: int) -> None:
        super().__init__(path, metadata)
        self.left = n

    def save(self, layers, next_block) -> None:
        super().save(layers, next_block)
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


def _swapped(config_name: str, layers: int = 3):
    model = make_llama(120, layers=layers)
    config = get_config(config_name)
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    return model


@pytest.mark.parametrize("config_name,sequential", [("FPQ_config_llama", False), ("FPQ_config_llama", True),
                                                    ("SmoothQuant_config_llama", False),
                                                    ("SmoothQuant_config_llama", True)])
def test_resume_after_any_checkpoint_is_exact(tmp_path, config_name, sequential):
    """Interrupted after the embedding or any block, then resumed: the same bytes and the same model
    (SmoothQuant: its folded scales are replayed from the checkpoint too)."""
    config = get_config(config_name)
    space = SearchSpace((0.2, 1.2, 6), search_round=1) if config.search else None
    settings = CalibSettings(config, QBits.parse([4, 4, 4, 2, 2, 2]), space, sequential)
    ids = torch.randint(0, 120, (3, 24), generator=torch.Generator().manual_seed(0))
    metadata = {"run": "test"}
    reference_model = _swapped(config.name)
    save_params(tmp_path / "reference.pt", calibrate(reference_model, ids, settings), metadata)
    with torch.no_grad():
        reference_logits = reference_model(ids).logits
    first_block = 1 if config.embedding else 0  # a save after the embedding, when it is quantized
    saves = first_block + 3  # then after each of 3 blocks
    for n in range(1, saves + 1):
        path = tmp_path / f"run{n}.partial.pt"
        with pytest.raises(KeyboardInterrupt):
            calibrate(_swapped(config.name), ids, settings, StopAfter(path, metadata, n))
        layers, saved = load_checkpoint(path)
        assert saved["next_block"] == n - first_block
        model = _swapped(config.name)
        resumed = calibrate(model, ids, settings, Checkpoint(path, metadata, layers, saved["next_block"]))
        save_params(tmp_path / f"run{n}.pt", resumed, metadata)
        for suffix in (".pt", ".safetensors"):
            assert (tmp_path / f"run{n}{suffix}").read_bytes() == (tmp_path / f"reference{suffix}").read_bytes()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference_logits)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _kill_after_progress(argv: list[str], checkpoint: Path, delay: float, cwd: Path) -> bool:
    """Start main.py, wait until it writes a new checkpoint, wait `delay` s more, SIGKILL it.
    Returns whether it was still running when killed."""
    before = _stamp(checkpoint)
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv], cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        while process.poll() is None and _stamp(checkpoint) in (before, None):
            time.sleep(0.01)
        time.sleep(delay)
        killed = process.poll() is None
        process.send_signal(signal.SIGKILL)
        return killed
    finally:
        process.wait()


@pytest.fixture(scope="session")
def six_layer_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return _save_model(tmp_path_factory.mktemp("six_layers"), tiny_tokenizer,
                       make_llama(len(tiny_tokenizer), seed=3, layers=6))


def test_sigkill_at_random_points_then_resume_is_byte_identical(six_layer_dir, calib_text_file, tmp_path):
    """SIGKILL 5 times at seeded random points (each a random fraction of a block's time after a new
    checkpoint appeared, so inside a block's search or a checkpoint write), --resume each time: the final .pt
    and .safetensors equal an uninterrupted run's byte for byte, and no checkpoint or temp file is left."""
    argv = ["--model_args", f"pretrained={six_layer_dir}", "--tasks", "piqa", "--limit", "1", "--device", "cpu",
            "--quant_config", "FPQ_config_llama", "--calib_data", str(calib_text_file), "--calib_size", "6",
            "--calib_seqlen", "128", "--search_round", "2", "--search_intervals", "0.01", "1.2", "100",
            "--output_path", "out.json"]
    name = "W4A4E4_search_round2_search_intervals(0.01,1.2,100)"
    final = [f"{name}.pt", f"{name}.safetensors"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "killed").mkdir()
    plain = run_main(*argv, cwd=tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    block_seconds = float(re.search(r"calibration finished in ([\d.]+) s", plain.stderr).group(1)) / 6
    folder = tmp_path / "killed" / "search_result" / "FPQ_config_llama"
    rng = random.Random(1234)
    kills = 0
    for _ in range(15):
        if _kill_after_progress(argv + ["--resume"], folder / f"{name}.partial.pt",
                                rng.uniform(0, 0.9) * block_seconds, tmp_path / "killed"):
            kills += 1
        else:  # it finished before the kill (a fast machine): start over for the remaining kills
            for file_name in final:
                (folder / file_name).unlink()
        if kills == 5:
            break
    assert kills == 5
    resumed = run_main(*argv, "--resume", cwd=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    plain_folder = tmp_path / "plain" / "search_result" / "FPQ_config_llama"
    for file_name in final:
        assert (folder / file_name).read_bytes() == (plain_folder / file_name).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == final


def test_disk_full_on_final_write_keeps_checkpoint_then_resumes(files, work, monkeypatch, capsys, tmp_path):
    """The twin's write fails (disk full) after calibration: one line, the checkpoint is kept, no final file;
    the rerun finishes from the checkpoint and writes what an uninterrupted run writes."""
    real_write = Path.write_bytes

    def full_for_safetensors(self, data):
        if ".safetensors" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_for_safetensors)
    argv = _fill(BASE + MINMAX, files)
    code = main.main(argv)
    assert_one_line_error(code, capsys.readouterr().err, "No space left on device",
                          "is kept: rerun the same command to finish from it")
    folder = work / "search_result" / "MinMax_config_llama"
    assert sorted(p.name for p in folder.iterdir()) == [PARAM_NAME.replace(".pt", ".partial.pt")]
    monkeypatch.setattr(Path, "write_bytes", real_write)
    quantization = _calibrate_only(argv)
    assert quantization["resumed_from_block"] == 2
    assert sorted(p.name for p in folder.iterdir()) == FINAL_FILES
    assert (folder / PARAM_NAME).read_bytes() == files["param"].read_bytes()


def test_checkpoint_of_another_run_is_replaced(files, work, capsys):
    """Without --resume a checkpoint that does not match (or cannot be read) is said so and replaced."""
    target = work / "search_result" / "MinMax_config_llama" / PARAM_NAME
    checkpoint = checkpoint_path(target)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"half a file")
    (checkpoint.parent / f".{checkpoint.name}.abc123.tmp").write_bytes(b"left by a killed writer")
    _calibrate_only(_fill(BASE + MINMAX, files))
    assert f"not resuming from search_result/MinMax_config_llama/{checkpoint.name}" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == FINAL_FILES
    assert target.read_bytes() == files["param"].read_bytes()


def test_planted_checkpoint_runs_no_code(files, work, capsys):
    target = work / "search_result" / "MinMax_config_llama" / PARAM_NAME
    checkpoint_path(target).parent.mkdir(parents=True)
    torch.save({"format": "llm-fp4-checkpoint", "metadata": RunsCode(files["marker"])}, checkpoint_path(target))
    _calibrate_only(_fill(BASE + MINMAX, files))
    assert "refused to load" in capsys.readouterr().err and not files["marker"].exists()
    assert target.read_bytes() == files["param"].read_bytes()


def test_resume_after_the_run_finished_reuses_the_file(files, work, monkeypatch, capsys):
    _calibrate_only(_fill(BASE + MINMAX, files))
    monkeypatch.setattr("utils.run.pipeline.calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    quantization = _calibrate_only(_fill(BASE + MINMAX + ["--resume"], files))
    assert quantization["reused_finished_file"] and "calibration already finished" in capsys.readouterr().err


def test_a_finished_file_of_another_model_is_never_overwritten(files, work, capsys):
    """Bug: the paper's file name holds config, qbits and search, not the model, so calibrating a second model
    replaced the first one's parameters silently. Now: one line naming the way out, and the file untouched."""
    _calibrate_only(_fill(BASE + MINMAX, files))
    target = work / "search_result" / "MinMax_config_llama" / PARAM_NAME
    first = target.read_bytes()
    with pytest.raises(ParamFileError, match="holds another run's parameters .*calibrated on another model.*"
                                             "--search_result_dir DIR"):
        _calibrate_only(_fill(["--model_args", "pretrained={other}", *BASE[2:], *MINMAX], files))
    assert target.read_bytes() == first
    other_data = work / "other.txt"
    other_data.write_text(files["calib"].read_text() + " more text")
    with pytest.raises(ParamFileError, match="calib_data"):  # the same model on other calibration data
        _calibrate_only(_fill(BASE + MINMAX[:2] + ["--calib_data", str(other_data)] + MINMAX[4:], files))
    _calibrate_only(_fill(BASE + MINMAX, files))  # the same run again: its own file is written again
    assert target.read_bytes() == first


def test_only_eval_takes_config_and_qbits_from_the_file(files, work):
    """The file carries its config: --only_eval --ptq_param_path F works without --quant_config and --qbits, and
    the paper's command (which passes them) is still checked against it."""
    quantization = _calibrate_only(_fill(BASE + ["--only_eval", "--ptq_param_path", "{param}"], files))
    assert quantization["quant_config"]["name"] == "MinMax_config_llama" and quantization["qbits"] == [4, 4, 4, 2, 2, 2]
    with pytest.raises(ParamFileError, match="made with --quant_config MinMax_config_llama, not FPQ_config_llama"):
        _calibrate_only(_fill(BASE + ["--quant_config", "FPQ_config_llama", *ONLY_EVAL, "{param}"], files))


def test_only_eval_alone_evaluates_the_quantized_model(files, work, monkeypatch):
    """main.py with --only_eval --ptq_param_path F and no --quant_config evaluates the file's quantized model (run()
    evaluated the full-precision model there, with no quantization block)."""
    import utils.run.pipeline as pipeline

    seen = {}

    def evaluate(model, tokenizer, task_specs, **kwargs):
        seen["quantized"] = any(getattr(m, "is_quantized", False) for m in model.modules())
        return {"results": {}}

    monkeypatch.setattr(pipeline, "evaluate", evaluate)
    monkeypatch.setattr(pipeline, "results_table", lambda results: "")
    argv = _fill(BASE + ["--only_eval", "--ptq_param_path", "{param}", "--output_path", "r.json"], files)
    results = pipeline.run(parse_args(argv))
    assert seen["quantized"] and results["quantization"]["quant_config"]["name"] == "MinMax_config_llama"


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(files, work):
    """Two FPQ calibrations with the same seed write identical bytes; another seed does not; no wall-clock
    value is inside the file (timings go to the results JSON only)."""
    outputs = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        argv = _fill(BASE + ["--quant_config", "FPQ_config_llama", "--calib_data", "{calib}", "--calib_size", "2",
                             "--calib_seqlen", "32", "--search_round", "1", "--search_intervals", "0.01", "1.2", "10",
                             "--seed", str(seed), "--search_result_dir", run], files)
        quantization = _calibrate_only(argv)
        assert quantization["calib_seconds"] > 0
        assert quantization["calib_peak_gpu_bytes"] is None  # no GPU here: no peak to report
        path = Path(quantization["param_file"])
        outputs.append((path.read_bytes(), path.with_suffix(".safetensors").read_bytes()))
        payload = torch.load(path, weights_only=True)
        assert "calib_seconds" not in payload["metadata"]["search"]
    assert outputs[0] == outputs[1] and outputs[0][0] != outputs[2][0]


def test_files_from_before_weight_refine_still_match():
    """Metadata written before --weight_refine and --act_refine existed has no such keys; they were 0 and 8 then, so
    such a file still matches those values and no others."""
    from utils.params import _search_difference

    search = {"search_round": 3, "weight_refine": 0, "act_refine": 8}
    current = {"quant_config": {"name": "FPQ_config_llama"}, "search": search}
    old = {"quant_config": {"name": "FPQ_config_llama"}, "search": {"search_round": 3}}
    assert _search_difference(old, current) is None
    assert _search_difference(old, {**current, "search": {**search, "weight_refine": 8}}) == \
        "made with weight_refine = 0, not 8"
    assert _search_difference(old, {**current, "search": {**search, "act_refine": 2}}) == \
        "made with act_refine = 8, not 2"
