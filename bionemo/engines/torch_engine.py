"""The PyTorch engine: our ESM-2/Geneformer modules, regional torch.compile, DDP, AdamW and
torch.distributed.checkpoint. Runs on CPU (gloo) and GPU (NCCL) with the same code; data
parallel only."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from bionemo import hf
from bionemo.checkpoint import load_weights
from bionemo.config import TrainerConfig
from bionemo.distributed import DistEnv
from bionemo.distributed.parallel import wrap_for_training
from bionemo.models import build_model


class MaskedLMLoss(nn.Module):
    """Puts the loss inside forward() so DDP (and torch.compile) see the whole computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, cu_seqlens=None, max_seqlen=None):
        return self.model.loss(input_ids, attention_mask, labels, cu_seqlens, max_seqlen)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device; host values (a packed batch's max_seqlen) stay where they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def build_optimizer(model: nn.Module, cfg: TrainerConfig, device: torch.device):
    # Megatron's convention: no weight decay on biases and LayerNorm parameters (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    o = cfg.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=o.betas, eps=o.eps, fused=o.fused and device.type == "cuda",
    )


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
                    f"checkpoint.init_from at OUT, or use train.engine=megatron")
            load_weights(init_from, self.model)
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.step_fn = wrap_for_training(MaskedLMLoss(self.model), self.model,
                                         compile=cfg.train.compile, dp=self.dp_size, device=device)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda" and cfg.train.precision == "bf16-mixed" else nullcontext()
        )

    def train_step(self, micro_batches: list[dict], lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            sync = i == accum - 1 or self.dp_size == 1
            with (nullcontext() if sync else self.step_fn.no_sync()), self.autocast:
                loss = self.step_fn(**to_device(batch, self.device)) / accum
            loss.backward()
            total += loss.detach()
        if self.cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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
    def save(self, path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    def load(self, path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

    def rng_state(self) -> dict:
        return {}

    def set_rng_state(self, state: dict) -> None:
        pass
