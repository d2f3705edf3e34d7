"""Time the FP8 MLP's Triton kernels (bionemo/models/fp8_mlp_kernels.py) on the 3B's MLP activation
at micro batch 56 ([57344, 10240] bf16), against the torch references compiled by inductor (what
torchao's path amounts to), with the bytes each must move; grid sizes of 4 and 8 programs per SM.
    python3 benchmarks/results/h200_141gb/fp8_mlp/kernels.py [rows] [ffn]
"""

import sys

import torch

from bionemo.models import fp8_mlp as mlp8
from bionemo.models import fp8_mlp_kernels as k

rows = int(sys.argv[1]) if len(sys.argv) > 1 else 57344
ffn = int(sys.argv[2]) if len(sys.argv) > 2 else 10240
torch.manual_seed(0)
h = (torch.randn(rows, ffn, device="cuda") * 2).to(torch.bfloat16)
dg = (torch.randn(rows, ffn, device="cuda") * 1e-3).to(torch.bfloat16)
gs = torch.tensor(100.0, device="cuda")
kr = mlp8.padded_rows(rows)


def bench(fn, n=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


elems = rows * ffn
fwd_bytes = elems * (2 + 2 + 1)  # amax reads h; the cast reads h, writes g8
bwd_bytes = elems * (4 + 4 + 3)  # amax reads dg, h; the tile pass reads both, writes 3 fp8 copies
ref_fwd = torch.compile(mlp8.reference_act_to_fp8)
ref_bwd = torch.compile(mlp8.reference_act_backward_fp8)
print(f"| [{rows}, {ffn}] | ms | GB/s of the bytes it must move |\n|---|---:|---:|")
for name, fn, nbytes in [
    ("reference forward, inductor", lambda: ref_fwd(h, "gelu"), fwd_bytes),
    ("reference backward, inductor", lambda: ref_bwd(dg, h, gs, "gelu", kr), bwd_bytes),
]:
    ms = bench(fn)
    print(f"| {name} | {ms:.3f} | {nbytes / ms / 1e6:.0f} |")
for waves in (4, 8):
    k._waves = lambda device, w=waves: (
        w * torch.cuda.get_device_properties(device).multi_processor_count
    )
    for name, fn, nbytes in [
        (f"triton forward, {waves}/SM", lambda: k.act_to_fp8(h, "gelu"), fwd_bytes),
        (
            f"triton backward, {waves}/SM",
            lambda: k.act_backward_fp8(dg, h, gs, "gelu", kr),
            bwd_bytes,
        ),
        (f"triton amax only (bwd), {waves}/SM", lambda: k._max_of(dg, h, "gelu"), elems * 4),
    ]:
        ms = bench(fn)
        print(f"| {name} | {ms:.3f} | {nbytes / ms / 1e6:.0f} |")
print("autotuned tile config:", k.fp8_mlp_backward_tiles.best_config)
