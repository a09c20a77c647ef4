"""Parameter files: naming, safe loading, atomic writes, and exact reproduction of the calibrated model."""

import math
import pickle

import pytest
import torch
from safetensors.torch import load_file

from configs import QBits, get_config
from conftest import RunsCode, make_llama
from quant_layers.modules import swap_modules
from utils.params import (ParamFileError, apply_params, load_checkpoint, load_params, param_file_path,
                          resolve_param_path, save_params)
from utils.quant_calib import CalibSettings, calibrate
from utils.search.space import SearchSpace


def test_file_name_is_the_papers():
    path = param_file_path("search_result", get_config("FPQ_config_llama"), QBits.parse([4, 4, 4, 2, 2, 2]),
                           SearchSpace((0.01, 1.2, 100), search_round=3))
    assert str(path) == "search_result/FPQ_config_llama/W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt"


def test_original_float_count_spelling_is_accepted(tmp_path):
    real = tmp_path / "W4A4E4_search_round3_search_intervals(0.01,1.2,100).pt"
    real.write_bytes(b"x")
    assert resolve_param_path(tmp_path / "W4A4E4_search_round3_search_intervals(0.01,1.2,100.0).pt") == real
    with pytest.raises(ParamFileError, match="not found"):
        resolve_param_path(tmp_path / "missing.pt")


def _calibrated(config_name="FPQ_config_llama", seed=0):
    model = make_llama(120, seed=seed)
    config = get_config(config_name)
    swap_modules(model, config.linear, config.lm_head, config.embedding)
    ids = torch.randint(0, 120, (3, 24), generator=torch.Generator().manual_seed(0))
    space = SearchSpace((0.2, 1.2, 6), search_round=1) if config.search else None
    layers = calibrate(model, ids, CalibSettings(config, QBits.parse([4, 4, 4, 2, 2, 2]), space))
    return model, layers, ids


@pytest.mark.parametrize("config_name", ["FPQ_config_llama", "MinMax_INT_config_llama"])
def test_save_load_reproduces_logits_exactly(tmp_path, config_name):
    model, layers, ids = _calibrated(config_name)
    path = tmp_path / "params.pt"
    save_params(path, layers, {"note": "test"})
    loaded, metadata = load_params(path)
    assert metadata["note"] == "test" and set(loaded) == set(layers)
    fresh = make_llama(120)
    config = get_config(config_name)
    swap_modules(fresh, config.linear, config.lm_head, config.embedding)
    apply_params(fresh, loaded)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    # The safetensors twin holds the same tensors.
    twin = load_file(str(path.with_suffix(".safetensors")))
    loaded_twin, _ = load_params(path.with_suffix(".safetensors"))
    for name, p in loaded_twin.items():
        assert torch.equal(p.weight_max_value, loaded[name].weight_max_value)
    assert twin.keys() == torch.load(path, weights_only=True)["tensors"].keys()


