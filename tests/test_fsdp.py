"""FSDP2 in the torch engine on CPU (gloo): same losses as DDP, exact resume, checkpoints that move
between strategies and world sizes, HSDP, and the launcher's checks. Real processes, real files.

Tolerance for FSDP vs DDP (fp32): the two reduce the same gradients in another order (DDP divides
each gradient by the world size and all-reduces buckets; FSDP reduce-scatters per block and divides
after), so weights differ in the last bits after a step (measured: at most 2e-9 absolute on
weights of ~0.08 after 10 steps). Adam then moves each weight by about lr whatever the gradient's
size, so such differences stay at the rounding level; 1e-5 relative on the loss is 100x what was
measured and 1,000x below what one step changes the loss by (~1e-2), so a wrong gradient, a
missing reduction or an optimizer state that did not load fails it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bionemo import rundir
from bionemo.config import REQUEUE_EXIT_CODE, TrainerConfig
from launchers.config import ConfigError, resolve
from tests.test_resume import (
    assert_bitwise_equal,
    data_dir,
    free_port,
    make_run,  # noqa: F401
    train_losses,
    wait_all,
)
from tests.test_resume import launch as launch_ranks

STEPS = 20  # checkpoints at 10 and 20
# 2 ranks x micro batch 4 x 2 accumulation steps: the micro batch that does not reduce gradients
# (DDP's no_sync, FSDP's set_requires_gradient_sync) is exercised too.
GLOBAL_BATCH = 16
REL_TOL = 1e-5  # FSDP vs DDP, fp32: see the module docstring


def make(path: Path, data_dir: Path, strategy: str, **train) -> Path:
    run = make_run(
        path, data_dir, **{"max_steps": STEPS, "global_batch_size": GLOBAL_BATCH, **train}
    )
    cfg = yaml.safe_load((run / rundir.CONFIG).read_text())
    cfg["trainer"]["parallel"] = {"data_parallel": strategy}
    cfg["trainer"]["checkpoint"]["export_final"] = (
        False  # a CPU child process: seconds, not tested here
    )
    (run / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    return run


def launch(run: Path, world: int, local_world: int | None = None, **env) -> list[subprocess.Popen]:
    """Ranks on this machine; `local_world` ranks per emulated node (LOCAL_RANK = rank mod it)."""
    if local_world is None:
        return launch_ranks(run, world, **env)
    port, procs = free_port(), []
    for rank in range(world):
        e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        e.update(
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank % local_world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **env,
        )
        log = open(run / f"rank{rank}.log", "a")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bionemo.train", str(run)],
                env=e,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def state_at(run: Path, step: int, tmp: Path) -> dict:
    out = tmp / f"{run.name}-{step}.pt"
    dcp_to_torch_save(rundir.step_dir(run, step), out)
    return torch.load(out, weights_only=False)


def assert_close_losses(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    assert worst <= REL_TOL, f"losses differ by {worst:.2e} relative (tolerance {REL_TOL:.0e})"


def continue_from(source: Path, step: int, run: Path, world: int) -> Path:
    """`run` starts from a copy of `source`'s checkpoint at `step` (its own config)."""
    shutil.copytree(rundir.step_dir(source, step), rundir.step_dir(run, step))
    assert wait_all(launch(run, world)) == [0] * world
    assert "resumed from" in (run / "rank0.log").read_text()
    return run


