"""The PyTorch engine: our ESM-2/Geneformer modules, regional torch.compile, DDP or FSDP2, AdamW
and torch.distributed.checkpoint. Runs on CPU (gloo) and GPU (NCCL) with the same code; data
parallel only (replicated or sharded: parallel.data_parallel).

Checkpoints are the same whatever the strategy: DCP stores each tensor by parameter name and
global shape, with where each rank's piece lies in it (FSDP's DTensor shards, or DDP's whole
tensors), and re-cuts on load: a checkpoint written under DDP resumes under FSDP, on another
world size, and back.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from bionemo import finetune, hf
from bionemo.checkpoint import balanced_share, load_weights
from bionemo.config import TrainerConfig
from bionemo.distributed import DistEnv
from bionemo.distributed.parallel import data_parallel_mesh, update_fp8_scales, wrap_for_training
from bionemo.models import build_model

log = logging.getLogger("bionemo.engine")


class MaskedLMLoss(nn.Module):
    """Puts the loss inside forward() so DDP (and torch.compile) see the whole computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, cu_seqlens=None, max_seqlen=None):
        return self.model.loss(input_ids, attention_mask, labels, cu_seqlens, max_seqlen)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device; host values (a packed batch's max_seqlen) stay where they are."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def build_optimizer(model: nn.Module, cfg: TrainerConfig, device: torch.device):
    # Megatron's convention: no weight decay on biases and LayerNorm parameters (1-D tensors;
    # FSDP's DTensor parameters keep their global ndim).
    # Fine-tuning splits the trainable parameters by learning rate (bionemo/finetune.py).
    o = cfg.optim
    groups = []
    for params, extra in finetune.param_sets(model, cfg):  # mlm: every parameter, one set
        groups += [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay, **extra},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra},
        ]
    on_gpu = device.type == "cuda" and not cfg.parallel.fsdp_cpu_offload  # offload: CPU step
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=o.fused and on_gpu)


def has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_problem(recipe: str, device: torch.device) -> str | None:
    """Why `train.fp8=<recipe>` cannot run in this process, or None. Checked before the model is
    built: a benchmark table row may turn FP8 on (H200 3B), and torchao is an optional
    dependency, so a cluster without it fails here in one line, not in the middle of start-up."""
    if recipe == "none":
        return None
    try:
        import torchao.float8  # noqa: F401  (the library that does the FP8 training)
    except ImportError as e:
        return (
            f"train.fp8={recipe} runs through torchao, which this Python cannot import "
            f"({type(e).__name__}: {e}): install it where the job runs (pip install "
            f"'bionemo-hpc[fp8]'), or set train.fp8=none"
        )
    if not has_fp8(device):
        return (
            f"train.fp8={recipe} needs an FP8 GPU (compute capability 8.9 or more: H100/H200 "
            f"class); this rank runs on {device_name(device)}: set train.fp8=none"
        )
    return None


# The name bionemo.models.flash4 registers under in torch's flash-attention registry (torch's own
# "FA4" entry is its glue, which this one replaces for varlen_attn).
FA4_IMPL = "bionemo-fa4"


def use_flash_attention(impl: str, device: torch.device) -> str | None:
    """Make torch's flash attention run `impl`'s kernels in this process ("fa4": FlashAttention-4
    through torch.nn.attention.activate_flash_attention_impl, which replaces the kernels behind
    varlen_attn and SDPA's flash backend; "torch": nothing to do). Returns why it cannot, or None.
    Checked before the model is built, as fp8_problem: flash-attn-4 is an optional dependency.
    The kernels are flash-attn-4's, registered through bionemo.models.flash4 (its docstring says
    why not through torch's own FA4 glue)."""
    if impl == "torch":
        return None
    try:
        from torch.nn.attention import (
            activate_flash_attention_impl,
            register_flash_attention_impl,
        )

        from bionemo.models import flash4  # imports flash-attn-4's kernels
    except ImportError as e:
        return (
            f"train.flash_attention={impl} needs torch >= 2.11 and the flash-attn-4 package, "
            f"which this Python cannot import ({type(e).__name__}: {e}): install it where the "
            f"job runs (pip install 'bionemo-hpc[fa4]'), or set train.flash_attention=torch"
        )
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    if major not in (9, 10):
        return (
            f"train.flash_attention={impl} needs a Hopper or Blackwell GPU (compute capability "
            f"9.x or 10.x: H100/H200/B200 class); this rank runs on {device_name(device)}: set "
            f"train.flash_attention=torch"
        )
    register_flash_attention_impl(FA4_IMPL, register_fn=flash4.register)
    activate_flash_attention_impl(FA4_IMPL)
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def local_world_size(env: DistEnv) -> int:
    """Ranks per node, from every rank's local rank (torchrun and SLURM number them 0..n-1 on each
    node): the largest plus one, the same on every rank."""
    ranks = [None] * env.world_size
    dist.all_gather_object(ranks, env.local_rank)
    return max(ranks) + 1