def test_file_content_is_plain_and_biases_are_consistent(tmp_path):
    _, layers, _ = _calibrated()
    path = tmp_path / "p.pt"
    save_params(path, layers, {})
    payload = torch.load(path, weights_only=True)
    tensors = payload["tensors"]
    name = "model.layers.0.mlp.down_proj"
    fmt = layers[name].weight_format
    grid_max = (2 - 2.0 ** -fmt.mantissa_bits) * 2.0 ** (2**fmt.exponent_bits - 1)  # the paper's formula, bias 0
    expected = [math.log2(grid_max / m) for m in tensors[f"{name}.weight_max_value"].double().tolist()]
    assert tensors[f"{name}.weight_exponent_bias"].double().tolist() == pytest.approx(expected, abs=1e-5)
    assert tensors[f"{name}.act_channel_shift"].dtype == torch.int8
    assert payload["metadata"]["modules"][name]["weight_format"] in ("E3M0", "E2M1", "E1M2")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_pickle_with_code_is_refused(tmp_path, container):
    """A crafted parameter file or checkpoint that would run code on load: refused, and the code never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "llm-fp4-params", "metadata": RunsCode(marker), "tensors": {}}
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ParamFileError, match="refused to load .*could run code"):
        load_params(path)
    with pytest.raises(ParamFileError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_foreign_files(tmp_path):
    _, layers, _ = _calibrated("MinMax_config_llama")
    path = tmp_path / "p.pt"
    save_params(path, layers, {})
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ParamFileError):
        load_params(truncated)
    foreign = tmp_path / "f.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(ParamFileError, match="not an LLM-FP4 parameter file"):
        load_params(foreign)


def test_apply_to_other_shapes_is_refused(tmp_path):
    _, layers, _ = _calibrated("MinMax_config_llama")
    other = make_llama(130)  # another vocabulary: embedding and head have other row counts
    swap_modules(other)
    with pytest.raises(ParamFileError, match="rows"):
        apply_params(other, layers)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    _, layers, _ = _calibrated("MinMax_config_llama")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save_params(tmp_path / "p.pt", layers, {})
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "p.safetensors").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_layer_table_and_figure(tmp_path):
    """The per-layer table reads formats and exponent biases back from a file (bias = log2(grid_max / max))
    and the figure is written; a file without quantized Linears is one clear error."""
    import math

    from quant_layers.formats import fp_format
    from quant_layers.modules import QuantParams
    from utils.params import ParamFileError, save_params
    from utils.report.plots import layer_table, main, plot_param_file

    e2m1 = fp_format(2, 1)
    layers = {f"l{i}": QuantParams(e2m1, torch.tensor([6.0, 1.5]), fp_format(3, 0), torch.tensor(0.5),
                                   mse=0.1 * (i + 1), mse_minmax=0.2 * (i + 1)) for i in range(3)}
    path = tmp_path / "p.pt"
    save_params(path, layers, {"note": "test"})
    rows = layer_table(path)
    assert [r["name"] for r in rows] == ["l0", "l1", "l2"]
    assert rows[0]["weight_format"] == "E2M1" and rows[0]["act_format"] == "E3M0"
    assert rows[0]["weight_bias"] == pytest.approx((1.0 + 3.0) / 2)  # max 6 -> bias 1, max 1.5 -> bias 3: median
    assert rows[0]["act_bias"] == pytest.approx(math.log2(fp_format(3, 0).grid_max / 0.5))
    assert rows[2]["mse"] == pytest.approx(0.3) and rows[2]["mse_minmax"] == pytest.approx(0.6)
    png = plot_param_file(path, tmp_path / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty.pt"
    save_params(empty, {"e": QuantParams(e2m1, torch.tensor([1.0]), kind="embedding")}, {"note": "test"})
    with pytest.raises(ParamFileError, match="nothing to plot"):
        plot_param_file(empty, tmp_path / "x.png")
    assert main([str(tmp_path / "missing.pt")]) == 2


def test_layer_table_blocks_and_figure_ticks(tmp_path):
    """Rows carry the decoder block and module parsed from the name; the figure's x axis has a tick per block
    labelled with its index, a tick for the head, and names the order of a block's Linears."""
    from quant_layers.formats import fp_format
    from quant_layers.modules import QuantParams
    from utils.report.plots import layer_figure, layer_table

    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
    names = [f"model.layers.{b}.{m}" for b in range(3) for m in modules] + ["lm_head"]
    layers = {n: QuantParams(fp_format(2, 1), torch.tensor([6.0, 1.5]), fp_format(3, 0), torch.tensor(0.5),
                             mse=0.1, mse_minmax=0.2) for n in names}
    path = tmp_path / "p.pt"
    save_params(path, layers, {"note": "test"})
    rows = layer_table(path)
    assert (rows[3]["block"], rows[3]["module"]) == (0, "o_proj")
    assert (rows[14]["block"], rows[14]["module"]) == (2, "q_proj")
    assert (rows[-1]["block"], rows[-1]["module"]) == (None, "lm_head")
    fig = layer_figure(path)
    axis = fig.axes[-1]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["0", "1", "2", "lm_head"]
    assert list(axis.get_xticks()) == [0, 7, 14, 21]
    assert axis.get_xlabel() == "decoder block (its Linears in order q k v o gate up down), in model order"


