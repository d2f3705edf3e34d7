"""Wrapping the model for training: regional torch.compile, then data parallelism (DDP).

Regional compile: each transformer block is compiled in place (`block.compile()`), and so is the
LM head with its loss. The blocks are instances of one class, so dynamo compiles one graph (forward
and backward) and every layer reuses it: compile time is that of one block, not of L, and the
graph is small enough for inductor to fuse everything between the GEMMs and the attention kernel
(LayerNorm + bf16 cast, rotary, bias + GELU, residual adds, their backwards) and to choose what to
keep for the backward. Shapes start static; a batch of another shape (packed rows vary in length)
triggers one recompile with a dynamic token dimension, after which any length runs.

A model without a `layers` list (another family) falls back to compiling the whole step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def compile_regions(model: nn.Module, *, recompute_pointwise: bool | None = None,
                    **compile_kwargs) -> bool:
    """Compile `model.layers[i]` and `model.lm_head` in place; False if the model has no layers.

    recompute_pointwise: let the partitioner recompute elementwise results in the backward even
    where a GEMM reads them (LayerNorm outputs, GELU output) instead of keeping them: ~45% less
    activation memory, a few % more memory traffic; no GEMM or attention is recomputed. Default:
    on when the blocks' policy is "selective" (activation_checkpointing). Process-wide setting
    (torch._functorch.config.aggressive_recomputation), read when a graph is compiled.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    if recompute_pointwise is None:
        recompute_pointwise = any(getattr(b, "recompute", None) == "selective" for b in layers)
    if recompute_pointwise:
        torch._functorch.config.aggressive_recomputation = True
    # Every block of one model shares one compiled graph; a second model in the same process (a
    # test, a sweep in one process) adds its own entries. Allow a few beyond the default 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    for block in layers:
        block.compile(**compile_kwargs)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        head.compile(**compile_kwargs)
    return True


def convert_to_fp8(model: nn.Module) -> int:
    """Swap the blocks' Linear layers for torchao's Float8Linear (dynamic tensorwise scaling: the
    GEMMs run in fp8 e4m3 forward, e5m2 gradients; weights, optimizer and everything outside the
    GEMMs are unchanged). Needs torchao and compile to be fast. Returns how many were swapped."""
    from torchao.float8 import convert_to_float8_training

    swapped = []

    def in_blocks(module: nn.Module, fqn: str) -> bool:
        # fp8 GEMMs need both dimensions divisible by 16; the LM head (33-wide decoder) stays bf16.
        ok = (isinstance(module, nn.Linear) and fqn.startswith("layers.")
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        if ok:
            swapped.append(fqn)
        return ok

    convert_to_float8_training(model, module_filter_fn=in_blocks)
    return len(swapped)


def wrap_for_training(step_fn: nn.Module, model: nn.Module, *, compile: bool, dp: int,
                      device: torch.device, recompute_pointwise: bool | None = None,
                      fp8: bool = False) -> nn.Module:
    """The module the training loop calls: `step_fn` (which holds `model`) compiled per region
    when `compile`, then under DDP when `dp` > 1."""
    if fp8:
        convert_to_fp8(model)
    whole = compile and not compile_regions(model, recompute_pointwise=recompute_pointwise)
    if dp > 1:
        step_fn = DDP(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    if whole:
        step_fn = torch.compile(step_fn)
    return step_fn
