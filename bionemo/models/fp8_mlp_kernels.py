"""Triton kernels of the FP8 MLP (fp8_mlp.py: the recipe, and why these exist), CUDA only.

Three kernels over the MLP's 4H-wide activation ([M, F], row-major):
  forward   fp8_mlp_amax (max |act(h)|), then fp8_mlp_cast (act(h) in e4m3);
  backward  fp8_mlp_amax (max |dh|, dh = dg * act'(h)), then fp8_mlp_backward_tiles: one pass
            over dg and h in [BM, BN] tiles that writes dh in e5m2 row-major and transposed,
            act(h) in e4m3 transposed, and the tile's column sums of dh (fc1's bias gradient,
            summed by torch over the row blocks: deterministic).
A tensor's maximum is an int32 atomic max of the fp32 bits (for non-negative floats the two orders
agree), one per program of a grid the size of a few waves; the scale is then computed by torch in
float64, as torchao does, so scales are bitwise those of fp8_mlp's reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bionemo.models.fp8_mlp import E4M3, E5M2, fp8_scale

_ACT = {"gelu": 0, "relu": 1}
_BLOCK = 2048  # elements per iteration of the elementwise kernels (8 per thread at 8 warps)
ROWS_PER_PROGRAM = 512  # _backward_tiles: rows each program covers, BM at a time


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:  # exact GELU, as torch's CUDA kernel: x * 0.5 * (1 + erf(x / sqrt 2))
        out = h * 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    else:
        out = tl.maximum(h, 0.0)
    return out


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    if ACT == 0:  # torch's gelu_backward: cdf + x * pdf
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        out = cdf + h * (tl.exp(-0.5 * h * h) * 0.3989422804014327)
    else:
        out = tl.where(h > 0.0, 1.0, 0.0)
    return out


@triton.jit
def fp8_mlp_amax(dg_ptr, h_ptr, amax_ptr, n, iters, BLOCK: tl.constexpr, ACT: tl.constexpr,
          GRAD: tl.constexpr):  # fmt: skip
    """amax_ptr (int32 bits of an fp32, zeroed) <- max |act(h)|, or max |dg * act'(h)| (GRAD),
    each rounded to its tensor's dtype first, as the reference rounds before its maximum."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pid, programs = tl.program_id(0).to(tl.int64), tl.num_programs(0)
    for i in range(0, iters):
        offs = (i * programs + pid) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if GRAD:
            dg = tl.load(dg_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            v = (dg * _act_grad(h, ACT)).to(dg_ptr.dtype.element_ty).to(tl.float32)
        else:
            v = _act(h, ACT).to(h_ptr.dtype.element_ty).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(v))
    tl.atomic_max(amax_ptr, tl.max(acc, axis=0).to(tl.int32, bitcast=True))


@triton.jit
def fp8_mlp_cast(h_ptr, g8_ptr, scale_ptr, n, iters, BLOCK: tl.constexpr, ACT: tl.constexpr,
          TOP: tl.constexpr):  # fmt: skip
    """g8 <- act(h) (rounded to h's dtype) * scale, saturated, in g8's fp8 dtype."""
    scale = tl.load(scale_ptr)
    pid, programs = tl.program_id(0).to(tl.int64), tl.num_programs(0)
    for i in range(0, iters):
        offs = (i * programs + pid) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = _act(h, ACT).to(h_ptr.dtype.element_ty).to(tl.float32)
        g8 = tl.clamp(g * scale, -TOP, TOP).to(g8_ptr.dtype.element_ty)
        tl.store(g8_ptr + offs, g8, mask=ok)