def test_code_fingerprint_follows_the_code_only(tmp_path):
    """Same code, same fingerprint (wherever it lies); one changed byte in a code file changes it; files outside
    the code folders (results, docs) do not."""
    import shutil

    from conftest import ROOT
    from utils.run.fileio import code_fingerprint

    copy = tmp_path / "copy"
    for name in ("configs", "quant_layers", "utils"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "main.py", copy / "main.py")
    assert code_fingerprint(copy) == code_fingerprint(ROOT)
    (copy / "docs").mkdir()
    (copy / "docs" / "notes.py").write_text("x = 1\n")
    assert code_fingerprint(copy) == code_fingerprint(ROOT)
    search = copy / "utils" / "search" / "space.py"
    search.write_text(search.read_text().replace("TINY = 1e-30", "TINY = 1e-31", 1))
    assert code_fingerprint(copy) != code_fingerprint(ROOT)


def test_layer_figure_of_a_block_recipe(tmp_path):
    """A block-scaled file: the baseline is round to nearest, the middle panel shows each Linear's activation clip
    (1 where none was saved) and its weight's rounding (GPTQ codes, searched block scales, round to nearest)."""
    from quant_layers.formats import BLOCK_ALIASES
    from quant_layers.modules import QuantParams
    from utils.params import save_params
    from utils.report.plots import layer_figure, layer_table

    nvfp4 = BLOCK_ALIASES["NVFP4"]
    scales = torch.full((2, 1), 6 * 448 * (6.0 / (6 * 448)))
    layers = {
        "a": QuantParams(nvfp4, torch.tensor([6.0, 6.0]), nvfp4, torch.tensor(2.0), mse=0.1, mse_minmax=0.2),
        "b": QuantParams(nvfp4, torch.tensor([6.0, 6.0]), nvfp4, torch.tensor(2.0), mse=0.1, mse_minmax=0.2,
                         act_block_clip=torch.tensor(0.8), weight_block_scale=scales),
        "c": QuantParams(nvfp4, torch.tensor([6.0, 6.0]), nvfp4, torch.tensor(2.0), mse=0.1, mse_minmax=0.2,
                         weight_block_scale=scales, weight_codes=torch.zeros(2, 16, dtype=torch.uint8)),
    }
    path = tmp_path / "p.pt"
    save_params(path, layers, {"note": "test"})
    rows = layer_table(path)
    assert [r["act_block_clip"] for r in rows] == pytest.approx([1.0, 0.8, 1.0])
    assert [r["weight_rounding"] for r in rows] == ["round to nearest", "searched block scales", "GPTQ codes"]
    fig = layer_figure(path)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["round to nearest", "searched"]
    assert fig.axes[1].get_ylabel() == "clip (x block max)"


def test_layer_table_skips_transform_entries(tmp_path):
    """A file holding a transform's tensors (SmoothQuant's migration scales) next to the Linears: the table lists
    the Linears only."""
    from configs import QBits, get_config
    from conftest import calibrate_and_replay
    from utils.params import TransformParams, load_params
    from utils.report.plots import layer_table

    calibrate_and_replay(get_config("SmoothQuant_config_llama"), QBits.parse([4, 4, 16, 2, 2, 2]), None, tmp_path)
    layers, _ = load_params(tmp_path / "replay.pt")
    assert any(isinstance(p, TransformParams) for p in layers.values())
    rows = layer_table(tmp_path / "replay.pt")
    assert len(rows) == sum(getattr(p, "kind", None) == "linear" for p in layers.values()) > 0
