"""Step metrics: JSONL in the run directory, a console line, and W&B when a project is named.

Throughput is counted on the host from batch shapes (no device sync); the only sync is the loss
read at log steps. FLOPs count what is multiplied (ModelConfig.training_flops): the blocks' and
the LM head's GEMM weights x 6 per token they run on, plus 12*L*h per attended pair at the padded
length actually trained. For ESM-2 this is the anchors' 6N + 12*L*h*s within 0.3% (0.08% at
650M; N's only non-matmul parts are biases and LayerNorms), so MFU stays comparable with BioNeMo's figures; for
Geneformer 6N would count the gene embedding and the position table as GEMMs.
"""

from __future__ import annotations

import json
import math
import resource
import time
import uuid
from pathlib import Path

import torch

from bionemo import rundir
from bionemo.config import LoggingConfig, ModelConfig
from bionemo.data.masking import IGNORE_INDEX

# Dense bf16 peak, TFLOP/s, by substring of the device name.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class Throughput:
    """Tokens and FLOPs since the last report, per GPU. A batch seen by this rank is shared by
    the `model_parallel` (TP x PP) GPUs of its model replica."""

    def __init__(self, model: ModelConfig, world_size: int, device: torch.device,
                 model_parallel: int = 1):
        self.model, self.world, self.device = model, world_size, device
        self.mp = model_parallel
        self.peak = peak_tflops(device)
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.padded = self.useful = 0
        self.flops = 0.0

    def add(self, batch: dict) -> None:
        mask = batch["attention_mask"]
        b, s = mask.shape
        self.padded += b * s
        self.useful += int(mask.sum())
        if "cu_seqlens" in batch:  # packed: a token attends over its own sequence only
            pairs = float((batch["cu_seqlens"].diff().double() ** 2).sum())
        else:
            pairs = float(b * s * s)
        scored = int((batch["labels"] != IGNORE_INDEX).sum()) if "labels" in batch else b * s
        self.flops += self.model.training_flops(b * s, scored, pairs)

    def report(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9) * self.mp
        tflops = self.flops / dt / 1e12
        out = {
            "tokens_per_s_per_gpu": self.padded / dt,
            "useful_tokens_per_s_per_gpu": self.useful / dt,
            "tokens_per_s": self.padded / dt * self.world,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        self.reset()
        return out


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, is_main: bool, wandb_id: str | None,
                 config: dict):
        self.is_main = is_main
        self.path = Path(run_dir) / rundir.METRICS
        self.wandb = None
        self.wandb_id = wandb_id
        if is_main and cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(
                    "logging.wandb_project is set but wandb is not installed; "
                    "pip install wandb or unset logging.wandb_project"
                ) from e
            # The run id lives in the checkpoints' trainer state, so a resumed run continues the
            # same W&B run. The API key is read by wandb from WANDB_API_KEY, never from config.
            self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
            self.wandb = wandb.init(
                project=cfg.wandb_project, entity=cfg.wandb_entity, id=self.wandb_id,
                resume="allow", dir=str(run_dir), config=config,
                mode="offline" if cfg.wandb_offline else "online",
            )
        if is_main:
            from rich.console import Console

            self.console = Console(highlight=False, soft_wrap=True)  # one line per record in logs

    def rewind(self, step: int) -> None:
        """Drop records past `step`: after a resume from an older checkpoint those steps are
        trained again, and the file should hold one timeline."""
        if not self.is_main or not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            self.path.write_text("".join(kept))

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.is_main:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items() if v is not None)
        self.console.print(f"[{kind}] step {step} {shown}", markup=False)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # exp(50) is already meaningless; avoid overflow
