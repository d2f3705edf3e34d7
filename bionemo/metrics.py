"""Step metrics: JSONL in the run directory, a console line with steps/s and ETA, TensorBoard
event files in <run>/tensorboard/ (when the `tensorboard` package is installed), and W&B when a
project is named. All sinks hold one timeline: a run resumed from a checkpoint older than its last
record drops the later records (JSONL), purges them (TensorBoard's purge_step) and rewinds the
W&B run (resume_from); those steps are trained and logged again.

Throughput is counted on the host from batch shapes (no device sync); the only sync is the loss
read at log steps. FLOPs count what is multiplied (ModelConfig.training_flops): the blocks' and
the LM head's GEMM weights x 6 per token they run on, plus 12*L*h per attended pair at the padded
length actually trained. For ESM-2 this is the anchors' 6N + 12*L*h*s within 0.3% (0.08% at
650M; N's only non-matmul parts are biases and LayerNorms), so MFU stays comparable with BioNeMo's figures; for
Geneformer 6N would count the gene embedding and the position table as GEMMs.
"""

from __future__ import annotations

import datetime
import inspect
import json
import logging
import math
import resource
import time
import uuid
from pathlib import Path

import torch

from bionemo import rundir
from bionemo.config import LoggingConfig, ModelConfig
from bionemo.data.masking import IGNORE_INDEX

log = logging.getLogger("bionemo.metrics")

TENSORBOARD = rundir.TENSORBOARD  # <run>/tensorboard/: the event files (rank 0 writes them)

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

    def __init__(
        self, model: ModelConfig, world_size: int, device: torch.device, model_parallel: int = 1
    ):
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
    """Rank 0 writes; the other ranks' calls do nothing. The trainer calls rewind(step) once, at the
    step it starts from, before the first log(): the TensorBoard and W&B writers open there."""

    def __init__(
        self, run_dir: Path, cfg: LoggingConfig, is_main: bool, wandb_id: str | None, config: dict
    ):
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / rundir.METRICS
        self.cfg, self.config = cfg, config
        self.max_steps = (config.get("train") or {}).get("max_steps")
        self.wandb = self.tensorboard = None
        self.wandb_id = wandb_id
        self._opened = False
        self._mark: tuple[int, float] | None = None  # (step, time) of the last train record
        if is_main and cfg.wandb_project:
            try:
                import wandb  # noqa: F401 -- fail before training when it is missing
            except ImportError as e:
                raise RuntimeError(
                    "logging.wandb_project is set but wandb is not installed; "
                    "pip install wandb or unset logging.wandb_project"
                ) from e
            # The run id lives in the checkpoints' trainer state, so a resumed run continues the
            # same W&B run. The API key is read by wandb from WANDB_API_KEY, never from config.
            self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
        if is_main:
            from rich.console import Console

            self.console = Console(highlight=False, soft_wrap=True)  # one line per record in logs

    def rewind(self, step: int) -> None:
        """Drop records past `step`: after a resume from an older checkpoint those steps are
        trained again, and every sink should hold one timeline. Then open the writers at `step`."""
        if not self.is_main:
            return
        rewound = False
        if self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            if len(kept) != len(lines):
                self.path.write_text("".join(kept))
                rewound = True
        self._open(step, rewound)

    def _open(self, step: int, rewound: bool) -> None:
        self._opened = True
        self._mark = (step, time.perf_counter())
        self.tensorboard = _tensorboard_writer(self.run_dir / TENSORBOARD, step)
        if self.cfg.wandb_project:
            self.wandb = _wandb_run(
                self.cfg,
                self.wandb_id,
                self.run_dir,
                self.config,
                rewind_to=step if rewound else None,
            )

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.is_main:
            return
        if not self._opened:  # no rewind(): events of an earlier process from `step` on go
            self._open(step - 1, rewound=False)
            self._mark = None
        shown = {}
        if kind == "train":
            values = {**values, "steps_per_s": self._steps_per_s(step)}
            shown = {"eta": self._eta(step, values["steps_per_s"])}
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        line = " ".join(f"{k}={_fmt(v)}" for k, v in {**values, **shown}.items() if v is not None)
        self.console.print(f"[{kind}] step {step} {line}", markup=False)
        if self.tensorboard is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{k}", v, step)
            self.tensorboard.flush()  # what metrics.jsonl holds, TensorBoard holds too
        if self.wandb is not None:
            self.wandb.log(
                {f"{kind}/{k}": v for k, v in values.items() if v is not None}, step=step
            )

    def _steps_per_s(self, step: int) -> float | None:
        """Steps per second since the previous train record of this process (wall clock: saves
        and validations included, so that the ETA holds)."""
        now = time.perf_counter()
        last_step, last_t = self._mark or (step, now)
        self._mark = (step, now)
        if step <= last_step or now <= last_t:
            return None
        return (step - last_step) / (now - last_t)

    def _eta(self, step: int, rate: float | None) -> str | None:
        if not rate or not self.max_steps or step >= self.max_steps:
            return None
        return str(datetime.timedelta(seconds=round((self.max_steps - step) / rate)))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tensorboard_writer(folder: Path, step: int):
    """A SummaryWriter whose events from step+1 on, written by an earlier process of this run,
    are purged (TensorBoard drops them when it reads the files); None without `tensorboard`."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch.utils.tensorboard needs the `tensorboard` package
        log.warning(
            "no TensorBoard event files (%s); metrics.jsonl has every record; "
            "pip install tensorboard to write them",
            e,
        )
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=step + 1)


def _wandb_run(cfg: LoggingConfig, run_id: str, run_dir: Path, config: dict, rewind_to: int | None):
    """The W&B run, continued. W&B ignores steps lower than the run's last one, so a resume from
    an older checkpoint rewinds the run to that step (resume_from; offline, the rewind is in the
    run's file and applies when it is synced). A wandb or a server without rewind continues the
    run as before: W&B then drops the steps trained again, and the warning says so."""
    import wandb

    common = dict(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity,
        dir=str(run_dir),
        config=config,
        mode="offline" if cfg.wandb_offline else "online",
    )
    if rewind_to is not None:
        if "resume_from" in inspect.signature(wandb.init).parameters:
            try:
                return wandb.init(**common, resume_from=f"{run_id}?_step={rewind_to}")
            except Exception as e:  # noqa: BLE001 -- e.g. a server without rewind
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            why = f"wandb {wandb.__version__} has no resume_from (0.17.1 added it)"
        log.warning(
            "W&B run %s not rewound to step %d (%s): W&B drops steps %d.. as it already "
            "has them; metrics.jsonl and TensorBoard have the new ones",
            run_id,
            rewind_to,
            why,
            rewind_to + 1,
        )
    return wandb.init(**common, id=run_id, resume="allow")


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # exp(50) is already meaningless; avoid overflow
