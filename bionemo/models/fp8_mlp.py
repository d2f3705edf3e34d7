"""The transformer block's MLP (fc1 -> GELU or ReLU -> fc2) in FP8, with hand-written kernels
between its GEMMs (train.fp8_mlp=fused).

The recipe is torchao's tensorwise one (torchao.float8, which the block's other FP8 layers use),
step for step: e4m3 activations and weights, e5m2 gradients; one scale per tensor,
finfo.max / max(amax, 1e-12) in float64 then float32; saturating casts; fast accumulation in the
forward GEMMs only. What differs is who writes the memory-bound work around the four GEMMs. Under
torchao and torch.compile, inductor generates it: the activation's maximum and its fp8 cast in the
forward; in the backward the activation's gradient, its maximum, its fp8 cast, the transposed fp8
copy that the weight-gradient GEMM needs (Hopper's fp8 GEMMs take K-major operands only) and the
bias's column sum. On the ESM-2 3B those kernels ran at a fifth to a third of the H200's memory
bandwidth: 4.4 ms of each block's 24.6 ms step at micro batch 32
(benchmarks/results/h200_141gb/levers/log-call4.txt). Here Triton kernels (fp8_mlp_kernels.py)
do it in two passes each way, evaluating the activation once: forward (1) g = act(h) and its
maximum, (2) g's e4m3 cast; backward (3) in one pass over dg and h, dh = dg * act'(h), its maximum
and column sums (fc1's bias gradient, deterministic), and the transposed e4m3 copy of act(h) for
fc2's weight gradient (recomputed from h: the backward keeps h, 2 bytes per element of the
4H-wide activation, and x in e4m3, nothing else), (4) dh's e5m2 cast in both layouts.

The two kernels' entry points are custom ops (`bionemo::fp8_mlp_act`,
`bionemo::fp8_mlp_act_backward`) whose default implementation is the torch reference below; the
CUDA implementation is the Triton one. Off CUDA the GEMMs are emulated (dequantize, multiply in
fp32), as torchao's emulate mode, so CPU tests run the same quantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn  # activations and weights
E5M2 = torch.float8_e5m2  # gradients
AMAX_EPS = 1e-12  # torchao.float8.float8_utils.EPS: the floor of a tensor's maximum
K_ALIGN = 16  # an fp8 GEMM's inner dimension is a multiple of 16 (cuBLASLt)
ACTIVATIONS = ("gelu", "relu")


def fp8_scale(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """The fp32 scale that maps a tensor whose largest magnitude is `amax` onto dtype's range."""
    return (torch.finfo(dtype).max / amax.double().clamp(min=AMAX_EPS)).float()


