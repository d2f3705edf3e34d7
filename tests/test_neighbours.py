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
    env = {
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_X_DISABLE_MACHINE_INFO": "true",
    }  # faster
    assert wait_all(launch(run, world=1, BIONEMO_KILL_DURING_SAVE=str(KILLED_AT), **env)) == [
        -signal.SIGKILL
    ]
    assert rundir.latest_complete_step(run) == RESUMED_AT
    assert max(train_losses(run)) == KILLED_AT
    first = train_losses(run)
    assert wait_all(launch(run, world=1, **env)) == [0]
    assert sorted(train_losses(run)) == list(range(1, MAX_STEPS + 1))  # one timeline
    assert [train_losses(run)[s] for s in range(1, RESUMED_AT + 1)] == [
        first[s] for s in range(1, RESUMED_AT + 1)
    ]
    return run


# ------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_holds_the_jsonl_timeline_after_a_rewind(rewound_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = rewound_run / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one file per process
    acc = EventAccumulator(str(folder))
    acc.Reload()
    events = acc.Scalars("train/loss")
    # the first process's steps 6..10 are purged: each step once, with the resumed run's value
    assert [e.step for e in events] == list(range(1, MAX_STEPS + 1))
    assert {e.step: e.value for e in events} == pytest.approx(train_losses(rewound_run), rel=1e-6)
    assert sorted(e.step for e in acc.Scalars("train/steps_per_s")) == list(range(1, MAX_STEPS + 1))


def test_trainer_runs_without_tensorboard(tmp_path, caplog):
    """No `tensorboard` package: one warning, metrics.jsonl still written, training goes on."""
    code = (
        "import sys, logging; sys.modules['torch.utils.tensorboard'] = None\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from bionemo.config import LoggingConfig\n"
        "from bionemo.metrics import MetricsLogger\n"
        f"m = MetricsLogger({str(tmp_path)!r}, LoggingConfig(), True, None, "
        "{'train': {'max_steps': 4}})\n"
        "m.rewind(0)\n"
        "for s in range(1, 4): m.log(s, {'loss': 1.0 / s})\n"
        "m.close()\n"
    )
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
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
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

    # (the first process's file may hold nothing: SIGKILL left wandb no time to write it)
    assert steps_and_branch(first)[1] is None
    steps, branch = steps_and_branch(second)
    assert branch == RESUMED_AT  # W&B truncates the history after this step when it syncs
    assert steps == list(range(RESUMED_AT + 1, MAX_STEPS + 1))


# ------------------------------------------------------------------------------ status: speed


