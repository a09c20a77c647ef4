"""CPU numerics pinned, so that one command writes the same parameter file on every x86 CPU of the same core count.

Why: the search picks each range by an argmin over candidate losses, so a last-bit difference in a matrix product
can change a choice, and every choice after it. MKL picks its GEMM code path by CPU: the quickstart's command on
two 2-core machines of the same kind (an AMD EPYC and an Intel Xeon, torch 2.13.0+cpu both) wrote different
parameter files, and on the Intel machine alone MKL's AVX2 branch wrote a third (docs/reliability.md). Pinned:

- MKL_CBWR=COMPATIBLE: MKL's conditional numerical reproducibility on its one code path that Intel documents as
  giving the same results on Intel and non-Intel CPUs (SSE2, no approximate reciprocals).
- ATEN_CPU_CAPABILITY=avx2: PyTorch's own vectorized CPU kernels (reductions, elementwise) on their AVX2 path, the
  same on every CPU with AVX2, with or without AVX-512.

Both are read when torch loads, so main.py calls `pin_cpu_numerics` before importing anything else. A value already
in the environment wins (e.g. MKL_CBWR=AUTO trades reproducibility for faster CPU matrix products). MKL's results
also depend on the number of threads: files compare across machines with the same core count (or OMP_NUM_THREADS).
GPU kernels are not affected.
"""

from __future__ import annotations

import os

PINNED = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}


def pin_cpu_numerics() -> None:
    """Set PINNED in os.environ where unset; call before torch is imported."""
    for key, value in PINNED.items():
        os.environ.setdefault(key, value)


def cpu_numerics() -> dict:
    """What the results JSON records: the pinned variables as this process saw them, and torch's thread count."""
    import torch

    return {**{key: os.environ.get(key) for key in PINNED}, "threads": torch.get_num_threads()}
