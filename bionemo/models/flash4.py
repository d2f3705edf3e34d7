"""FlashAttention-4's kernels (the flash-attn-4 package) in the form torch's FA4 glue calls them.

torch.nn.attention._fa4 (torch 2.11 to 2.13) imports a module and calls its `_flash_attn_fwd`,
unpacking two values (output, logsumexp), and its `_flash_attn_bwd` -> (dq, dk, dv).
flash-attn-4 returned exactly that up to 4.0.0b18; from 4.0.0b19 on `_flash_attn_fwd` returns
more (the probabilities' row maxima, and later more), and torch's unpacking fails ("too many
values to unpack", seen with 4.0.0b36: benchmarks/results/h200_141gb/fa4/call1/). This module
hands torch the first two, so that any release works; the kernels are flash-attn-4's, unchanged.
bionemo.engines.torch_engine.use_flash_attention registers it as torch's "FA4"."""

from __future__ import annotations

from flash_attn.cute import interface as _kernels


def _flash_attn_fwd(*args, **kwargs):
    result = _kernels._flash_attn_fwd(*args, **kwargs)
    return result[0], result[1]


_flash_attn_bwd = _kernels._flash_attn_bwd