def test_speed_and_eta_from_the_last_train_record(tmp_path):
    now = __import__("time").time()
    lines = [
        {"kind": "train", "step": 10, "time": now - 60, "loss": 2.0, "steps_per_s": 0.5},
        {"kind": "valid", "step": 10, "time": now - 59, "loss": 2.1},
        {"kind": "train", "step": 20, "time": now - 30, "loss": 1.9, "steps_per_s": 0.25},
    ]
    (tmp_path / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = runs.speed(tmp_path, max_steps=920)
    assert text.startswith("0.25 steps/s at step 20 (logged 0:00:3")
    assert text.endswith("; ETA 1:00:00 to step 920")  # 900 steps at 0.25 steps/s
    # records written before steps_per_s existed: the rate between the last two train records
    for r in lines:
        r.pop("steps_per_s", None)
    (tmp_path / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert runs.speed(tmp_path, max_steps=920).startswith("0.333 steps/s at step 20")


def test_status_shows_speed(rewound_run):
    out = subprocess.run(
        [sys.executable, "-m", "launchers", "status", str(rewound_run)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    speed = next(line for line in out.stdout.splitlines() if line.startswith("speed"))
    assert f"steps/s at step {MAX_STEPS}" in speed and "ETA" not in speed  # finished


# ------------------------------------------------------------------------------ list


def _fake_run(root: Path, name: str, backend: str, created: str, **attempt) -> Path:
    """A run directory as the launcher leaves it (config.yaml, submission.json), no trainer."""
    run = root / name
    (run / rundir.LOGS).mkdir(parents=True)
    (run / rundir.CONFIG).write_text(
        yaml.safe_dump({"job": {"backend": backend}, "cluster": {"name": "local"}})
    )
    record.create(run, backend=backend, cluster="local", policy={})
    record.update(run, lambda d: d.update(created=created))
    record.add_job(run, "4242" if backend != "local" else None, "submit")
    if attempt:
        record.add_attempt(run, {"job_id": "4242" if backend != "local" else None, **attempt})
    return run


def test_list_shows_every_run_of_a_runs_root(rewound_run):
    root = rewound_run.parent.parent
    _fake_run(
        root,
        "esm2/stopped-local",
        "local",
        "2020-01-02T00:00:00Z",
        exit_code=75,
        outcome="local",
        decision="none",
        latest_step=40,
    )
    _fake_run(
        root,
        "geneformer/oom",
        "sbatch",
        "2020-01-01T00:00:00Z",
        exit_code=12,
        outcome="oom",
        decision="stop",
        latest_step=None,
    )  # closed: no scheduler asked
    out = subprocess.run(
        [sys.executable, "-m", "launchers", "list", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    assert header.split() == [
        "submitted",
        "run",
        "backend",
        "state",
        "checkpoint",
        "last",
        "decision",
    ]
    assert [line.split()[1:5] for line in lines] == [  # oldest first
        ["geneformer/oom", "sbatch", "failed", "-"],
        ["esm2/stopped-local", "local", "stopped", "-"],
        ["esm2/rewound", "local", "finished", str(MAX_STEPS)],
    ]
    assert lines[0].endswith("stop (oom)") and lines[1].endswith("none (local)")


def test_run_states_from_records():
    assert runs.ended({}, {}) == "failed"  # ended with nothing recorded
    assert runs.ended({}, {"outcome": "timeout", "decision": "stop"}) == "stopped"
    assert runs.ended({}, {"outcome": "hung", "decision": "stop"}) == "failed"
    cancelled = {"events": [{"event": "cancel", "time": "2026-01-02T00:00:00Z"}]}
    assert (
        runs.ended(
            cancelled, {"outcome": "crashed", "decision": "requeue", "time": "2026-01-01T00:00:00Z"}
        )
        == "stopped"
    )


# ------------------------------------------------------------------------------ sacct

# `sacct -j ID -X -n -P -o JobID,State,ExitCode,Elapsed,Timelimit,Start,End,NodeList` as SLURM
# prints it: '|'-separated, no header, no trailing separator; "CANCELLED by <uid>"; a job that
# never started has Start "None" and NodeList "None assigned".
RECORDED_SACCT = """\
301099|TIMEOUT|0:0|00:30:11|00:30:00|2026-09-04T18:52:13|2026-09-04T19:22:24|gl[111-112]
314831|CANCELLED by 30154|0:0|00:00:00|01:00:00|None|2026-09-06T12:59:09|None assigned
305318|COMPLETED|0:0|18:39:50|1-00:00:00|2026-09-05T18:23:21|2026-09-06T13:03:11|gl111
"""


def test_sacct_output_is_parsed_and_described():
    rows = runs.parse_sacct(RECORDED_SACCT + "\nsacct: some warning\n")
    assert [r["JobID"] for r in rows] == ["301099", "314831", "305318"]
    assert runs.describe_sacct(rows[0]) == (
        "TIMEOUT (sacct), exit 0:0, ran 00:30:11 of 00:30:00, "
        "ended 2026-09-04T19:22:24 on gl[111-112]"
    )
    assert runs.describe_sacct(rows[1]) == (
        "CANCELLED by 30154 (sacct), exit 0:0, ran 00:00:00 of 01:00:00, ended 2026-09-06T12:59:09"
    )


def test_no_sacct_is_said_not_raised(tmp_path):
    row, text = runs.accounting("12", {"PATH": str(tmp_path)})  # a login node without sacct
    assert row is None and text == "no accounting (sacct not found)"
    assert (
        runs.left_controller("12", {}, "RUNNING, 00:01:00 of 00:30:00")
        == "RUNNING, 00:01:00 of 00:30:00"
    )  # sacct is asked only for a job that has left


# ------------------------------------------------------------------------------ plot


def test_plot_writes_loss_and_throughput_pngs(rewound_run):
    out = subprocess.run(
        [sys.executable, "-m", "launchers", "plot", str(rewound_run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    paths = [Path(p) for p in out.stdout.split()]
    assert paths == [rewound_run / "plots" / "loss.png", rewound_run / "plots" / "throughput.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_plot_of_a_run_with_no_steps_says_so(tmp_path):
    (tmp_path / rundir.CONFIG).write_text("job: {}\n")
    with pytest.raises(plot.PlotError, match="cannot read"):
        plot.plot(tmp_path)
    (tmp_path / rundir.METRICS).write_text("")
    with pytest.raises(plot.PlotError, match="no training step logged yet"):
        plot.plot(tmp_path)


def test_launcher_modules_stay_torch_free():
    code = (
        "import sys; import launchers.cli, launchers.runs, launchers.plot; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
