"""What users of TensorBoard, W&B, `sacct`, run listings and loss plots expect (issue 14).

One tiny CPU run (tests/test_resume.py's model), killed while saving step 10 so that it resumes
from step 5 and trains 6..10 again, serves the TensorBoard, W&B, list and plot tests.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bionemo import rundir
from launchers import plot, record, runs
from tests.test_resume import data_dir, launch, make_run, train_losses, wait_all  # noqa: F401

MAX_STEPS = 12
KILLED_AT = 10  # SIGKILL while saving this step: the newest complete checkpoint is step 5
RESUMED_AT = 5


@pytest.fixture(scope="module")
def rewound_run(tmp_path_factory, data_dir) -> Path:  # noqa: F811
    """A run resumed from a checkpoint older than its last logged step (real processes)."""
    root = tmp_path_factory.mktemp("runs")
    run = make_run(root / "esm2" / "rewound", data_dir, max_steps=MAX_STEPS)
    cfg = yaml.safe_load((run / rundir.CONFIG).read_text())
    cfg["trainer"]["checkpoint"]["every_steps"] = 5
    cfg["trainer"]["logging"] = {"wandb_project": "bionemo-test"}  # offline unless configured
    cfg["job"] = {"backend": "local", "experiment": "esm2", "run": "rewound"}
    (run / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    env = {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
           "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_MACHINE_INFO": "true"}  # faster
    assert wait_all(launch(run, world=1, BIONEMO_KILL_DURING_SAVE=str(KILLED_AT), **env)) \
        == [-signal.SIGKILL]
    assert rundir.latest_complete_step(run) == RESUMED_AT
    assert max(train_losses(run)) == KILLED_AT
    first = train_losses(run)
    assert wait_all(launch(run, world=1, **env)) == [0]
    assert sorted(train_losses(run)) == list(range(1, MAX_STEPS + 1))  # one timeline
    assert [train_losses(run)[s] for s in range(1, RESUMED_AT + 1)] == \
        [first[s] for s in range(1, RESUMED_AT + 1)]
    return run


# ------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_holds_the_jsonl_timeline_after_a_rewind(rewound_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = rewound_run / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one file per process
    acc = EventAccumulator(str(folder))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    # the first process's steps 6..10 are purged: each step once, with the resumed run's value
    assert loss == pytest.approx(train_losses(rewound_run), rel=1e-6)
    assert sorted(e.step for e in acc.Scalars("train/steps_per_s")) == list(range(1, MAX_STEPS + 1))


def test_trainer_runs_without_tensorboard(tmp_path, caplog):
    """No `tensorboard` package: one warning, metrics.jsonl still written, training goes on."""
    code = ("import sys, logging; sys.modules['torch.utils.tensorboard'] = None\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "from bionemo.config import LoggingConfig\n"
            "from bionemo.metrics import MetricsLogger\n"
            f"m = MetricsLogger({str(tmp_path)!r}, LoggingConfig(), True, None, "
            "{'train': {'max_steps': 4}})\n"
            "m.rewind(0)\n"
            "for s in range(1, 4): m.log(s, {'loss': 1.0 / s})\n"
            "m.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("no TensorBoard event files") == 1, out.stderr
    records = [json.loads(line) for line in (tmp_path / rundir.METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "eta=" in out.stdout and "steps_per_s=" in out.stdout  # the console line's progress
    assert not (tmp_path / "tensorboard").exists()


# ------------------------------------------------------------------------------ W&B


def _wandb_records(path: Path):
    """The records of a W&B run file (.wandb): a 7-byte header, then LevelDB-log records
    (crc32c, length, type) in 32 KiB blocks, each payload a wandb_internal Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()[7:]
    block, pos, parts = 32768, 0, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            parts = b""
            yield rec
        elif kind == 0:
            break


def test_wandb_run_is_rewound_to_the_resumed_step(rewound_run):
    first, second = sorted((rewound_run / "wandb").glob("offline-run-*"))
    assert first.name.rsplit("-", 1)[1] == second.name.rsplit("-", 1)[1]  # one W&B run id

    def steps_and_branch(folder: Path):
        steps, branch = [], None
        for rec in _wandb_records(next(folder.glob("*.wandb"))):
            if rec.HasField("run") and rec.run.HasField("branch_point"):
                branch = rec.run.branch_point.value
            if rec.HasField("history"):
                items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
                if "train/loss" in items:
                    steps.append(int(items["_step"]))
        return steps, branch

    steps, branch = steps_and_branch(first)
    assert steps == list(range(1, KILLED_AT + 1)) and branch is None
    steps, branch = steps_and_branch(second)
    assert branch == RESUMED_AT  # W&B truncates the history after this step when it syncs
    assert steps == list(range(RESUMED_AT + 1, MAX_STEPS + 1))
