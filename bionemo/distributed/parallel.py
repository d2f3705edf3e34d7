"""Wrapping the model for training, in this order: FP8 GEMMs (torchao), regional torch.compile,
then data parallelism: DDP (replicated) or FSDP2 (sharded; HSDP on a 2-D mesh).

Regional compile: each transformer block is compiled in place (`block.compile()`), and so is the
LM head with its loss. The blocks are instances of one class, so dynamo compiles one graph (forward
and backward) and every layer reuses it: compile time is that of one block, not of L, and the
graph is small enough for inductor to fuse everything between the GEMMs and the attention kernel
(LayerNorm + bf16 cast, rotary, bias + GELU, residual adds, their backwards) and to choose what to
keep for the backward. Shapes start static; a batch of another shape (packed rows vary in length)
triggers one recompile with a dynamic token dimension, after which any length runs.

A model without a `layers` list (another family) falls back to compiling the whole step.

FSDP2 (`fully_shard`) makes each block one unit (its weights all-gathered just before its forward
and backward, its gradients reduce-scattered right after) and the root model the rest (embedding,
tied to the LM head's decoder, final norm, LM head). Compile comes first, as in torchtitan: the
blocks are compiled in place, so parameter names (and checkpoints) stay those of DDP, and FSDP's
hooks run outside the compiled graph (dynamo skips them). Activation recompute ("full"
checkpoints around the block call) composes: during the recompute FSDP's pre-backward hook has
already gathered the block's weights.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from bionemo.config import FP8_RECIPES


def compile_regions(
    model: nn.Module, *, recompute_pointwise: bool | None = None, **compile_kwargs
) -> bool:
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


def tune_generated_kernels() -> None:
    """Let inductor time several launch configurations (block sizes, warps) of every elementwise
    and reduction kernel it generates, when the kernel is first built, and keep the fastest,
    instead of its heuristic choice (max_autotune_pointwise; GEMMs stay cuBLAS, as without it).
    One A/B through the trainer on an H200 (benchmarks/results/h200_141gb/levers/): ESM-2 3B with
    FP8 +3.2% (its amax reductions and fp8 casts are such kernels), 650M +2.5%, 3B in bf16 -0.7%
    (within one trial's noise); peak memory unchanged; 10-25 s more compile per process.
    Process-wide, read when a graph is compiled. TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE in the
    environment (inductor's own switch) wins: =0 turns it off."""
    import os

    import torch._inductor.config as inductor

    if "TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE" not in os.environ:
        inductor.max_autotune_pointwise = True


# The recipes that convert a model: the trainer's FP8_RECIPES less "none" (one list of names).
FP8_CONVERSIONS = tuple(r for r in FP8_RECIPES if r != "none")


def convert_to_fp8(
    model: nn.Module,
    recipe: str = "tensorwise",
    skip: tuple[str, ...] = (),
    all_gather: bool = False,
    emulate: bool = False,
    fused_mlp: bool = False,
) -> int:
    """Swap the blocks' Linear layers for torchao's Float8Linear: the GEMMs run in fp8 (e4m3
    forward, e5m2 gradients) with dynamic scales, one per tensor ("tensorwise") or per row
    ("rowwise"); weights, optimizer and everything outside the GEMMs are unchanged. Needs torchao,
    an FP8 GPU, and compile to be fast. skip: Linear layers whose name ends with one of these
    (e.g. "attn.out_proj") stay bf16. all_gather (tensorwise, before FSDP's fully_shard): the
    weights' shards are cast to fp8 before FSDP gathers them, not after (torchao's float8
    all-gather; call update_fp8_scales after each optimizer step). emulate: the GEMMs multiply the
    fp8-rounded operands in fp32 (torchao's emulation: the same quantization without FP8 tensor
    cores), for CPU, where torch's `_scaled_mm` is a reference loop (about 2 s for one 256 x 320 x
    1280 GEMM on a CI core). fused_mlp (tensorwise): each block's MLP runs its two GEMMs through
    bionemo/models/fp8_mlp.py (the same recipe, hand-written kernels around the GEMMs; emulated
    off CUDA) instead of Float8Linear; its Linear layers stay, so parameter names do not change,
    and under the FP8 all-gather they gather in the compute dtype. Returns how many Linear layers
    run in FP8 either way."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in FP8_CONVERSIONS:
        raise ValueError(f"fp8 recipe {recipe!r}; use one of {', '.join(FP8_CONVERSIONS)}")
    if (all_gather or fused_mlp) and recipe != "tensorwise":
        what = "all-gather" if all_gather else "fused MLP"
        raise ValueError(f"fp8 {what} needs the tensorwise recipe, not {recipe!r}")
    fused = 0
    if fused_mlp:
        for block in _blocks(model):
            block.mlp.fused_fp8 = True
            fused += 2
        skip = (*skip, "mlp.fc1", "mlp.fc2")
    config = Float8LinearConfig.from_recipe_name(recipe)
    if all_gather or emulate:
        config = dataclasses.replace(
            config, enable_fsdp_float8_all_gather=all_gather, emulate=emulate
        )
    swapped = []

    def in_blocks(module: nn.Module, fqn: str) -> bool:
        # fp8 GEMMs need both dimensions divisible by 16; the LM head (33-wide decoder) and a
        # fine-tuning head stay bf16. The blocks are `layers.*`, or `encoder.layers.*` under a
        # fine-tuning head (bionemo/finetune.py).
        ok = (
            isinstance(module, nn.Linear)
            and fqn.startswith(("layers.", "encoder.layers."))
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
            and not fqn.endswith(skip)
        )
        if ok:
            swapped.append(fqn)
        return ok

    convert_to_float8_training(model, config=config, module_filter_fn=in_blocks)
    return len(swapped) + fused


def update_fp8_scales(model: nn.Module) -> None:
    """After an optimizer step, with fp8 all-gather: every FP8 weight's scale for the next
    gathers, from one all-reduce of all their maxima (without it each weight's gather would
    all-reduce its own maximum first)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def data_parallel_mesh(device: torch.device, strategy: str, local_world: int):
    """The device mesh FSDP2 shards over: 1-D (every rank) for "fsdp"; for "hsdp" 2-D, nodes x
    ranks of a node ("replicate", "shard"): the weights' all-gathers and the gradients'
    reduce-scatters stay inside a node (NVLink), only an all-reduce of the shards crosses nodes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if strategy == "fsdp":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    nodes = world // local_world
    if world % local_world or nodes < 2:
        raise ValueError(
            f"parallel.data_parallel=hsdp needs several nodes of equal size; this "
            f"job has {world} ranks, {local_world} per node: use "
            f"parallel.data_parallel=fsdp on one node"
        )
    return init_device_mesh(
        device.type, (nodes, local_world), mesh_dim_names=("replicate", "shard")
    )


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: `model.layers`, or its encoder's (a fine-tuning task model)."""
    for m in (model, getattr(model, "encoder", None)):
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise ValueError(f"FSDP shards per transformer block; {type(model).__name__} has no `layers`")


def shard(model: nn.Module, mesh, *, bf16: bool, cpu_offload: bool = False) -> None:
    """FSDP2 in place: each block of `model.layers`, then the root. bf16: gather weights in bf16
    for compute, reduce gradients in fp32, keep fp32 master weights (the shards). Forward inputs
    are not cast (cast_forward_inputs=False): the blocks' fp32 rotary tables stay fp32, as under
    DDP. `model.loss` is a forward method too (it is what the training step calls)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mp = (
        MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        if bf16
        else MixedPrecisionPolicy(cast_forward_inputs=False)
    )
    kw = dict(
        mesh=mesh,
        mp_policy=mp,
        offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    )
    layers = _blocks(model)
    for i, block in enumerate(layers):
        # The last block's weights are needed again at once by the backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < len(layers) - 1, **kw)
    fully_shard(model, **kw)
    register_fsdp_forward_method(model, "loss")


def wrap_for_training(
    step_fn: nn.Module,
    model: nn.Module,
    *,
    compile: bool,
    dp: int,
    device: torch.device,
    recompute_pointwise: bool | None = None,
    fp8: bool | str = False,
    fp8_skip: tuple[str, ...] = (),
    fp8_all_gather: bool = False,
    fp8_mlp: str = "torchao",
    mesh=None,
    bf16: bool = False,
    cpu_offload: bool = False,
) -> nn.Module:
    """The module the training loop calls: `step_fn` (which holds `model`) with the blocks' GEMMs
    in FP8 when `fp8` (a recipe, or True for tensorwise; `fp8_mlp` "fused": the MLPs through
    bionemo/models/fp8_mlp.py), compiled per region when `compile` (on
    CUDA with tuned generated kernels: tune_generated_kernels), then
    sharded over `mesh` (FSDP2) when one is given, else under DDP when `dp` > 1. Off CUDA the FP8
    GEMMs are emulated (convert_to_fp8: the trainer refuses FP8 there; tests and
    benchmarks/profile_step.py --device cpu run it)."""
    recipe = "tensorwise" if fp8 is True else (fp8 or "none")
    if fp8_all_gather and (mesh is None or recipe == "none"):
        raise ValueError("fp8 all-gather needs FSDP (a mesh) and FP8 layers")
    if recipe != "none":
        convert_to_fp8(
            model,
            recipe,
            fp8_skip,
            all_gather=fp8_all_gather,
            emulate=device.type != "cuda",
            fused_mlp=fp8_mlp == "fused",
        )
    if compile and device.type == "cuda":
        tune_generated_kernels()
    whole = compile and not compile_regions(model, recompute_pointwise=recompute_pointwise)
    if mesh is not None:
        shard(model, mesh, bf16=bf16, cpu_offload=cpu_offload)
    elif dp > 1:
        step_fn = DDP(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    if whole:
        step_fn = torch.compile(step_fn)
    return step_fn
