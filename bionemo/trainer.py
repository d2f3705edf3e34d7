"""The training loop: one path for CPU (gloo) and GPU (NCCL, bf16 autocast).

Exactness on resume rests on three facts: every sample is a pure function of (seed, global sample
index), so the data position is one integer; the learning rate is a pure function of the step;
and model, optimizer and RNG states are restored bit for bit from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bionemo import rundir
from bionemo.checkpoint import Checkpointer, TrainerState
from bionemo.config import OOM_EXIT_CODE, REQUEUE_EXIT_CODE, TrainerConfig, load_trainer_config
from bionemo.distributed import DistEnv
from bionemo.distributed.env import rendezvous_store
from bionemo.engines import build_engine
from bionemo.lr import lr_multiplier
from bionemo.metrics import MetricsLogger, Throughput, perplexity
from bionemo.savefail import SaveFailed
from bionemo.stop import StopFlag
from bionemo.watchdog import Watchdog

log = logging.getLogger("bionemo.trainer")


def dataloader_builder(family: str):
    """The data pipeline of a model family ("labelled": fine-tuning's table, which also takes
    task=); every builder takes the same arguments."""
    if family == "labelled":
        from bionemo.data.labelled import build_dataloader
    elif family == "geneformer":
        from bionemo.data.cells import build_dataloader
    else:
        from bionemo.data.dataset import build_dataloader
    return build_dataloader


# What a real "80 GB" card reports (an H100 80GB: nvidia-smi 81,559 MiB, not 80 GiB = 81,920).
REAL_80GB_MIB = 81_559


def memory_cap_fraction(cap_gib: float, device: torch.device) -> float:
    """The allocator's share of this GPU that leaves it what a real card of `cap_gib` nominal GB
    would (80: an H100 80GB; other sizes scaled alike): the card's reported memory less what is
    already held outside the allocator now, after the process group's set-up (this process's
    CUDA context and NCCL buffers, which the real card holds too). docs/sweep.md."""
    free, total = torch.cuda.mem_get_info(device)
    card = cap_gib / 80 * REAL_80GB_MIB * 2**20
    fraction = max(0.0, min(1.0, (card - (total - free)) / total))
    log.info(
        "memory cap %g GB: allocator limit %.0f MiB of %.0f (%.0f MiB held outside it)",
        cap_gib,
        fraction * total / 2**20,
        total / 2**20,
        (total - free) / 2**20,
    )
    return fraction


def pick_device(cfg: TrainerConfig, env: DistEnv) -> torch.device:
    want_cuda = cfg.train.device == "cuda" or (
        cfg.train.device == "auto" and torch.cuda.is_available()
    )
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use auto/cpu")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train(run_dir: Path, stop: StopFlag | None = None) -> int:
    """Train the run in `run_dir`; returns 0 when finished, REQUEUE_EXIT_CODE when stopped."""
    run_dir = Path(run_dir)
    cfg = load_trainer_config(run_dir / rundir.CONFIG)
    stop = stop or StopFlag(cfg.train.stop_signal)
    env = DistEnv.from_environ(cfg.train.stop_signal)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(message)s"
    )
    if rundir.is_finished(run_dir):
        log.info("%s is finished; nothing to do", run_dir)
        return 0
    (cfg.task if cfg.task.fine_tuning else cfg.data).check_files()
    device = pick_device(cfg, env)
    if env.world_size > 1:
        store = rendezvous_store(env, cfg.train.dist_timeout_s)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=store,
            timeout=store.timeout,
            rank=env.rank,
            world_size=env.world_size,
            device_id=device if device.type == "cuda" else None,
        )
    if cfg.train.memory_cap_gib and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(
            memory_cap_fraction(cfg.train.memory_cap_gib, device), device
        )
    try:
        stop.join_process_group()
        with Watchdog(
            run_dir,
            env.rank,
            env.world_size,
            cfg.train.watchdog_s,
            attempt=f"{env.job_id}/{env.restart_count}",
        ) as watchdog:
            return _loop(cfg, env, device, run_dir, stop, watchdog)
    except (torch.OutOfMemoryError, MemoryError) as e:
        return _out_of_memory(run_dir, env, str(e).splitlines()[0] if str(e) else type(e).__name__)
    except RuntimeError as e:  # CPU allocator failures under a memory limit surface as this
        if "can't allocate memory" not in str(e) and "not enough memory" not in str(e):
            raise
        return _out_of_memory(run_dir, env, str(e).splitlines()[0])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _out_of_memory(run_dir: Path, env: DistEnv, what: str) -> int:
    """Exit OOM_EXIT_CODE with an `oom` event: when srun's --kill-on-bad-exit then kills the
    other ranks, the step's exit code is theirs (143), and the event keeps the verdict OOM."""
    log.error("out of memory: %s", what)
    rundir.append_event(run_dir, "oom", rank=env.rank, detail=what[:300])
    return OOM_EXIT_CODE


