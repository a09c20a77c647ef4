"""Packed checkpoints (utils/export/): a calibrated tiny model exported and loaded back computes the simulated model's
logits exactly (FPQ with shifts, NVFP4, MXFP4, INT, SmoothQuant, NVFP4's searched block scales, rotations, a tied
head left unquantized; Llama and Qwen2; float32 and bfloat16), the sizes on disk match the bits counted by hand,
and a truncated, tampered or mismatched export, or a target folder that is not this run's, is one line with nothing
half-written. main.py: --export_dir after calibration
and after --only_eval, then --model_args pretrained=DIR gives the calibrated run's results."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import main
from configs import QBits, QuantConfig, get_config
from conftest import make_tiny, one_line_value_error, run_main
from quant_layers.formats import NVFP4_BLOCKS
from quant_layers.modules import QuantEmbedding, QuantLinear, swap_modules
from utils.export import MARKER, WEIGHTS, export_packed, load_packed
from utils.export.write import _file_entries
from utils.data.models import load_model
from utils.quant_calib import CalibSettings, calibrate
from utils.run.cli import parse_args
from utils.run.fileio import WriteError
from utils.run.pipeline import quantize_model
from utils.search.block_scales import BlockScaleStep
from utils.search.residual_rotation import ResidualRotation
from utils.search.space import SearchSpace
from utils.search.transforms import BlockHadamard, SmoothQuant

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
W4A4 = QBits.parse([4, 4, 4, 2, 2, 2])
RUN = {"model": {"fingerprint": "tiny"}, "quant_config": {"name": "test"}, "qbits": [4, 4, 4, 2, 2, 2], "search": {}}
BLOCK_SEARCH = {"NVFP4": QuantConfig(name="NVFP4_searched", format_kind="fp", search=False, act_channel_shift=False,
                                     weight_granularity="per_tensor", block=NVFP4_BLOCKS, steps=(BlockScaleStep,))}
TIED_UNSWAPPED = QuantConfig(name="tied", format_kind="int", search=False, act_channel_shift=False, lm_head=False,
                             embedding=False)
ROTATED = QuantConfig(name="rotated", format_kind="fp", search=True, act_channel_shift=True,
                      transforms=(ResidualRotation(seed=3), SmoothQuant(0.5), BlockHadamard(16, ("self_attn.o_proj",))))
OTHER_CONFIGS = {"tied": TIED_UNSWAPPED, "rotated": ROTATED}


def calibrated(architecture: str, config: QuantConfig, dtype: torch.dtype = torch.float32):
    """(model, layers): make_tiny in `dtype` (built in it, as from_pretrained builds), swapped and calibrated."""
    from transformers import AutoModelForCausalLM

    model = make_tiny(architecture)
    if dtype != torch.float32:
        state = model.state_dict()
        model = AutoModelForCausalLM.from_config(model.config, dtype=dtype).eval()
        model.load_state_dict(state)
    space = SearchSpace((0.5, 1.2, 3), search_round=1) if config.uses_search_space else None
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    return model, calibrate(model, IDS, CalibSettings(config, W4A4, space))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("architecture, config, dtype", [
    ("llama", "FPQ_config_llama", torch.float32), ("qwen2", "FPQ_config_llama", torch.float32),
    ("llama", "NVFP4_config_llama", torch.float32), ("llama", "MXFP4_config_llama", torch.float32),
    ("qwen2", "MinMax_INT_config_llama", torch.float32), ("qwen2", "SmoothQuant_config_llama", torch.float32),
    ("llama", "MinMax_config_llama", torch.bfloat16), ("llama", "NVFP4", torch.float32),
    ("llama", "tied", torch.float32), ("llama", "rotated", torch.float32),
    ("llama", "NVFP4_search_gptq_rot_config_llama", torch.float32), ("qwen2", "MXFP4_search_gptq_config_llama",
                                                                     torch.float32),
    ("llama", "FPQ_gptq_config_llama", torch.float32),
    ("llama", "NVFP4_4over6_search_gptq_config_llama", torch.float32),
    ("qwen2", "NVFP4_headsmooth_config_llama", torch.float32),
    ("llama", "MXFP4_headsmooth_headhad32_config_llama", torch.float32)])
def test_loaded_export_computes_the_simulated_logits(architecture, config, dtype, tiny_tokenizer, tmp_path):
    """Every quantized weight decodes to the simulated module's weight and the logits are torch.equal; the block
    configs with a block-scale search export their explicit scales; an unswapped tied head stays one tensor;
    rotations' online halves (InputRotation buffers, the head's too) come back."""
    config = BLOCK_SEARCH.get(config) or OTHER_CONFIGS.get(config) or get_config(config)
    model, layers = calibrated(architecture, config, dtype)
    export_packed(model, layers, RUN, tmp_path / "export", tiny_tokenizer)
    loaded, tokenizer, marker = load_packed(tmp_path / "export")
    assert torch.equal(logits(loaded), logits(model)) and marker["dtype"] == str(dtype).removeprefix("torch.")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    for name, module in quantized.items():
        twin = loaded.get_submodule(name)
        assert type(twin) is type(module) and torch.equal(twin.weight, module.weight), name
        assert twin.weight_format == module.weight_format and getattr(twin, "act_format", None) == getattr(
            module, "act_format", None)
    assert tokenizer("a dream").input_ids == tiny_tokenizer("a dream").input_ids
    if config.block is not None and config.steps:
        assert all(p.weight_block_scale is not None for p in layers.values() if getattr(p, "kind", "") == "linear")
    if config is TIED_UNSWAPPED:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    if config is ROTATED:
        rotation = loaded.model.layers[1].self_attn.o_proj.input_rotation
        assert torch.equal(rotation.inner, model.model.layers[1].self_attn.o_proj.input_rotation.inner)
    if any(t.scope == "head" for t in config.transforms):  # the final norm's new gain, the head's own weight
        assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)
        assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def test_sizes_on_disk_are_the_bits_counted_by_hand(tiny_tokenizer, tmp_path):
    """FPQ W4A4E4 (E-formats per row, int8 shifts per column): the codes take half a byte per weight, each [out, in]
    weight 4 + 32 / in (+ 8 / out with shifts) bits per value, and the report's numbers are the file's."""
    model, layers = calibrated("llama", get_config("FPQ_config_llama"))
    report = export_packed(model, layers, RUN, tmp_path / "export", tiny_tokenizer)
    size = report["size"]
    tensors = load_file(tmp_path / "export" / WEIGHTS)
    expected_bits = weights = 0
    for name, p in layers.items():
        rows, columns = model.get_submodule(name).weight.shape
        codes = tensors[f"{name}.weight.codes"]
        assert codes.dtype == torch.uint8 and codes.shape == (rows, columns // 2)  # two 4-bit codes per byte
        expected_bits += 4 * rows * columns + 32 * rows + (8 * columns if p.act_channel_shift is not None else 0)
        weights += rows * columns
    parameters = sum(p.numel() for p in model.parameters())
    file_bytes = (tmp_path / "export" / WEIGHTS).stat().st_size
    assert size["model_file_bytes"] == file_bytes and size["parameters"] == parameters
    assert size["bits_per_parameter"] == 8 * file_bytes / parameters
    assert size["bf16_bytes"] == 2 * parameters and size["ratio_to_bf16"] == file_bytes / (2 * parameters)
    assert size["quantized_parameters"] == weights
    assert size["quantized_weight_bits_per_parameter"] == pytest.approx(expected_bits / weights, rel=1e-12)
    assert 4 < size["quantized_weight_bits_per_parameter"] < 4.7
    assert size["directory_bytes"] == sum(f.stat().st_size for f in (tmp_path / "export").iterdir())


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A MinMax FP export of a tiny Llama (copied by each test that damages it)."""
    folder = tmp_path_factory.mktemp("export") / "export"
    model, layers = calibrated("llama", get_config("MinMax_config_llama"))
    export_packed(model, layers, RUN, folder, tiny_tokenizer)
    return folder