@pytest.fixture(scope="module")
def refs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Uninterrupted 2-rank runs, one per strategy."""
    root = tmp_path_factory.mktemp("refs")
    runs = {s: make(root / s, data_dir, s) for s in ("ddp", "fsdp")}
    for run in runs.values():
        assert wait_all(launch(run, 2)) == [0, 0], (run / "rank0.log").read_text()[-2000:]
    return runs


def test_fsdp_gives_ddps_losses(refs, tmp_path):
    assert "FSDP2 over mesh" in (refs["fsdp"] / "rank0.log").read_text()
    assert_close_losses(train_losses(refs["fsdp"]), train_losses(refs["ddp"]))
    fsdp, ddp = (state_at(refs[s], STEPS, tmp_path)["model"] for s in ("fsdp", "ddp"))
    assert fsdp.keys() == ddp.keys()  # same names: checkpoints move between strategies
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=1e-6, msg=k)


def test_fsdp_signal_stop_and_restart_is_bitwise_exact(refs, data_dir, tmp_path):
    run = make(tmp_path / "stopped", data_dir, "fsdp")
    stop_at = random.Random(time.time_ns()).randint(3, STEPS - 6)
    print(f"stopping after step {stop_at}")
    procs = launch(run, 2, BIONEMO_STEP_SLEEP="0.2")
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / rundir.METRICS).exists() and max(train_losses(run), default=0) >= stop_at:
            break
        assert all(p.poll() is None for p in procs), "training ended before the signal"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR2)  # one rank: the stop protocol is the same under FSDP
    assert wait_all(procs) == [REQUEUE_EXIT_CODE] * 2
    assert stop_at <= rundir.latest_complete_step(run) < STEPS

    assert wait_all(launch(run, 2)) == [0, 0]
    assert train_losses(run) == train_losses(refs["fsdp"])
    # weights and Adam state (both moments and the step count), bit for bit
    assert_bitwise_equal(state_at(run, STEPS, tmp_path), state_at(refs["fsdp"], STEPS, tmp_path))


def test_ddp_checkpoint_resumes_under_fsdp(refs, data_dir, tmp_path):
    to_fsdp = continue_from(refs["ddp"], 10, make(tmp_path / "ddp-fsdp", data_dir, "fsdp"), 2)
    assert_close_losses(
        train_losses(to_fsdp), {s: v for s, v in train_losses(refs["ddp"]).items() if s > 10}
    )


def test_fsdp_checkpoint_resumes_on_3_ranks_under_fsdp_and_ddp(refs, data_dir, tmp_path):
    """2 -> 3 ranks: FSDP's shards are re-cut (64-wide tensors over 3 ranks: uneven); the same
    checkpoint continued under DDP on 3 ranks (whole tensors: FSDP -> DDP) is the reference.
    (3 x 4 does not divide 16: one micro batch per rank; the sample stream continues at the
    saved position.)"""
    sharded = continue_from(
        refs["fsdp"], 10, make(tmp_path / "fsdp3", data_dir, "fsdp", global_batch_size=None), 3
    )
    whole = continue_from(
        refs["fsdp"], 10, make(tmp_path / "ddp3", data_dir, "ddp", global_batch_size=None), 3
    )
    assert_close_losses(train_losses(sharded), train_losses(whole))
    assert sorted(train_losses(sharded)) == list(range(11, STEPS + 1))


def test_init_from_loads_before_sharding(refs, data_dir, tmp_path):
    """Weights only, from DDP's step 10, into an FSDP run: its first loss is the trained model's
    (the reference's losses near step 10, ~0.2 below an untrained model's first loss)."""
    run = make(tmp_path / "init", data_dir, "fsdp", max_steps=1)
    cfg = yaml.safe_load((run / rundir.CONFIG).read_text())
    cfg["trainer"]["checkpoint"]["init_from"] = str(rundir.step_dir(refs["ddp"], 10))
    (run / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    assert wait_all(launch(run, 2)) == [0, 0]
    assert "initialised weights from" in (run / "rank0.log").read_text()
    first, ref = train_losses(run)[1], train_losses(refs["ddp"])
    assert abs(first - ref[10]) < abs(first - ref[1]), (first, ref[1], ref[10])


def test_hsdp_on_two_emulated_nodes(refs, data_dir, tmp_path):
    """4 ranks as 2 nodes x 2: shards inside a node, replicas across. 4 ranks x micro batch 4
    read the same micro batches as the 2-rank reference's 2 x 2 accumulation steps (samples
    k*8 + rank*4 + [0, 4)), so the DDP reference's losses are this run's too."""
    hsdp = make(tmp_path / "hsdp", data_dir, "hsdp")
    assert wait_all(launch(hsdp, 4, local_world=2)) == [0] * 4, (hsdp / "rank0.log").read_text()[
        -2000:
    ]
    assert "FSDP2 over mesh (2, 2) ('replicate', 'shard')" in (hsdp / "rank0.log").read_text()
    assert_close_losses(train_losses(hsdp), train_losses(refs["ddp"]))


# ------------------------------------------------------------------ validation before submitting

TINY = dict(
    model=dict(name="t", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128),
    train=dict(micro_batch_size=2),
)


@pytest.mark.parametrize(
    "trainer,message",
    [
        (
            dict(
                parallel=dict(data_parallel="fsdp"),
                train=dict(micro_batch_size=2, engine="megatron"),
            ),
            "parallel.data_parallel=fsdp is the torch engine's",
        ),
        (dict(parallel=dict(fsdp_cpu_offload=True)), "set parallel.data_parallel=fsdp"),
        (
            dict(
                parallel=dict(data_parallel="fsdp", fsdp_cpu_offload=True),
                train=dict(micro_batch_size=2, device="cpu"),
            ),
            "on train.device=cpu it is already there",
        ),
        (dict(train=dict(micro_batch_size=2, device="cpu", fp8="rowwise")), "set train.fp8=none"),
        (
            dict(
                parallel=dict(fp8_all_gather=True), train=dict(micro_batch_size=2, fp8="tensorwise")
            ),
            "set parallel.data_parallel=fsdp \\(or hsdp\\), or parallel.fp8_all_gather=false",
        ),
        (
            dict(
                parallel=dict(data_parallel="fsdp", fp8_all_gather=True),
                train=dict(micro_batch_size=2, fp8="rowwise"),
            ),
            "needs train.fp8=tensorwise .*here train.fp8=rowwise",
        ),
        (
            dict(
                parallel=dict(data_parallel="fsdp", fp8_all_gather=True, fsdp_cpu_offload=True),
                train=dict(micro_batch_size=2, fp8="tensorwise"),
            ),
            "with parallel.fsdp_cpu_offload is not supported",
        ),
    ],
)
def test_trainer_config_refuses_what_cannot_run(trainer, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig.model_validate({**TINY, **trainer})


@pytest.mark.parametrize(
    "cluster,nodes,overrides,message",
    [
        (
            "a100",
            2,
            ["trainer.train.fp8=rowwise"],
            "trainer.train.fp8: rowwise needs FP8 tensor cores, which gpu_type a100_80gb lacks",
        ),
        (
            "local",
            2,
            [
                "trainer.parallel.data_parallel=fsdp",
                "trainer.parallel.fsdp_cpu_offload=true",
                "trainer.train.device=auto",
            ],
            "trainer.parallel.fsdp_cpu_offload: offloads GPU",
        ),
        (
            "h100_example",
            1,
            ["trainer.parallel.data_parallel=hsdp"],
            "trainer.parallel.data_parallel: hsdp replicates across nodes and this job has one node",
        ),
        (
            "h100_example",
            2,
            ["trainer.parallel.data_parallel=fsdp", "trainer.train.engine=megatron"],
            "is the torch engine's",
        ),
        (
            "h100_example",
            2,
            ["trainer.parallel.fp8_all_gather=true", "trainer.train.fp8=tensorwise"],
            "trainer.parallel.fp8_all_gather: parallel.fp8_all_gather gathers FSDP's weight shards",
        ),
    ],
)
def test_launcher_refuses_before_submitting(tmp_path, cluster, nodes, overrides, message):
    if cluster == "a100":
        cluster = str(tmp_path / "a100.yaml")
        Path(cluster).write_text(
            yaml.safe_dump({"cluster": {"gpu_type": "a100_80gb", "gpus_per_node": 8}})
        )
    with pytest.raises(ConfigError, match=message):
        resolve(model="esm2_650m", cluster=cluster, nodes=nodes, overrides=overrides)


def test_launcher_accepts_fsdp_fp8_on_h100_and_hsdp_on_two_nodes():
    cfg = resolve(
        model="esm2_3b",
        cluster="h100_example",
        nodes=2,
        overrides=[
            "trainer.parallel.data_parallel=hsdp",
            "trainer.train.fp8=tensorwise",
            "trainer.parallel.fsdp_cpu_offload=true",
        ],
    ).config
    assert (cfg.trainer.parallel.data_parallel, cfg.trainer.train.fp8) == ("hsdp", "tensorwise")
    gathered = resolve(
        model="esm2_3b",
        cluster="h100_example",
        nodes=2,
        overrides=[
            "trainer.parallel.data_parallel=fsdp",
            "trainer.train.fp8=tensorwise",
            "trainer.parallel.fp8_all_gather=true",
        ],
    ).config
    assert gathered.trainer.parallel.fp8_all_gather is True


def test_a_sweep_judges_fp8_all_gather_with_the_strategy_and_recipe_it_searches():
    """`sweep --strategy fsdp --fp8 tensorwise trainer.parallel.fp8_all_gather=true`: the trials
    run FSDP with FP8, so the config they start from holds the searched values (the 3B's table
    row says DDP) and the all-gather is accepted; a searched pair it cannot run with is refused,
    naming the pair, before anything runs."""

    def sweep(strategies: str, recipes: str):
        return resolve(
            model="esm2_3b",
            cluster="h100_example",
            nodes=1,
            kind="sweep",
            options=[
                ("--strategy", "sweep.strategies", strategies),
                ("--fp8", "sweep.fp8", recipes),
            ],
            overrides=["trainer.parallel.fp8_all_gather=true"],
        ).config

    cfg = sweep("fsdp", "tensorwise")
    assert (cfg.trainer.parallel.data_parallel, cfg.trainer.train.fp8) == ("fsdp", "tensorwise")
    assert cfg.trainer.parallel.fp8_all_gather is True
    with pytest.raises(
        ConfigError, match="sweep.strategies: ddp with fp8 tensorwise: parallel.fp8"
    ):
        sweep("fsdp,ddp", "tensorwise")
    # without the all-gather, the table row's values stay where the sweep does not search
    plain = resolve(model="esm2_3b", cluster="h100_example", nodes=1, kind="sweep").config
    row = resolve(model="esm2_3b", cluster="h100_example", nodes=1).config
    assert plain.trainer.parallel.data_parallel == row.trainer.parallel.data_parallel
    assert plain.trainer.train.fp8 == row.trainer.train.fp8
