"""FlashAttention-4 (the flash-attn-4 package) behind torch's variable-length flash attention.

A flash-attention implementation for torch's registry (torch.nn.attention.
register_flash_attention_impl, the hook torch gives attention-kernel providers): `register()`
replaces the CUDA kernels of aten's `_flash_attention_forward` and `_flash_attention_backward`,
which torch.nn.attention.varlen.varlen_attn calls (ESM-2's attention on GPU, packed Geneformer
rows), with flash-attn-4's. SDPA's flash backend calls the same aten op, so it runs them too (its
dense [B, S, H, D] path; the fp32 reference check of benchmarks.profile_step attention holds).

Why not torch's FA4 glue (torch.nn.attention._fa4, "FA4")? On torch 2.11 with flash-attn-4
4.0.0b36 it fails twice (benchmarks/results/h200_141gb/fa4/, calls 1 and 2): it unpacks two values
from flash-attn-4's forward, which returns five since 4.0.0b19, and its backward refuses the
window (-1, -1) that varlen_attn always passes ("windowed attention not supported"). This glue
passes the arguments varlen_attn uses (no window, no dropout: refused otherwise), hands
flash-attn-4 the segments' maximum lengths, and takes the output and log-sum-exp from whatever
the forward returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import torch
from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd


def _no_window(left, right) -> bool:
    return left in (None, -1) and right in (None, -1)


def _refuse(what: str) -> NoReturn:
    raise RuntimeError(f"train.flash_attention=fa4 (flash-attn-4) does not run {what}")


def _forward(
    query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
    return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
    seqused_k=None, alibi_slopes=None, **extra,
):  # fmt: skip
    if dropout_p or return_debug_mask or alibi_slopes is not None or seqused_k is not None:
        _refuse("dropout, debug masks, ALiBi or seqused_k")
    if not _no_window(window_size_left, window_size_right) or extra.get("out") is not None:
        _refuse("windowed attention or a preallocated output")
    varlen = cum_seq_q is not None
    result = _flash_attn_fwd(
        query, key, value,
        cu_seqlens_q=cum_seq_q, cu_seqlens_k=cum_seq_k,
        max_seqlen_q=int(max_q) if varlen else None, max_seqlen_k=int(max_k) if varlen else None,
        softmax_scale=scale, causal=is_causal, return_lse=True,
    )  # fmt: skip
    out, lse = result[0], result[1]
    rng_state = torch.zeros((2,), dtype=torch.uint64, device=query.device)  # no dropout: unused
    offset = torch.zeros((), dtype=torch.uint64, device=query.device)
    return (
        out,
        lse.contiguous(),
        rng_state,
        offset,
        torch.empty(0, dtype=query.dtype, device=query.device),
    )


def _backward(
    grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
    is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None,
    **extra,
):  # fmt: skip
    if dropout_p or not _no_window(window_size_left, window_size_right):
        _refuse("dropout or windowed attention")
    varlen = cum_seq_q is not None
    grads = _flash_attn_bwd(
        query, key, value, out,
        grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous(),
        logsumexp.contiguous(),
        softmax_scale=scale, causal=is_causal,
        cu_seqlens_q=cum_seq_q, cu_seqlens_k=cum_seq_k,
        max_seqlen_q=int(max_q) if varlen else None, max_seqlen_k=int(max_k) if varlen else None,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    return grads[0], grads[1], grads[2]


@dataclass
class Handle:
    """What torch's registry keeps while the implementation is active; remove() (torch's
    restore_flash_attention_impl) drops the library, which takes the kernels back out."""

    library: torch.library.Library | None

    def remove(self) -> None:
        self.library = None


def register() -> Handle:
    lib = torch.library.Library("aten", "IMPL", "CUDA")  # noqa: TOR901
    lib.impl("_flash_attention_forward", _forward, "CUDA")
    lib.impl("_flash_attention_backward", _backward, "CUDA")
    return Handle(lib)