def _copy(export_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export_dir, tmp_path / "copy"))


def _restamp(folder: Path) -> None:
    """Record the folder's files as they are now in its marker: a damaged export that is self-consistent."""
    marker = json.loads((folder / MARKER).read_text())
    marker["files"] = _file_entries(folder)
    del marker["files"][MARKER]
    (folder / MARKER).write_text(json.dumps(marker))


def _load_error(folder: Path) -> str:
    return one_line_value_error(lambda: load_packed(folder))


def test_tampered_truncated_and_missing_files_are_one_line(export_dir, tmp_path):
    folder = _copy(export_dir, tmp_path)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-100] ^= 0x01
    (folder / WEIGHTS).write_bytes(bytes(data))
    message = _load_error(folder)
    assert WEIGHTS in message and "sha256" in message and "tampered" in message
    (folder / WEIGHTS).write_bytes(bytes(data[: len(data) // 2]))
    assert "truncated" in _load_error(folder)
    _restamp(folder)  # the marker agrees with the truncated file: safetensors itself refuses it
    assert f"cannot read {folder / WEIGHTS}" in _load_error(folder)
    (folder / "config.json").unlink()
    assert "config.json is missing" in _load_error(folder)


def test_a_config_json_of_another_model_is_one_line(export_dir, tmp_path):
    folder = _copy(export_dir, tmp_path)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"vocab_size": 300', '"vocab_size": 400'))  # same size
    assert "config.json does not match the sha256" in _load_error(folder)
    _restamp(folder)
    assert "do not belong together" in _load_error(folder)
    config = json.loads(text)
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    _restamp(folder)
    assert "model.layers.1" in _load_error(folder)


def test_bad_tensors_and_unknown_versions_are_one_line(export_dir, tmp_path):
    folder = _copy(export_dir, tmp_path)
    with safe_open(folder / WEIGHTS, "pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    good = dict(tensors)
    codes = tensors["model.layers.0.mlp.up_proj.weight.codes"]
    tensors["model.layers.0.mlp.up_proj.weight.codes"] = codes[:, :-1].contiguous()
    save_file(tensors, folder / WEIGHTS, metadata)
    _restamp(folder)
    assert "up_proj.weight.codes" in _load_error(folder) and "expected uint8" in _load_error(folder)
    header = json.loads(metadata["llm_fp4"])
    save_file(good, folder / WEIGHTS, {"llm_fp4": json.dumps({**header, "version": 2})})
    _restamp(folder)
    assert "export version 2; this code reads version 1" in _load_error(folder)
    marker = json.loads((folder / MARKER).read_text())
    (folder / MARKER).write_text(json.dumps({**marker, "format": "something-else"}))
    assert "not an LLM-FP4 export" in _load_error(folder)
    (folder / MARKER).write_text("{ not json")
    assert f"cannot read {folder / MARKER}" in _load_error(folder)


@pytest.mark.parametrize("change", [{"dtype": "int4"}, {"swap": {"linear": 1}}, {"plain": "x"}, {"aliases": []},
                                    {"modules": {"lm_head": {"kind": "linear", "shape": [300]}}}])
def test_a_malformed_header_is_one_line(export_dir, tmp_path, change):
    """A header that passes the sha256 check (the marker restamped) but is not this code's layout."""
    folder = _copy(export_dir, tmp_path)
    with safe_open(folder / WEIGHTS, "pt") as f:
        header, tensors = json.loads(f.metadata()["llm_fp4"]), {key: f.get_tensor(key) for key in f.keys()}
    save_file(tensors, folder / WEIGHTS, {"llm_fp4": json.dumps({**header, **change})})
    _restamp(folder)
    assert "its metadata has no valid" in _load_error(folder)


def test_loading_reads_no_pickle(export_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    load_packed(export_dir)


def test_target_folders_are_never_overwritten_silently(export_dir, tiny_tokenizer, tmp_path):
    """A file, a non-empty folder without an export, another run's export: refused, untouched. The same run's
    export: left alone when byte-identical, replaced when not."""
    model, layers = calibrated("llama", get_config("MinMax_config_llama"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    assert "is a file" in one_line_value_error(lambda: export_packed(model, layers, RUN, tmp_path / "file"))
    message = one_line_value_error(lambda: export_packed(model, layers, RUN, tmp_path / "notes"))
    assert "holds no LLM-FP4 export; choose a new folder or empty it" in message
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep" and len(list((tmp_path / "notes").iterdir())) == 1
    folder = _copy(export_dir, tmp_path)
    other = {**RUN, "qbits": [4, 8, 4, 2, 2, 2]}
    assert "another run's export" in one_line_value_error(lambda: export_packed(model, layers, other, folder))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert export_packed(model, layers, RUN, folder, tiny_tokenizer)["placed"].startswith("unchanged")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert export_packed(model, layers, RUN, folder)["placed"] == "replaced the export of the same run"
    assert not (folder / "tokenizer.json").exists()  # the new export has no tokenizer
    (tmp_path / "empty").mkdir()
    assert export_packed(model, layers, RUN, tmp_path / "empty")["placed"] == "written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "empty", "file", "notes"]  # no temporary folders


def test_quantizer_state_the_layout_does_not_hold_is_refused(tmp_path):
    """A QuantLinear buffer the exporter does not know (new activation state) is refused, not silently dropped."""
    model, layers = calibrated("llama", get_config("MinMax_config_llama"))
    model.model.layers[0].mlp.up_proj.register_buffer("act_future_state", torch.ones(4))
    message = one_line_value_error(lambda: export_packed(model, layers, RUN, tmp_path / "export"))
    assert "'model.layers.0.mlp.up_proj' has quantization state the export layout does not hold (act_future_state)" \
        in message
    assert not (tmp_path / "export").exists()


def test_a_failed_write_leaves_nothing(monkeypatch, tmp_path):
    import utils.export.write as write

    model, layers = calibrated("llama", get_config("MinMax_config_llama"))

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write, "save_file", disk_full)
    with pytest.raises(WriteError, match="No space left on device"):
        export_packed(model, layers, RUN, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_main_exports_after_calibration_and_only_eval_and_evaluates_the_export(tiny_llama_dir, calib_text_file,
                                                                               tmp_path, monkeypatch, capsys):
    """main.py --export_dir after calibrating, then --model_args pretrained=DIR: the calibrated run's results
    (lambada's perplexity to the last bit). --only_eval's export of the same parameter file is byte-identical.
    Flags an export does not take are one line, before it is loaded."""
    common = ["--tasks", "lambada_openai", "--device", "cpu", "--batch_size", "4", "--limit", "6"]
    first = run_main(*common, "--model_args", f"pretrained={tiny_llama_dir}", "--quant_config", "FPQ_config_llama",
                     "--calib_size", "2", "--calib_seqlen", "48", "--search_round", "1", "--search_intervals", "0.5",
                     "1.2", "3", "--calib_data", calib_text_file, "--output_path", tmp_path / "cal.json",
                     "--export_dir", tmp_path / "exp", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "bits per parameter" in first.stderr
    calibrated_run = json.loads((tmp_path / "cal.json").read_text())
    export = calibrated_run["quantization"]["export"]
    assert export["size"]["model_file_bytes"] == (tmp_path / "exp" / WEIGHTS).stat().st_size
    packed = run_main(*common, "--model_args", f"pretrained={tmp_path / 'exp'}", "--output_path",
                      tmp_path / "packed.json", cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert "loaded packed export" in packed.stderr
    packed_run = json.loads((tmp_path / "packed.json").read_text())
    assert packed_run["results"] == calibrated_run["results"]
    assert packed_run["quantization"]["quant_config"]["name"] == "FPQ_config_llama"
    assert packed_run["quantization"]["packed_export"]["model_sha256"] == export["files"][WEIGHTS]["sha256"]

    monkeypatch.chdir(tmp_path)
    param_file = next((tmp_path / "search_result" / "FPQ_config_llama").glob("*.pt"))
    args = parse_args(["--model_args", f"pretrained={tiny_llama_dir}", "--only_eval", "--ptq_param_path",
                       str(param_file), "--export_dir", str(tmp_path / "exp2")])
    model, tokenizer, info = load_model(args.model_args.pretrained, device="cpu")
    quantize_model(model, tokenizer, info, args)
    assert (tmp_path / "exp2" / WEIGHTS).read_bytes() == (tmp_path / "exp" / WEIGHTS).read_bytes()
    capsys.readouterr()
    for flags, says in ((["--quant_config", "MinMax_config_llama"], "is an export of FPQ_config_llama W4A4E4"),
                        (["--only_eval", "--ptq_param_path", str(param_file)], "--only_eval: pretrained="),
                        (["--model_args", f"pretrained={tmp_path / 'exp'},dtype=bfloat16"], "exported in float32")):
        argv = ["--model_args", f"pretrained={tmp_path / 'exp'}", "--tasks", "piqa", "--device", "cpu", *flags]
        assert main.main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and error.startswith("error: ") and says in error, error