def sharding_mesh(cfg: TrainerConfig, env: DistEnv, device: torch.device):
    """FSDP's device mesh, or None under DDP. One rank alone still gets a process group (FSDP
    needs one): a single-GPU FSDP run is not sharded, but uses FSDP's mixed precision."""
    if cfg.parallel.data_parallel == "ddp":
        return None
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=dist.HashStore(),
            rank=0,
            world_size=1,
        )
    mesh = data_parallel_mesh(device, cfg.parallel.data_parallel, local_world_size(env))
    log.info(
        "FSDP2 over mesh %s %s%s%s",
        tuple(mesh.shape),
        mesh.mesh_dim_names,
        ", CPU offload" if cfg.parallel.fsdp_cpu_offload else "",
        ", fp8 all-gather" if cfg.parallel.fp8_all_gather else "",
    )
    return mesh


def _kept_stager(device: torch.device):
    """DCP's staging to host memory (pinned on GPU), kept for the whole run so that its pinned
    buffers are allocated once (the first save of a 650M pins ~7.8 GB: 11 s on an H200).

    torch 2.11's async_save closes the stager it is handed once a write is done, and closing
    empties the inner StateDictStager's copy tables: the next save failed with "KeyError: <class
    'type'>" on an H200, also with close() overridden on the outer stager alone. So neither close
    does anything here (the buffers go with the process), and a stager whose tables were emptied
    anyway (by a torch that closes it some other way) is replaced before it stages: that save
    pins its buffers again, but it succeeds."""
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = device.type == "cuda"

    class KeptStateDictStager(StateDictStager):
        def close(self) -> None:
            pass

    class KeptStager(DefaultStager):
        def __init__(self) -> None:
            super().__init__(
                StagingOptions(
                    use_pinned_memory=cuda,
                    use_shared_memory=False,
                    use_async_staging=False,
                    use_non_blocking_copy=cuda,
                )
            )
            self._renew()

        def _renew(self) -> None:
            self._state_dict_stager = KeptStateDictStager(pin_memory=cuda, share_memory=False)

        def stage(self, state_dict, **kwargs):
            if not getattr(self._state_dict_stager, "_deepcopy_dispatch", True):
                self._renew()
            return super().stage(state_dict, **kwargs)

        def close(self) -> None:
            pass

    return KeptStager()


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def replica_share(state: dict, rank: int, world: int) -> dict:
    """This rank's part of a replicated (DDP) state, for an asynchronous save. Every DDP rank
    holds the whole model and optimizer state, and DCP's staging copies all it is handed to host
    memory before it deduplicates what each rank writes: 8 ranks of a 3B would pin 8 x 34 GB of
    one node's memory. Here each parameter (its weight and optimizer state together) goes to one
    rank, largest first to the least loaded (the same split at every save); values that are not
    tensors (param_groups) stay on every rank and DCP writes them once. The checkpoint's metadata
    joins the parts: a load reads every key wherever it was written, at any world size and
    under either strategy."""
    model, optim = state["model"], state["optim"]
    per_param = optim.get("state", {})
    sizes: dict[str, int] = {}
    for name, value in model.items():
        sizes[name] = sizes.get(name, 0) + _nbytes(value)
    for name, value in per_param.items():
        sizes[name] = sizes.get(name, 0) + sum(map(_nbytes, value.values()))
    mine = set(balanced_share(sizes, rank, world))
    return {
        "model": {k: v for k, v in model.items() if k in mine or not isinstance(v, torch.Tensor)},
        "optim": {**optim, "state": {k: v for k, v in per_param.items() if k in mine}},
    }


def staged_gb(state: dict) -> float:
    """The tensors' bytes in a (nested) state dict, in GB."""
    total, todo = 0, [state]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            todo.extend(node.values())
        elif isinstance(node, (list, tuple)):
            todo.extend(node)
        else:
            total += _nbytes(node)
    return total / 1e9