@triton.autotune(
    configs=[
        triton.Config({"BM": 128, "BN": 64}, num_warps=8),
        triton.Config({"BM": 64, "BN": 128}, num_warps=8),
        triton.Config({"BM": 128, "BN": 128}, num_warps=8),
        triton.Config({"BM": 128, "BN": 64}, num_warps=4),
    ],
    key=["F"],
)
@triton.jit
def fp8_mlp_backward_tiles(
    dg_ptr, h_ptr, dh8_ptr, dh8_t_ptr, g8_t_ptr, colsum_ptr, dh_scale_ptr, g_scale_ptr,
    M, F, ROWS,
    ACT: tl.constexpr, ROWS_PER_PROG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    TOP_DH: tl.constexpr, TOP_G: tl.constexpr,
):  # fmt: skip
    """Program (i, j): rows [i * ROWS_PER_PROG, (i + 1) * ROWS_PER_PROG) of columns
    [j * BN, (j + 1) * BN). Rows M..ROWS (the K_ALIGN padding) are zeros in the transposed
    outputs: their dg and h load as 0, and act(0) = act'(0) * 0 = 0."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < F
    dh_scale = tl.load(dh_scale_ptr)
    g_scale = tl.load(g_scale_ptr)
    colsum = tl.zeros([BN], dtype=tl.float32)
    for t in range(ROWS_PER_PROG // BM):
        rows = (pid_m.to(tl.int64) * ROWS_PER_PROG + t * BM) + tl.arange(0, BM)
        ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows[:, None] * F + cols[None, :]
        dg = tl.load(dg_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dh = (dg * _act_grad(h, ACT)).to(dg_ptr.dtype.element_ty).to(tl.float32)
        colsum += tl.sum(dh, axis=0)
        dh8 = tl.clamp(dh * dh_scale, -TOP_DH, TOP_DH).to(dh8_ptr.dtype.element_ty)
        tl.store(dh8_ptr + offs, dh8, mask=ok)
        g = _act(h, ACT).to(h_ptr.dtype.element_ty).to(tl.float32)
        g8 = tl.clamp(g * g_scale, -TOP_G, TOP_G).to(g8_t_ptr.dtype.element_ty)
        # transposed [F, ROWS]: tokens contiguous, 128 bytes per column at BM = 128
        t_offs = cols[:, None] * ROWS + rows[None, :]
        t_ok = col_ok[:, None] & (rows < ROWS)[None, :]
        tl.store(dh8_t_ptr + t_offs, tl.trans(dh8), mask=t_ok)
        tl.store(g8_t_ptr + t_offs, tl.trans(g8), mask=t_ok)
    tl.store(colsum_ptr + pid_m.to(tl.int64) * F + cols, colsum, mask=col_ok)


def _waves(device: torch.device) -> int:
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _grid(n: int, device: torch.device) -> tuple[int, int]:
    """A grid of at most a few waves for n elements, and the iterations each program makes."""
    programs = max(1, min(_waves(device), triton.cdiv(n, _BLOCK)))
    return programs, triton.cdiv(n, programs * _BLOCK)


def _max_of(dg: torch.Tensor | None, h: torch.Tensor, act: str) -> torch.Tensor:
    bits = torch.zeros(1, dtype=torch.int32, device=h.device)
    n = h.numel()
    programs, iters = _grid(n, h.device)
    fp8_mlp_amax[(programs,)](
        h if dg is None else dg, h, bits, n, iters,
        BLOCK=_BLOCK, ACT=_ACT[act], GRAD=dg is not None, num_warps=8,
    )  # fmt: skip
    return bits.view(torch.float32)[0]


def act_to_fp8(h: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.contiguous()
    scale = fp8_scale(_max_of(None, h, act), E4M3)
    g8 = torch.empty(h.shape, dtype=E4M3, device=h.device)
    n = h.numel()
    programs, iters = _grid(n, h.device)
    fp8_mlp_cast[(programs,)](
        h, g8, scale, n, iters, BLOCK=_BLOCK, ACT=_ACT[act], TOP=torch.finfo(E4M3).max, num_warps=8
    )
    return g8, scale


def act_backward_fp8(dg, h, g_scale, act: str, rows: int):
    dg, h = dg.contiguous(), h.contiguous()
    m, f = h.shape
    dh_scale = fp8_scale(_max_of(dg, h, act), E5M2)
    dh8 = torch.empty((m, f), dtype=E5M2, device=h.device)
    dh8_t = torch.empty((f, rows), dtype=E5M2, device=h.device)
    g8_t = torch.empty((f, rows), dtype=E4M3, device=h.device)
    blocks = triton.cdiv(rows, ROWS_PER_PROGRAM)
    colsums = torch.empty((blocks, f), dtype=torch.float32, device=h.device)
    fp8_mlp_backward_tiles[lambda meta: (blocks, triton.cdiv(f, meta["BN"]))](
        dg, h, dh8, dh8_t, g8_t, colsums, dh_scale, g_scale.float(), m, f, rows,
        ACT=_ACT[act], ROWS_PER_PROG=ROWS_PER_PROGRAM,
        TOP_DH=torch.finfo(E5M2).max, TOP_G=torch.finfo(E4M3).max,
    )  # fmt: skip
    return dh8, dh_scale, dh8_t, g8_t, colsums.sum(0)