def _loop(
    cfg: TrainerConfig,
    env: DistEnv,
    device: torch.device,
    run_dir: Path,
    stop: StopFlag,
    watchdog: Watchdog,
) -> int:
    ckpt = Checkpointer(run_dir, cfg.checkpoint.keep_last, env.rank)
    latest = ckpt.latest()
    if latest is not None:  # its checksums are computed while the engine is built
        ckpt.prefetch(latest)
    init_from = cfg.checkpoint.init_from if latest is None else None
    engine = build_engine(cfg, env, device, init_from)
    dp = engine.dp_size
    accum = cfg.train.grad_accumulation(dp)
    samples_per_step = cfg.train.micro_batch_size * dp * accum
    state = TrainerState(
        world_size=env.world_size,
        engine=engine.name,
        tensor_parallel=engine.tp,
        pipeline_parallel=engine.pp,
    )
    if latest is not None:  # the newest intact one (damaged ones are rejected)
        latest, state = ckpt.resume(engine)
        state.world_size, state.tensor_parallel, state.pipeline_parallel = (
            env.world_size,
            engine.tp,
            engine.pp,
        )
        log.info(
            "resumed from %s (step %d, %d samples)", latest, state.step, state.consumed_samples
        )
    elif init_from is not None:
        log.info("initialised weights from %s", init_from)

    build_dataloader = dataloader_builder("labelled" if cfg.task.fine_tuning else cfg.model.family)
    loader_args = dict(
        data_cfg=cfg.data,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=engine.dp_rank,
        dp_size=dp,
        pad_to=cfg.data.pad_to,
    )
    if cfg.model.family == "geneformer":  # the gene vocabulary file must match the embedding
        loader_args["vocab_size"] = cfg.model.vocab_size
    if cfg.task.fine_tuning:  # the labelled table and its split
        loader_args["task"] = cfg.task
    batches = iter(
        build_dataloader(
            **loader_args,
            grad_accumulation=accum,
            start_sample=state.consumed_samples,
            split="train",
        )
    )
    metrics = MetricsLogger(
        run_dir, cfg.logging, env.is_main, state.wandb_id, cfg.model_dump(mode="json")
    )
    state.wandb_id = metrics.wandb_id
    metrics.rewind(state.step)
    meter = Throughput(cfg.model, env.world_size, device, engine.tp * engine.pp)
    decay_until = cfg.optim.decay_steps or cfg.train.max_steps
    step_sleep = float(os.environ.get("BIONEMO_STEP_SLEEP", "0"))  # test hook: a slow run
    loss_sum = torch.zeros((), device=device)
    steps_in_window = 0
    start_step = state.step

    while state.step < cfg.train.max_steps:
        lr = cfg.optim.lr * lr_multiplier(
            state.step,
            cfg.optim.schedule,
            warmup=cfg.optim.warmup_steps,
            last=decay_until,
            min_ratio=cfg.optim.min_lr_ratio,
            hold=cfg.optim.hold_steps,
        )
        micro_batches = [next(batches) for _ in range(accum)]
        for batch in micro_batches:
            meter.add(batch)
        loss_sum += engine.train_step(micro_batches, lr)
        if cfg.train.compile and state.step == start_step:
            log_compile_cache()  # the first step compiled (or loaded) forward and backward
        state.step += 1
        state.consumed_samples += samples_per_step
        steps_in_window += 1
        if step_sleep:
            time.sleep(step_sleep)
        watchdog.beat(state.step)  # a save or a validation below runs under watchdog.slow()

        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            if dist.is_initialized():
                dist.all_reduce(loss_sum)
                loss_sum /= env.world_size
            mean_loss = loss_sum.item() / steps_in_window
            metrics.log(
                state.step,
                {
                    "loss": mean_loss,
                    **_perplexity(cfg, mean_loss),
                    "lr": lr,
                    "consumed_samples": state.consumed_samples,
                    **meter.report(),
                },
            )
            loss_sum.zero_()
            steps_in_window = 0
        valid_set = (cfg.task if cfg.task.fine_tuning else cfg.data).validation_set
        if valid_set and cfg.train.limit_val_batches and state.step % cfg.train.val_every == 0:
            with watchdog.slow("validate"):
                val = validate(
                    engine,
                    cfg,
                    build_dataloader(
                        **loader_args, grad_accumulation=1, start_sample=0, split="valid"
                    ),
                    device,
                )
            metrics.log(state.step, val, kind="valid")

        stopping = stop.agreed()
        last = state.step >= cfg.train.max_steps
        due = cfg.checkpoint.enabled and (
            stopping or last or state.step % cfg.checkpoint.every_steps == 0
        )
        try:
            if due:
                # The stop protocol's save and the last one stay synchronous: the process exits
                # right after them. Periodic ones may be written in the background.
                background = cfg.checkpoint.async_save and not (stopping or last)
                with watchdog.slow("save"):
                    t0 = time.perf_counter()
                    path = ckpt.save(engine, state, asynchronous=background)
                    blocked = time.perf_counter() - t0
                log.info(
                    "%s step %d: training blocked %.2f s",
                    "writing in the background:" if path is None else f"saved {path}:",
                    state.step,
                    blocked,
                )
                metrics.log(
                    state.step,
                    {"save_blocking_s": blocked, "async": path is None},
                    kind="checkpoint",
                )
            elif ckpt.pending:
                with watchdog.slow("save"):
                    path = ckpt.poll()
                if path is not None:
                    log.info("saved %s (written in the background)", path)
        except SaveFailed as e:  # raised on every rank alike, so all exit the same way
            code = _save_failed(e, run_dir, env)
            metrics.close()
            return code
        if last:
            if env.is_main:
                (run_dir / rundir.FINISHED).write_text(f"{state.step}\n")
                if cfg.checkpoint.enabled and cfg.checkpoint.export_final:
                    with watchdog.slow("export"):
                        export_final_model(run_dir, engine, cfg)
            metrics.close()
            return 0
        if stopping:
            log.info(
                "stop requested (%s): saved at step %d, exiting %d for requeue",
                stop.requested or "by another rank",
                state.step,
                REQUEUE_EXIT_CODE,
            )
            if env.is_main:  # srun --kill-on-bad-exit may report the first rank's 75 as a kill
                rundir.append_event(
                    run_dir, "stopped", step=state.step, signal=stop.requested or "another rank's"
                )
            metrics.close()
            return REQUEUE_EXIT_CODE
    return 0


