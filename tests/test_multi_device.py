"""Placement across devices (issue: multi-GPU), simulated on CPU.

A model dispatched by accelerate (use_accelerate=True -> device_map="auto") carries a device hook on every
block and on the head; on several GPUs those hooks move activations between cards. Here every entry of
the device map is "cpu" but the hooks are forced on, so the code path that a split model takes (hooks
carried over by swap_modules, per-block devices read from the blocks' own weights) runs in CI, and its
result must equal the plain model's bit for bit.
"""

import gc
import weakref

import pytest
import torch

from configs import QBits, get_config
from quant_layers.modules import QuantLinear, swap_modules
from conftest import make_llama
from utils.data.architecture import decoder_layers
from utils.data.models import place_outside_blocks
from utils.quant_calib import CalibrationError, CalibSettings, calibrate
from utils.search.space import SearchSpace

accelerate = pytest.importorskip("accelerate")
from accelerate import dispatch_model  # noqa: E402

SETTINGS = CalibSettings(get_config("FPQ_config_llama"), QBits.parse([4, 4, 4, 2, 2, 2]), SearchSpace((0.3, 1.2, 6), search_round=1))


def split_map(model) -> dict:
    """What infer_auto_device_map gives on a two-GPU machine, with both 'GPUs' being the CPU here."""
    layers = len(decoder_layers(model))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(layers)})
    return device_map


def test_swap_carries_accelerate_hooks():
    model = dispatch_model(make_llama(300, layers=2), split_map(make_llama(300, layers=2)), force_hooks=True)
    head_hook = model.lm_head._hf_hook
    swap_modules(model)
    assert isinstance(model.lm_head, QuantLinear)
    assert model.lm_head._hf_hook is head_hook


def test_calibration_of_a_dispatched_model_equals_the_plain_model():
    ids = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(0))
    plain = make_llama(300, layers=3)
    dispatched = dispatch_model(make_llama(300, layers=3), split_map(plain), force_hooks=True)
    results = []
    for model in (plain, dispatched):
        swap_modules(model)
        params = calibrate(model, ids, SETTINGS)
        with torch.no_grad():
            results.append((params, model(input_ids=ids).logits))
    (params_a, logits_a), (params_b, logits_b) = results
    assert params_a.keys() == params_b.keys()
    for name, a in params_a.items():
        b = params_b[name]
        assert a.mse == b.mse and a.weight_format == b.weight_format and a.act_format == b.act_format
        assert torch.equal(a.weight_max_value, b.weight_max_value)
    assert torch.equal(logits_a, logits_b)


def test_weights_offloaded_by_accelerate_are_refused_with_a_clear_error():
    model = make_llama(300, layers=2)
    swap_modules(model)
    decoder_layers(model)[1].to("meta")  # what accelerate's disk/CPU offload leaves in the module
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CalibrationError, match="use --offload instead"):
        calibrate(model, ids, SETTINGS)


def test_place_outside_blocks_moves_everything_but_the_blocks():
    model = make_llama(300, layers=2)
    place_outside_blocks(model, "meta")
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model.model.norm.weight.device.type == "meta"
    assert all(p.device.type == "cpu" for p in decoder_layers(model).parameters())
    assert len(decoder_layers(model)) == 2


def _torchrun(processes: int, argv: list, cwd):
    """main.py as `processes` data-parallel processes on the CPU (gloo), as `accelerate launch` starts them."""
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(ROOT / "main.py"), *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


