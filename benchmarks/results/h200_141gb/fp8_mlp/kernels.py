"""Time the FP8 MLP's Triton kernels (bionemo/models/fp8_mlp_kernels.py) on the 3B's MLP activation
at micro batch 56 ([57344, 10240] bf16), against the torch references compiled by inductor (what
torchao's path amounts to); bandwidth counts the bytes the Triton kernels move.
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
fwd_bytes = elems * (2 + 2 + 2 + 1)  # act: reads h, writes g (bf16); cast: reads g, writes g8
bwd_bytes = elems * (4 + 2 + 1 + 2 + 2)  # reads dg, h, writes dh, g8_t; reads dh, writes dh8 twice
ref_fwd = torch.compile(mlp8.reference_act_to_fp8)
ref_bwd = torch.compile(mlp8.reference_act_backward_fp8)
print(f"| [{rows}, {ffn}] | ms | GB/s of the bytes the Triton kernels move |\n|---|---:|---:|")
cases = [
    ("reference forward, inductor", lambda: ref_fwd(h, "gelu"), fwd_bytes),
    ("reference backward, inductor", lambda: ref_bwd(dg, h, gs, "gelu", kr), bwd_bytes),
]
for name, fn, nbytes in cases:
    ms = bench(fn)
    print(f"| {name} | {ms:.3f} | {nbytes / ms / 1e6:.0f} |")
for waves in (8, 4):  # programs per SM of the elementwise kernels (the trainer uses 8)
    k._waves = lambda device, w=waves: (
        w * torch.cuda.get_device_properties(device).multi_processor_count
    )
    cases = [
        (f"triton forward, {waves}/SM", lambda: k.act_to_fp8(h, "gelu"), fwd_bytes),
        ("triton backward", lambda: k.act_backward_fp8(dg, h, gs, "gelu", kr), bwd_bytes),
    ]
    for name, fn, nbytes in cases[: 2 if waves == 8 else 1]:
        ms = bench(fn)
        print(f"| {name} | {ms:.3f} | {nbytes / ms / 1e6:.0f} |")
for kernel in (k.fp8_mlp_act_backward, k.fp8_mlp_cast_both):
    print("autotuned", kernel.fn.__name__, kernel.best_config)