def _save_failed(e: SaveFailed, run_dir: Path, env: DistEnv) -> int:
    """A full disk stops the run with its own exit code and a record in events.jsonl (the requeue
    policy stops: a requeue would fail the same way); any other failed write is a crash."""
    if not e.disk_full:
        raise e
    kept = rundir.latest_complete_step(run_dir)
    partial = {True: "removed", False: "could not be removed", None: "removed by rank 0"}[e.removed]
    log.error(
        "saving step %d failed: no space left on device in %s (filesystem %s, %s bytes "
        "free; failed on rank(s) %s: %s); the partial folder %s; newest complete "
        "checkpoint: %s; exiting %d",
        e.step,
        e.path,
        e.filesystem,
        e.free_bytes,
        ", ".join(map(str, e.ranks)),
        e.detail,
        partial,
        "none" if kept is None else f"step {kept}",
        rundir.DISK_FULL_EXIT_CODE,
    )
    if env.is_main:
        rundir.append_event(
            run_dir,
            "disk_full",
            step=e.step,
            path=str(e.path),
            filesystem=e.filesystem,
            free_bytes=e.free_bytes,
            ranks=e.ranks,
            detail=e.detail,
            kept_step=kept,
        )
    return rundir.DISK_FULL_EXIT_CODE


def export_final_model(run_dir: Path, engine, cfg: TrainerConfig) -> None:
    """<run>/final_model/: the final weights as a Hugging Face folder (bionemo/hf.py). The torch
    engine's rank 0 holds them whole under DDP and writes them here; FSDP's and the megatron
    engine's are sharded, so a CPU child process reassembles them from the checkpoint just saved. The run is finished either
    way: a failure is logged with the command that redoes it."""
    from bionemo.export import FINAL_MODEL

    out = run_dir / FINAL_MODEL
    redo = shlex.join(["python", "-m", "bionemo.export", str(run_dir), str(out)])
    try:
        if engine.name == "torch" and not engine.sharded:  # FSDP shards: export from the file
            from bionemo.export import export_module

            export_module(engine.model, cfg, out)  # a fine-tuned head beside it, a plugin its own
        else:
            import subprocess
            import sys

            done = subprocess.run(
                [sys.executable, "-m", "bionemo.export", str(run_dir), str(out)],
                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1:])
    except Exception as e:  # noqa: BLE001 -- the training result stands; say how to redo it
        log.warning("export to %s failed (%s); the run is finished; redo with: %s", out, e, redo)
        return
    log.info("exported the final weights as a Hugging Face model: %s", out)


def log_compile_cache() -> None:
    """How many compiled graphs this process loaded from the compile cache (hits) and compiled
    (misses): inductor's FX graph cache and the AOTAutograd cache (bionemo/train.py's folder)."""
    from torch._dynamo.utils import counters

    fx, aot = counters["inductor"], counters["aot_autograd"]
    log.info(
        "compile cache %s: fx graph hits %d misses %d, aot autograd hits %d misses %d",
        os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(inductor's default)"),
        fx["fxgraph_cache_hit"],
        fx["fxgraph_cache_miss"],
        aot["autograd_cache_hit"],
        aot["autograd_cache_miss"],
    )


def _perplexity(cfg: TrainerConfig, loss: float) -> dict:
    return {} if cfg.task.fine_tuning else {"perplexity": perplexity(loss)}


def validate(engine, cfg: TrainerConfig, loader, device) -> dict:
    """The "valid" metrics record: loss and perplexity (mlm), or the task's (bionemo.finetune)."""
    if cfg.task.fine_tuning:
        from bionemo.finetune import evaluate

        return evaluate(engine, cfg, loader, device)
    total = torch.zeros((), device=device)
    n = 0
    for batch, _ in zip(loader, range(cfg.train.limit_val_batches)):
        total += engine.eval_loss(batch)
        n += 1
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    loss = total.item() / max(n, 1)
    return {"loss": loss, "perplexity": perplexity(loss)}