def fp8_cast(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    top = torch.finfo(dtype).max
    return (x.float() * scale).clamp(-top, top).to(dtype)


def to_fp8(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x in fp8 with its tensorwise scale (x ~ x8 / scale)."""
    scale = fp8_scale(x.abs().max(), dtype)
    return fp8_cast(x, scale, dtype), scale


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """x [M, N] with zero rows up to `rows`: a weight-gradient GEMM's operand, whose inner
    dimension (the tokens) must be a multiple of K_ALIGN. Padded before the fp8 cast (zeros cast
    to zeros, and the maximum is unchanged), as inductor has no fp8 `where`."""
    return x if rows == x.shape[0] else F.pad(x, (0, 0, 0, rows - x.shape[0]))


def padded_rows(m: int) -> int:
    return -(-m // K_ALIGN) * K_ALIGN


def act_fn(h: Tensor, act: str) -> Tensor:
    return F.gelu(h) if act == "gelu" else F.relu(h)


def act_backward(dg: Tensor, h: Tensor, act: str) -> Tensor:
    """dg * act'(h) in dg's dtype: torch's own backward ops (what autograd runs for F.gelu and
    F.relu), so that the reference is torchao's path to the last bit."""
    if act == "gelu":
        return torch.ops.aten.gelu_backward(dg, h)
    return torch.ops.aten.threshold_backward(dg, h, 0)


def _check(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"fp8 MLP activation {act!r}; use one of {', '.join(ACTIVATIONS)}")


def reference_act_to_fp8(h: Tensor, act: str) -> tuple[Tensor, Tensor]:
    """fc2's input: act(h) rounded to h's dtype, then to e4m3 with its scale ([M, F] row-major)."""
    _check(act)
    return to_fp8(act_fn(h.float(), act).to(h.dtype), E4M3)


def reference_act_backward_fp8(
    dg: Tensor, h: Tensor, g_scale: Tensor, act: str, rows: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From fc2's input gradient dg and fc1's output h ([M, F], rows = M rounded up to K_ALIGN):
    dh = dg * act'(h) (rounded to dg's dtype) in e5m2 with its scale, row-major [M, F] (fc1's
    input gradient) and transposed [F, rows] (fc1's weight gradient); act(h) in e4m3 at the
    forward's scale g_scale, transposed [F, rows] (fc2's weight gradient); fc1's bias gradient
    (fp32 [F], the column sums of dh)."""
    _check(act)
    m = h.shape[0]
    dh = act_backward(dg, h, act)
    dh8, dh_scale = to_fp8(pad_rows(dh, rows), E5M2)
    g8 = fp8_cast(pad_rows(act_fn(h.float(), act).to(h.dtype), rows), g_scale, E4M3)
    return dh8[:m], dh_scale, dh8.t().contiguous(), g8.t().contiguous(), dh.float().sum(0)


# The custom ops the autograd function calls: the references above by default, the Triton
# kernels (fp8_mlp_kernels.py) on CUDA. Opaque to inductor, which fuses around them.
@torch.library.custom_op("bionemo::fp8_mlp_act", mutates_args=())
def act_to_fp8(h: Tensor, act: str) -> tuple[Tensor, Tensor]:
    return reference_act_to_fp8(h, act)


@act_to_fp8.register_fake
def _(h: Tensor, act: str) -> tuple[Tensor, Tensor]:
    return h.new_empty(h.shape, dtype=E4M3), h.new_empty((), dtype=torch.float32)


@torch.library.custom_op("bionemo::fp8_mlp_act_backward", mutates_args=())
def act_backward_fp8(
    dg: Tensor, h: Tensor, g_scale: Tensor, act: str, rows: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return reference_act_backward_fp8(dg, h, g_scale, act, rows)


@act_backward_fp8.register_fake
def _(dg, h, g_scale, act, rows):
    m, f = h.shape
    return (
        h.new_empty((m, f), dtype=E5M2),
        h.new_empty((), dtype=torch.float32),
        h.new_empty((f, rows), dtype=E5M2),
        h.new_empty((f, rows), dtype=E4M3),
        h.new_empty((f,), dtype=torch.float32),
    )


@act_to_fp8.register_kernel("cuda")
def _(h: Tensor, act: str) -> tuple[Tensor, Tensor]:
    from bionemo.models import fp8_mlp_kernels

    return fp8_mlp_kernels.act_to_fp8(h, act)


@act_backward_fp8.register_kernel("cuda")
def _(dg, h, g_scale, act, rows):
    from bionemo.models import fp8_mlp_kernels

    return fp8_mlp_kernels.act_backward_fp8(dg, h, g_scale, act, rows)


def _mm(a8: Tensor, a_scale: Tensor, b8: Tensor, b_scale: Tensor, out_dtype, fast: bool,
        bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """(a8 / a_scale) @ (b8 / b_scale) [+ bias]: a row-major, b column-major. On CUDA one
    cuBLASLt fp8 GEMM (bias in its epilogue); elsewhere emulated in fp32, as torchao's emulate."""
    if a8.is_cuda:
        return torch._scaled_mm(
            a8, b8, scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(),
            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
            use_fast_accum=fast,
        )  # fmt: skip
    out = ((a8.float() / a_scale) @ (b8.float() / b_scale)).to(out_dtype)
    return out if bias is None else out + bias.to(out_dtype)


def _col_major(w8: Tensor) -> Tensor:
    """The same matrix stored column-major: a GEMM's right operand (K-major) of w8 [K, N]."""
    return w8.t().contiguous().t()


class _FP8MLP(torch.autograd.Function):
    """y = fc2(act(fc1(x))) for x [M, H] in the compute dtype; weights in their own dtype (fp32
    master weights under DDP, bf16 gathered shards under FSDP's mixed precision). Keeps x in e4m3
    (its rows padded to K_ALIGN), fc1's output h and two scales for the backward; the weights are
    the parameters."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, act: str):
        m = x.shape[0]
        x8, x_scale = to_fp8(pad_rows(x, padded_rows(m)), E4M3)  # padded for fc1's dW GEMM
        w1_8, w1_scale = to_fp8(w1, E4M3)
        h = _mm(x8[:m], x_scale, w1_8.t(), w1_scale, x.dtype, fast=True, bias=b1)
        g8, g_scale = act_to_fp8(h, act)
        w2_8, w2_scale = to_fp8(w2, E4M3)
        y = _mm(g8, g_scale, w2_8.t(), w2_scale, x.dtype, fast=True, bias=b2)
        ctx.save_for_backward(x8, x_scale, w1, h, g_scale, w2)
        ctx.act = act
        ctx.bias_dtypes = (None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x8, x_scale, w1, h, g_scale, w2 = ctx.saved_tensors
        b1_dtype, b2_dtype = ctx.bias_dtypes
        m = dy.shape[0]
        rows = x8.shape[0]
        dy8, dy_scale = to_fp8(pad_rows(dy.contiguous(), rows), E5M2)
        w2_8, w2_scale = to_fp8(w2, E4M3)
        dg = _mm(dy8[:m], dy_scale, _col_major(w2_8), w2_scale, dy.dtype, fast=False)
        dh8, dh_scale, dh8_t, g8_t, db1 = act_backward_fp8(dg, h, g_scale, ctx.act, rows)
        del dg
        dw2 = _mm(dy8.t().contiguous(), dy_scale, g8_t.t(), g_scale, w2.dtype, fast=False)
        w1_8, w1_scale = to_fp8(w1, E4M3)
        dx = _mm(dh8, dh_scale, _col_major(w1_8), w1_scale, dy.dtype, fast=False)
        dw1 = _mm(dh8_t, dh_scale, _col_major(x8), x_scale, w1.dtype, fast=False)
        db1 = None if b1_dtype is None else db1.to(b1_dtype)
        db2 = None if b2_dtype is None else dy.float().sum(0).to(b2_dtype)
        return dx, dw1, db1, dw2, db2, None


def fp8_mlp(x: Tensor, fc1: nn.Linear, fc2: nn.Linear, act: str) -> Tensor:
    """fc2(act(fc1(x))) with FP8 GEMMs (module docstring). x [..., H]; under autocast the GEMMs'
    inputs and outputs are in its dtype, as torchao's Float8Linear."""
    _check(act)
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        x = x.to(torch.get_autocast_dtype(kind))
    shape = x.shape
    with torch.autocast(kind, enabled=False):
        y = _FP8MLP.apply(x.reshape(-1, shape[-1]), fc1.weight, fc1.bias, fc2.weight, fc2.bias, act)
    return y.reshape(*shape[:-1], y.shape[-1])