class AsyncSaver:
    """dcp.async_save with one kept stager (_kept_stager). Should staging still fail with the
    KeyError of a stager torch emptied, the save is staged once more with a new stager (its
    buffers pinned again) rather than failing the run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stager = _kept_stager(device)

    def save(self, state, path, group=None):
        for attempt in (1, 2):
            try:
                future = dcp.async_save(
                    state, checkpoint_id=path, process_group=group, async_stager=self.stager
                )
            except KeyError as e:
                error: BaseException | None = e
            else:  # staging runs before async_save returns: its failure is already in the future
                error = future.exception() if future.done() else None
                if not isinstance(error, KeyError):
                    return future
            log.warning(
                "asynchronous save of %s: staging failed (KeyError: %s)%s",
                path,
                error,
                "; staging again with a new stager" if attempt == 1 else "",
            )
            self.stager = _kept_stager(self.device)
        assert error is not None
        raise error


class TorchEngine:
    name = "torch"
    tp = pp = 1

    def __init__(self, cfg: TrainerConfig, env: DistEnv, device: torch.device, init_from=None):
        if cfg.parallel.tensor != 1 or cfg.parallel.pipeline != 1:
            raise ValueError(
                "parallel.tensor/pipeline > 1 need the megatron engine (train.engine=megatron); "
                "the torch engine is data-parallel only (set parallel.tensor=1 parallel.pipeline=1)"
            )
        self.cfg, self.device = cfg, device
        self.dp_size = cfg.check_parallel(env.world_size)
        self.dp_rank = env.rank
        self.world_size = env.world_size
        problem = fp8_problem(cfg.train.fp8, device) or use_flash_attention(
            cfg.train.flash_attention, device
        )
        if problem:
            raise ValueError(problem)
        self.sharded = cfg.parallel.data_parallel != "ddp"  # FSDP2: weights are DTensor shards
        torch.manual_seed(cfg.train.seed)  # same init on every rank
        with device:  # initialise on the device: a 3B model's init on the host takes minutes
            self.model = build_model(cfg.model)
        if init_from is not None and hf.is_hf_folder(init_from):
            hf.load_into(init_from, self.model)
        elif init_from is not None:
            from bionemo.engines import checkpoint_engine

            if checkpoint_engine(init_from) == "megatron":
                raise ValueError(
                    f"checkpoint.init_from: {init_from} holds megatron-engine weights; convert "
                    f"them first (python -m bionemo.engines.convert {init_from} OUT) and point "
                    f"checkpoint.init_from at OUT, or use train.engine=megatron"
                )
            load_weights(init_from, self.model)
        self.model = finetune.task_model(cfg, self.model)  # mlm: the model; else encoder + head
        # Weights are loaded whole above, before any sharding; the optimizer is built after it,
        # on the parameters FSDP leaves (DTensor shards replace the originals).
        bf16 = device.type == "cuda" and cfg.train.precision == "bf16-mixed"
        self.step_fn = wrap_for_training(
            MaskedLMLoss(self.model),
            self.model,
            compile=cfg.train.compile,
            dp=self.dp_size,
            device=device,
            fp8=cfg.train.fp8,
            fp8_all_gather=cfg.parallel.fp8_all_gather,
            fp8_mlp=cfg.train.fp8_mlp,
            mesh=sharding_mesh(cfg, env, device),
            bf16=bf16,
            cpu_offload=cfg.parallel.fsdp_cpu_offload,
        )
        self.optimizer = build_optimizer(self.model, cfg, device)
        # Under FSDP the blocks compute in bf16 already (the gathered weights); autocast still
        # keeps LayerNorm, softmax and the loss in fp32, as under DDP.
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    def _gradient_sync(self, sync: bool):
        """Reduce gradients in this backward (the last micro batch) or only accumulate them."""
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)
            return nullcontext()
        return nullcontext() if sync or self.dp_size == 1 else self.step_fn.no_sync()

    def train_step(self, micro_batches: list[dict], lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a fine-tuning head's own lr
        accum = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            with self._gradient_sync(i == accum - 1), self.autocast:
                loss = self.step_fn(**to_device(batch, self.device)) / accum
            loss.backward()
            total += loss.detach()
        if self.cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.parallel.fp8_all_gather:
            update_fp8_scales(self.model)  # the next step's gathers use these
        return total

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        self.model.eval()
        try:
            with self.autocast:
                return self.model.loss(**to_device(batch, self.device)).float()
        finally:
            self.model.train()

    # ------------------------------------------------------------ checkpoint I/O
    def save(self, path, group=None, asynchronous: bool = False):
        """Write model and optimizer shards into `path`. asynchronous: copy them to host memory
        (pinned on GPU) now and write them from a background thread; returns that write's
        future, which the Checkpointer waits for before it commits the folder."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if not asynchronous:
            dcp.save(state, checkpoint_id=path, process_group=group)
            return None
        if not self.sharded and self.world_size > 1:  # DDP: each rank stages its part only
            whole, state = state, replica_share(state, self.dp_rank, self.world_size)
            if self._saver is None:
                log.info(
                    "asynchronous saves: rank %d stages %.3g of the %.3g GB state (DDP: each "
                    "rank a part)",
                    self.dp_rank,
                    staged_gb(state),
                    staged_gb(whole),
                )
        if self._saver is None:  # kept: its pinned buffers are reused by every later save
            self._saver = AsyncSaver(self.device)
        return self._saver.save(state, path, group)

    def load(self, path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        set_state_dict(
            self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd
        )

    supports_async_save = True
    _saver: AsyncSaver | None = None

    def rng_state(self) -> dict:
        return {}

    def set_rng_state(self, state: dict) -> None:
        pass
