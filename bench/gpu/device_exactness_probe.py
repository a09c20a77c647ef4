"""GPU machine: does quantize give the same bits on CUDA as on the CPU? (NVFP4, MXFP4, FPQ's E1M2 per row), and
where the NVFP4 block scale codes differ, the first such block's inputs."""
import sys, os
sys.path.insert(0, os.getcwd())
import torch
from quant_layers.formats import BLOCK_ALIASES, parse_format
from quant_layers.quantize import quantize
g = torch.Generator().manual_seed(0)
w = (torch.randn(4096, 1536, generator=g) * 0.02).to(torch.bfloat16)
for name, fmt, mv in (("NVFP4", BLOCK_ALIASES["NVFP4"], torch.tensor(0.11)), ("MXFP4", BLOCK_ALIASES["MXFP4"], torch.tensor(0.11)),
                      ("E1M2 row", parse_format("E1M2"), w.float().abs().amax(1, keepdim=True) * 0.83)):
    cpu = quantize(w.float(), fmt, mv)
    gpu = quantize(w.float().cuda(), fmt, mv.cuda()).cpu()
    bad = cpu != gpu
    print(name, "mismatches", int(bad.sum()), "of", bad.numel(), flush=True)
    if bad.any():
        i, j = [int(v) for v in bad.nonzero()[0]]
        print("  first", i, j, "x", float(w[i, j]), "cpu", float(cpu[i, j]), "gpu", float(gpu[i, j]),
              "block", w[i, (j // 16) * 16:(j // 16) * 16 + 16].float().abs().max().item())
    for dt in (torch.bfloat16,):
        cpu = quantize(w, fmt, mv); gpu = quantize(w.cuda(), fmt, mv.cuda()).cpu()
        print(" ", dt, "mismatches", int((cpu != gpu).sum()), flush=True)
x = torch.rand(1 << 20, generator=g) * 500
print("fp8 cast mismatches", int((x.to(torch.float8_e4m3fn).view(torch.uint8) != x.cuda().to(torch.float8_e4m3fn).cpu().view(torch.uint8)).sum()))
x = torch.rand(1 << 20, generator=g) * 3 + 0.01
for op in ("exp2", "log2", "reciprocal"):
    a = getattr(torch, op)(x); b = getattr(torch, op)(x.cuda()).cpu()
    print(op, "mismatches", int((a != b).sum()))
