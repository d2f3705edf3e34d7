"""Triton kernels of the FP8 MLP (fp8_mlp.py: the recipe, and why these exist), CUDA only.

Tensorwise scaling needs a tensor's maximum before its cast, so each direction takes two passes
over the MLP's 4H-wide activation ([M, F], row-major). The exact GELU (an erf, and an exp in its
derivative) costs more than the bytes it touches: on an H200 a pass that evaluates it ran at 40%
of the memory bandwidth (benchmarks/results/h200_141gb/fp8_mlp/, call 1). So the first pass
evaluates it once and writes its result in the activation's dtype; the second only casts:
  forward   fp8_mlp_act: g = act(h), max |g|;  then fp8_mlp_cast: g in e4m3.
  backward  fp8_mlp_act_backward, in [BM, BN] tiles: dh = dg * act'(h), max |dh|, the tile's
            column sums of dh (fc1's bias gradient: partial sums per row block, added by torch,
            deterministic), and act(h) in e4m3 at the forward's scale, transposed (fc2's weight
            gradient); then fp8_mlp_cast_both: dh in e5m2, row-major and transposed.
A maximum is an int32 atomic max of the fp32 bits (for non-negative floats the orders agree), one
per program; the scale is then computed by torch in float64, as torchao does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bionemo.models.fp8_mlp import E4M3, E5M2, fp8_scale

_ACT = {"gelu": 0, "relu": 1}
_BLOCK = 2048  # elements per iteration of the elementwise kernels (8 per thread at 8 warps)
ROWS_PER_PROGRAM = 512  # the tiled kernels: rows each program covers, BM at a time
_TILES = [
    triton.Config({"BM": 128, "BN": 64}, num_warps=4),
    triton.Config({"BM": 128, "BN": 64}, num_warps=8),
    triton.Config({"BM": 64, "BN": 128}, num_warps=8),
    triton.Config({"BM": 128, "BN": 128}, num_warps=8),
]


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:  # exact GELU, as torch's CUDA kernel: x * 0.5 * (1 + erf(x / sqrt 2))
        out = h * 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    else:
        out = tl.maximum(h, 0.0)
    return out


@triton.jit
def _act_and_backward(dg, h, ACT: tl.constexpr):
    """(act(h), dg * act'(h)) with one erf; as torch's gelu_backward (cdf + x * pdf) and
    threshold_backward (a selection: exactly 0, never -0, where h <= 0)."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        g = h * cdf
        dh = dg * (cdf + h * (tl.exp(-0.5 * h * h) * 0.3989422804014327))
    else:
        g = tl.maximum(h, 0.0)
        dh = tl.where(h > 0.0, dg, 0.0)
    return g, dh


@triton.jit
def fp8_mlp_act(h_ptr, g_ptr, amax_ptr, n, iters, BLOCK: tl.constexpr, ACT: tl.constexpr):
    """g <- act(h) in g's dtype; amax_ptr (int32 bits of an fp32, zeroed) <- max |g|."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pid, programs = tl.program_id(0).to(tl.int64), tl.num_programs(0)
    for i in range(0, iters):
        offs = (i * programs + pid) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = _act(h, ACT).to(g_ptr.dtype.element_ty)
        tl.store(g_ptr + offs, g, mask=ok)
        acc = tl.maximum(acc, tl.abs(g.to(tl.float32)))
    tl.atomic_max(amax_ptr, tl.max(acc, axis=0).to(tl.int32, bitcast=True))


@triton.jit
def fp8_mlp_cast(x_ptr, x8_ptr, scale_ptr, n, iters, BLOCK: tl.constexpr, TOP: tl.constexpr):
    """x8 <- x * scale, saturated, in x8's fp8 dtype."""
    scale = tl.load(scale_ptr)
    pid, programs = tl.program_id(0).to(tl.int64), tl.num_programs(0)
    for i in range(0, iters):
        offs = (i * programs + pid) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(x8_ptr + offs, tl.clamp(x * scale, -TOP, TOP).to(x8_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_TILES, key=["F"])
@triton.jit
def fp8_mlp_act_backward(
    dg_ptr, h_ptr, dh_ptr, g8_t_ptr, colsum_ptr, amax_ptr, g_scale_ptr, M, F, ROWS,
    ACT: tl.constexpr, ROWS_PER_PROG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    TOP_G: tl.constexpr,
):  # fmt: skip
    """Program (i, j): rows [i * ROWS_PER_PROG, (i + 1) * ROWS_PER_PROG) of columns
    [j * BN, (j + 1) * BN). dh <- dg * act'(h) in dh's dtype; colsum[i] <- its column sums;
    amax_ptr <- max |dh|; g8_t [F, ROWS] <- act(h) in e4m3 at the forward's scale, transposed.
    Rows M..ROWS (the K_ALIGN padding) are zeros in g8_t: h loads as 0 there, and act(0) = 0."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < F
    g_scale = tl.load(g_scale_ptr)
    colsum = tl.zeros([BN], dtype=tl.float32)
    amax = tl.zeros([BN], dtype=tl.float32)
    for t in range(ROWS_PER_PROG // BM):
        rows = (pid_m.to(tl.int64) * ROWS_PER_PROG + t * BM) + tl.arange(0, BM)
        ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows[:, None] * F + cols[None, :]
        dg = tl.load(dg_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g, dh = _act_and_backward(dg, h, ACT)
        dh = dh.to(dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + offs, dh, mask=ok)
        dh = dh.to(tl.float32)
        colsum += tl.sum(dh, axis=0)
        amax = tl.maximum(amax, tl.max(tl.abs(dh), axis=0))
        g = g.to(h_ptr.dtype.element_ty).to(tl.float32)
        g8 = tl.clamp(g * g_scale, -TOP_G, TOP_G).to(g8_t_ptr.dtype.element_ty)
        # transposed [F, ROWS]: tokens contiguous, 128 bytes per column at BM = 128
        t_offs = cols[:, None] * ROWS + rows[None, :]
        tl.store(g8_t_ptr + t_offs, tl.trans(g8), mask=col_ok[:, None] & (rows < ROWS)[None, :])
    tl.store(colsum_ptr + pid_m.to(tl.int64) * F + cols, colsum, mask=col_ok)
    tl.atomic_max(amax_ptr, tl.max(amax, axis=0).to(tl.int32, bitcast=True))


@triton.autotune(configs=_TILES, key=["F"])
@triton.jit
def fp8_mlp_cast_both(
    x_ptr, x8_ptr, x8_t_ptr, scale_ptr, M, F, ROWS,
    ROWS_PER_PROG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TOP: tl.constexpr,
):  # fmt: skip
    """x8 [M, F] and x8_t [F, ROWS] <- x * scale, saturated, in fp8; zeros past M in x8_t."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < F
    scale = tl.load(scale_ptr)
    for t in range(ROWS_PER_PROG // BM):
        rows = (pid_m.to(tl.int64) * ROWS_PER_PROG + t * BM) + tl.arange(0, BM)
        ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows[:, None] * F + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x8 = tl.clamp(x * scale, -TOP, TOP).to(x8_ptr.dtype.element_ty)
        tl.store(x8_ptr + offs, x8, mask=ok)
        t_offs = cols[:, None] * ROWS + rows[None, :]
        tl.store(x8_t_ptr + t_offs, tl.trans(x8), mask=col_ok[:, None] & (rows < ROWS)[None, :])


def _waves(device: torch.device) -> int:
    """Programs of the elementwise kernels: 8 per SM (call 1: 4 per SM was 3-9% slower)."""
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def _grid(n: int, device: torch.device) -> tuple[int, int]:
    """A grid of at most a few waves for n elements, and the iterations each program makes."""
    programs = max(1, min(_waves(device), triton.cdiv(n, _BLOCK)))
    return programs, triton.cdiv(n, programs * _BLOCK)


def _bits(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def act_to_fp8(h: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.contiguous()
    n = h.numel()
    programs, iters = _grid(n, h.device)
    g, bits = torch.empty_like(h), _bits(h.device)
    fp8_mlp_act[(programs,)](h, g, bits, n, iters, BLOCK=_BLOCK, ACT=_ACT[act], num_warps=8)
    scale = fp8_scale(bits.view(torch.float32)[0], E4M3)
    g8 = torch.empty(h.shape, dtype=E4M3, device=h.device)
    fp8_mlp_cast[(programs,)](
        g, g8, scale, n, iters, BLOCK=_BLOCK, TOP=torch.finfo(E4M3).max, num_warps=8
    )
    return g8, scale


def act_backward_fp8(dg, h, g_scale, act: str, rows: int):
    dg, h = dg.contiguous(), h.contiguous()
    m, f = h.shape
    blocks = triton.cdiv(rows, ROWS_PER_PROGRAM)

    def grid(meta):
        return blocks, triton.cdiv(f, meta["BN"])

    dh, bits = torch.empty_like(dg), _bits(h.device)
    g8_t = torch.empty((f, rows), dtype=E4M3, device=h.device)
    colsums = torch.empty((blocks, f), dtype=torch.float32, device=h.device)
    fp8_mlp_act_backward[grid](
        dg, h, dh, g8_t, colsums, bits, g_scale.float(), m, f, rows,
        ACT=_ACT[act], ROWS_PER_PROG=ROWS_PER_PROGRAM, TOP_G=torch.finfo(E4M3).max,
    )  # fmt: skip
    dh_scale = fp8_scale(bits.view(torch.float32)[0], E5M2)
    dh8 = torch.empty((m, f), dtype=E5M2, device=h.device)
    dh8_t = torch.empty((f, rows), dtype=E5M2, device=h.device)
    fp8_mlp_cast_both[grid](
        dh, dh8, dh8_t, dh_scale, m, f, rows,
        ROWS_PER_PROG=ROWS_PER_PROGRAM, TOP=torch.finfo(E5M2).max,
    )  # fmt: skip
    return dh8, dh_scale, dh8_t, g8_t, colsums.sum(0)
