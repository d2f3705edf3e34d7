"""The megatron engine: megatron-core tensor/pipeline parallelism behind the trainer's loop.

Only what an engine owns differs from the torch engine (bionemo/engines/__init__.py): the model
is `bionemo.models.esm2.megatron.MegatronESM2` in bf16 (Float16Module), wrapped in megatron-core's
DistributedDataParallel (fp32 gradient buffers) with the distributed optimizer (fp32 main
weights and Adam moments sharded over data-parallel ranks); a step is megatron's
forward-backward schedule over the step's micro batches (1F1B across pipeline stages), then the
optimizer's step (global grad-norm clip across TP/PP included); checkpoints are megatron's
dist_checkpointing, saved in the run directory's atomic step folders and loadable at another
TP/PP layout (the distributed optimizer's 'fully_reshardable' format).

Data, masking, learning-rate schedule, metrics, stop protocol and run directory are the trainer's.
Every rank of one tensor/pipeline group reads the same micro batches (data-parallel rank from
megatron's parallel state).

CUDA only: megatron-core allocates its gradient buffers and RNG tracker on the current device.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from bionemo.config import TrainerConfig
from bionemo.distributed import DistEnv

log = logging.getLogger(__name__)


def _to_device(batch: dict, device) -> dict:
    return {
        k: v.to(device, non_blocking=True)
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "labels")
    }


class MegatronEngine:
    name = "megatron"

    def __init__(self, cfg: TrainerConfig, env: DistEnv, device: torch.device, init_from=None):
        if device.type != "cuda":
            raise ValueError(
                "train.engine=megatron needs a CUDA device (megatron-core is GPU-only)"
            )
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.module import Float16Module

        from bionemo.models.esm2 import megatron as esm2_megatron

        self.cfg, self.device = cfg, device
        self.tp, self.pp = cfg.parallel.tensor, cfg.parallel.pipeline
        self.world_size = env.world_size
        self.dp_size = cfg.check_parallel(env.world_size)
        if not dist.is_initialized():  # a single process: megatron still wants a process group
            dist.init_process_group(
                "nccl",
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=0,
                world_size=1,
                device_id=device,
            )
        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp
        )
        self.dp_rank = ps.get_data_parallel_rank()
        self.first_stage, self.last_stage = (
            ps.is_pipeline_first_stage(),
            ps.is_pipeline_last_stage(),
        )
        torch.manual_seed(cfg.train.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)

        bf16 = cfg.train.precision == "bf16-mixed"
        self.tconfig = esm2_megatron.transformer_config(
            cfg.model, tp=self.tp, pp=self.pp, bf16=bf16, cpu_init=False
        )
        with torch.device(device):
            model = esm2_megatron.MegatronESM2(
                cfg.model, self.tconfig, pre_process=self.first_stage, post_process=self.last_stage
            )
        model.cuda(device)
        self.uses_te = esm2_megatron.has_transformer_engine()
        if init_from is not None:
            self._init_weights(model, Path(init_from))
        # Checkpoints hold the bare model's keys ("decoder.layers..."), whatever wraps it here, so
        # the conversion tool and other layouts read them.
        self.inner = model
        if bf16:
            model = Float16Module(self.tconfig, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        self.model = DistributedDataParallel(
            config=self.tconfig, ddp_config=ddp_config, module=model
        )
        self.tconfig.no_sync_func = self.model.no_sync
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.lr * o.min_lr_ratio,
                weight_decay=o.weight_decay,
                adam_beta1=o.betas[0],
                adam_beta2=o.betas[1],
                adam_eps=o.eps,
                bf16=bf16,
                params_dtype=self.tconfig.params_dtype,
                use_distributed_optimizer=cfg.parallel.distributed_optimizer,
                clip_grad=o.clip_grad or 0.0,
            ),
            [self.model],
        )
        self.forward_backward = get_forward_backward_func()
        log.info(
            "megatron engine: TP=%d PP=%d DP=%d, %s layers, distributed optimizer %s",
            self.tp,
            self.pp,
            self.dp_size,
            "Transformer Engine" if self.uses_te else "local",
            cfg.parallel.distributed_optimizer,
        )

    # ------------------------------------------------------------ steps
    @staticmethod
    def _forward_step(data_iterator, model):
        batch = next(data_iterator)
        loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"])

        def loss_func(output):
            return output, {"loss": output.detach().clone()}  # the schedule divides `output`

        return loss, loss_func

    def _run(self, micro_batches: list[dict], forward_only: bool) -> torch.Tensor:
        batches = [_to_device(b, self.device) for b in micro_batches]
        B, S = batches[0]["input_ids"].shape
        out = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(batches),
            model=[self.model],
            num_microbatches=len(batches),
            seq_length=S,
            micro_batch_size=B,
            forward_only=forward_only,
        )
        if not self.last_stage:  # the loss lives on the last stage; see train_step's contract
            return torch.zeros((), device=self.device)
        return torch.stack([d["loss"] for d in out]).mean() * self.pp

    def train_step(self, micro_batches: list[dict], lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run(micro_batches, forward_only=False)
        ok, _grad_norm, _ = self.optimizer.step()
        if not ok:
            log.warning("optimizer step skipped (non-finite gradients)")
        # The step's mean loss over its micro batches (x PP on the last stage, 0 elsewhere), so the
        # loop's sum over all ranks / world size is the mean over data-parallel replicas.
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        self.model.eval()
        try:
            return self._run([batch], forward_only=True)
        finally:
            self.model.train()

    # ------------------------------------------------------------ checkpoint I/O
    # 'fully_reshardable': the distributed optimizer's state is saved in the model's parameter
    # space (gathered per data-parallel group), so a checkpoint loads at another TP/PP/DP layout.
    CKPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

    def _sharded(self, loading: bool) -> dict:
        model_sd = self.inner.sharded_state_dict(metadata=self.CKPT_METADATA)
        return {
            "model": model_sd,
            "optimizer": self.optimizer.sharded_state_dict(
                model_sd, is_loading=loading, metadata=self.CKPT_METADATA
            ),
        }

    def save(self, path) -> None:
        from megatron.core import dist_checkpointing

        with _bucket_padding_kept(self.optimizer):
            sharded = self._sharded(False)
        dist_checkpointing.save(sharded, str(path))

    def _materialize_optimizer_state(self) -> None:
        """A fresh optimizer has no state tensors (and, with torch's Adam, no 'step'), which the
        distributed optimizer's loading path reads; one step with zero gradients and lr 0 creates
        them without changing any weight (the loaded state replaces them all)."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def load(self, path) -> None:
        from megatron.core import dist_checkpointing

        self._materialize_optimizer_state()
        state = dist_checkpointing.load(self._sharded(True), str(path))
        from bionemo.models.esm2.megatron import load_model_state

        load_model_state(self.inner, state["model"])
        with _torch_adam_step_kept(self.optimizer):
            self.optimizer.load_state_dict(state["optimizer"])

    def rng_state(self) -> dict:
        from megatron.core import tensor_parallel

        return {"model_parallel_rng": tensor_parallel.get_cuda_rng_tracker().get_states()}

    def set_rng_state(self, state: dict) -> None:
        from megatron.core import tensor_parallel

        if "model_parallel_rng" in state:
            tensor_parallel.get_cuda_rng_tracker().set_states(state["model_parallel_rng"])

    # ------------------------------------------------------------ weights-only start
    def _init_weights(self, model, path: Path) -> None:
        """checkpoint.init_from: a torch-engine checkpoint (converted, sliced for this rank) or a
        megatron one (any TP/PP; dist_checkpointing reshards)."""
        from bionemo import hf, rundir
        from bionemo.engines import checkpoint_engine
        from bionemo.models.esm2 import megatron as esm2_megatron

        if hf.is_hf_folder(path):  # a Hugging Face folder: our full state dict, then sliced
            esm2_megatron.load_full_state(
                model,
                esm2_megatron.torch_to_megatron(
                    hf.load_state(path, self.cfg.model),
                    self.cfg.model,
                    model.vocab_size,
                    te=self.uses_te,
                ),
            )
            return
        if not (path / rundir.COMPLETE).is_file():
            raise ValueError(
                f"checkpoint.init_from: {path} is not a complete checkpoint folder (no "
                f"{rundir.COMPLETE} marker); point it at a runs/.../checkpoints/step-N folder"
            )
        if checkpoint_engine(path) == "megatron":
            from megatron.core import dist_checkpointing

            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
            esm2_megatron.load_model_state(model, state["model"])
            return
        full = load_torch_weights(path, self.cfg.model)
        esm2_megatron.load_full_state(
            model,
            esm2_megatron.torch_to_megatron(
                full, self.cfg.model, model.vocab_size, te=self.uses_te
            ),
        )


@contextmanager
def _optimizer_method_replaced(optimizer, name: str, wrap):
    """For the block, each (chained) megatron optimizer that has method `name` calls
    `wrap(opt, original)` instead; yields those optimizers. The two workarounds below use it."""
    targets = [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if hasattr(o, name)]
    for opt in targets:
        setattr(opt, name, wrap(opt, getattr(opt, name)))
    try:
        yield targets
    finally:
        for opt in targets:
            delattr(opt, name)  # back to the class's method


@contextmanager
def _torch_adam_step_kept(optimizer):
    """Work around two faults of megatron-core (0.19) loading a 'fully_reshardable'
    distributed-optimizer state into torch's Adam (no Transformer Engine/Apex).
    1. It restores the common 'step' first, then copies every tensor of each parameter's state
       from the checkpoint, 'step' included, which the checkpoint does not hold per parameter
       (KeyError: 'step'). While loading, each parameter's source tensors get a non-tensor
       'step', which the copy skips; the step restored from the param groups stays.
    2. That restored step is ONE tensor object shared by all parameters; torch's Adam increments
       it in place once per parameter, so after a resume the step count ran ahead by the number
       of parameters each step and the bias corrections were wrong (losses diverged from the
       uninterrupted run from the second step on, benchmarks/results/megatron/). After loading,
       every parameter gets its own copy."""

    def wrap(opt, original):
        return lambda model_param, tensors: original(model_param, {"step": None, **tensors})

    with _optimizer_method_replaced(
        optimizer, "_set_main_param_and_optimizer_states", wrap
    ) as targets:
        yield
    for opt in targets:
        for state in getattr(getattr(opt, "optimizer", None), "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def repad_buckets(flat: torch.Tensor, buckets) -> torch.Tensor:
    """`flat`: the buckets' unpadded segments back to back; returns them at their buffer offsets
    (`bucket.offset`), zeros in the padding between buckets."""
    unpadded = sum(b.numel_unpadded for b in buckets)
    if unpadded != flat.numel():
        raise RuntimeError(
            f"optimizer state of {flat.numel()} elements does not match its "
            f"buckets ({unpadded} unpadded elements)"
        )
    out = flat.new_zeros(buckets[-1].offset + buckets[-1].numel_unpadded)
    cursor = 0
    for b in buckets:
        out[b.offset : b.offset + b.numel_unpadded] = flat[cursor : cursor + b.numel_unpadded]
        cursor += b.numel_unpadded
    return out


def _bucket_padding_kept(optimizer):
    """Work around a fault of megatron-core (0.16-0.19) saving a 'fully_reshardable'
    distributed-optimizer state: the gathered state (`get_parameter_state_dp_zero`) holds the
    buckets back to back WITHOUT the padding at each bucket's end, but is then sliced with each
    parameter's offsets in the PADDED buffer. With one bucket (our DDP runs without
    overlap_grad_reduce) nothing shifts; with pipeline parallelism the tied embedding/output
    weight gets a bucket of its own, and every parameter after the first bucket's padding was
    saved with another parameter's main weights and Adam moments (found by
    benchmarks/resume_probe.py: a PP=2 checkpoint resumed with the second stage's optimizer
    state shifted). While saving, the gathered state is put back at the padded offsets."""

    def wrap(opt, original):
        def gather(*args, **kwargs):
            state = original(*args, **kwargs)
            if state is None or kwargs.get("empty_data"):  # loading asks for shapes only
                return state
            for gbuf_idx, per_dtype in state.items():
                if isinstance(gbuf_idx, int):  # skips e.g. "buckets_coalesced": True
                    buckets = opt.buffers[gbuf_idx].buckets
                    for world in per_dtype.values():
                        world.update(
                            {
                                k: repad_buckets(t, buckets)
                                for k, t in world.items()
                                if torch.is_tensor(t) and t.dim() == 1
                            }
                        )
            return state

        return gather

    return _optimizer_method_replaced(optimizer, "get_parameter_state_dp_zero", wrap)


def load_torch_weights(path: Path, model_cfg) -> dict[str, torch.Tensor]:
    """A torch-engine checkpoint's model weights as a full state dict on the host, read by this
    process alone (no collective: every rank may call it)."""
    import torch.distributed.checkpoint as dcp

    from bionemo.models import build_model

    with torch.device("meta"):
        skeleton = build_model(model_cfg).state_dict()
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in skeleton.items()}
    dcp.load({"model": sd}, checkpoint_id=path, no_dist=True)
    return sd