def test_data_parallel_evaluation_equals_one_process(tiny_llama_dir, calib_text_file, tmp_path):
    """--only_eval split over two processes (each scores half the documents, rank 0 gathers and writes) gives the
    accuracies of the single-process run; calibration under several processes is refused in one line."""
    import json

    from conftest import run_main

    common = ["--model_args", f"pretrained={tiny_llama_dir}", "--tasks", "piqa,arc_easy", "--device", "cpu",
              "--batch_size", "4", "--limit", "10", "--quant_config", "FPQ_config_llama"]
    calibrated = run_main(*common, "--calib_size", "2", "--calib_seqlen", "32", "--search_round", "1",
                          "--search_intervals", "0.3", "1.2", "6", "--calib_data", calib_text_file,
                          "--output_path", tmp_path / "one.json", cwd=tmp_path)
    assert calibrated.returncode == 0, calibrated.stderr[-2000:]
    param_file = next((tmp_path / "search_result").rglob("*.pt"))
    split = _torchrun(2, common + ["--only_eval", "--ptq_param_path", param_file, "--output_path",
                                   tmp_path / "two.json"], tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for task in ("piqa", "arc_easy"):
        assert two["results"][task]["acc,none"] == one["results"][task]["acc,none"]
        assert two["results"][task]["acc_norm,none"] == one["results"][task]["acc_norm,none"]
    assert two["quantization"]["eval_processes"] == 2 and one["quantization"]["eval_processes"] == 1
    refused = _torchrun(2, common + ["--calib_size", "2", "--calib_data", calib_text_file], tmp_path)
    assert refused.returncode != 0
    assert "split evaluation only: calibrate (and export) in one process first" in refused.stderr
    assert "utils/run/pipeline.py" not in refused.stderr  # torchrun prints its own traceback, none comes from ours


def test_replaced_weights_are_freed_at_once():
    """accelerate's hooks wrap each module's forward around the module itself (a reference cycle), so a swapped
    out nn.Linear is freed only by Python's cyclic collector, and with it the full-precision weight that
    calibration replaces: on two GPUs, calibration held twice the weights. They must go without a collection."""
    model = make_llama(300, tied=False, layers=2)
    model = dispatch_model(model, split_map(model), force_hooks=True)
    originals = [weakref.ref(m.weight) for m in model.modules() if type(m) is torch.nn.Linear]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    gc.collect()
    gc.disable()
    try:
        swap_modules(model)
        calibrate(model, ids, SETTINGS)
        alive = sum(ref() is not None for ref in originals)
    finally:
        gc.enable()
    assert len(originals) == 15 and alive == 0


def test_entries_home_moves_the_entries_under_the_prefix_with_every_tensor():
    from types import SimpleNamespace

    from quant_layers.formats import BLOCK_ALIASES
    from quant_layers.modules import QuantParams
    from utils.params import TransformParams
    from utils.quant_calib import _entries_home

    nvfp4 = BLOCK_ALIASES["NVFP4"]
    linear = QuantParams(nvfp4, torch.ones(4), nvfp4, torch.tensor(2.0), mse=0.5, mse_minmax=0.75,
                         weight_block_scale=torch.ones(4, 2), weight_codes=torch.zeros(4, 32, dtype=torch.uint8))
    smooth = TransformParams({"name": "smoothquant"}, torch.ones(32))
    other = QuantParams(nvfp4, torch.ones(4))
    run = SimpleNamespace(params={"model.layers.1.mlp.down_proj": linear,
                                  "model.layers.1.post_attention_layernorm": smooth,
                                  "model.layers.10.mlp.down_proj": other})
    _entries_home(run, "model.layers.1.", torch.device("meta"))
    moved = run.params["model.layers.1.mlp.down_proj"]
    tensors = [moved.weight_max_value, moved.act_max_value, moved.weight_block_scale, moved.weight_codes]
    assert all(t.is_meta for t in tensors) and moved.weight_codes.dtype == torch.uint8
    assert (moved.mse, moved.mse_minmax, moved.weight_format, moved.act_format) == (0.5, 0.75, nvfp4, nvfp4)
    assert moved.act_channel_shift is None and moved.act_block_clip is None
    assert run.params["model.layers.1.post_attention_layernorm"].value.is_meta
    assert run.params["model.layers.10.mlp.down_proj"] is other and not other.weight_max_value.is_meta
    assert not linear.weight_codes.is_meta  # the entry is replaced, not changed in place


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_offloaded_calibration_keeps_no_parameter_tensor_on_the_gpu():
    """Blocks on the CPU visit the GPU one at a time; the searched codes and scales of their Linears go back with
    them (left on the GPU they made the peak grow with depth); the head, on the GPU here, keeps its own there."""
    model = make_llama(300, layers=3).to("cuda")  # as bench/calib_7b.py places it: the blocks wait on the CPU
    for block in decoder_layers(model):
        block.to("cpu")
    swap_modules(model)
    ids = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(0))
    settings = CalibSettings(get_config("NVFP4_4over6_search_gptq_smooth_headsmooth_config_llama"),
                             QBits.parse([4, 4, 4, 2, 2, 2]), SearchSpace((0.3, 1.2, 6), search_round=1),
                             offload_device="cuda")
    params = calibrate(model, ids, settings)
    blocks = {name: entry for name, entry in params.items() if name.startswith("model.layers.")}
    assert any(entry.weight_codes is not None for entry in blocks.values() if hasattr(entry, "weight_codes"))
    placed = {f"{name}.{field}": value.device.type for name, entry in blocks.items()
              for field, value in vars(entry).items() if isinstance(value, torch.Tensor)}
    assert placed and {name: device for name, device in placed.items() if device != "cpu"} == {}
    # the head and the embedding stay on the GPU in this placement, and so do their entries (a fixed amount)
    assert all(value.device.type == "cuda" for value in vars(params["lm_head"]).values()
               if isinstance(value, torch.Tensor))
