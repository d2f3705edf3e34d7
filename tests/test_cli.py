"""The launcher CLI without SLURM: fake sbatch/scontrol/scancel on PATH, stub trainers, no torch.

The same commands run against the bundled cluster in tests/integration/test_sbatch.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bionemo import rundir
from launchers import cli, record, requeue
from launchers.backends import sbatch as sbatch_backend
from launchers.commands import submit as submit_cmds

REPO = Path(__file__).resolve().parents[1]
MALFORMED = yaml.safe_load((REPO / "tests" / "golden" / "malformed.yaml").read_text())


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return path


PARQUET = b"PAR1" + bytes(8) + b"PAR1"  # what the data check reads of a parquet file
SQLITE = b"SQLite format 3\x00" + bytes(84)  # ... and of an SQLite database


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """Files that satisfy the data check (it reads only their magic bytes)."""
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train_clusters.parquet", "valid_clusters.parquet"):
        (d / name).write_bytes(PARQUET)
    (d / "proteins.sqlite").write_bytes(SQLITE)
    return d


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch/scontrol/scancel that log their arguments; sbatch prints job ids 1000, 1001, ..."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "slurm-calls.log"
    state = tmp_path / "job-state"
    state.write_text("RUNNING")
    _exe(
        bin_dir / "sbatch",
        f"""#!/bin/bash
echo "sbatch $*" >> {log}
n=$(grep -c '^sbatch' {log})
echo $((999 + n))
""",
    )
    _exe(
        bin_dir / "scontrol",
        f"""#!/bin/bash
echo "scontrol $*" >> {log}
if [ "$1 $2" = "show job" ]; then
  echo "JobId=$4 JobName=x JobState=$(cat {state}) Reason=None Restarts=1 RunTime=00:00:05 TimeLimit=00:30:00 NodeList=node[1-2] ExitCode=0:0"
fi
""",
    )
    _exe(
        bin_dir / "scancel",
        f"""#!/bin/bash
echo "scancel $*" >> {log}
""",
    )
    # the partition-size check asks sinfo once; a 4-node default partition, as the bundled one
    _exe(
        bin_dir / "sinfo",
        """#!/bin/bash
if [ -n "$FAKE_SINFO_FAILS" ]; then
  echo "sinfo: error: Unable to contact slurm controller" >&2; exit 1
fi
echo "debug* 3"
echo "debug* 1"
echo "big 64"
""",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # never start (or talk to) the real bundled cluster from unit tests
    monkeypatch.setattr(sbatch_backend, "client_env", lambda saved, start=False: dict(os.environ))

    class Fake:
        def calls(self) -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

        def set_state(self, s: str) -> None:
            state.write_text(s)

    return Fake()


def refused(*args: str) -> str:
    """`python -m launchers ARGS` from the checkout must exit 2 with one error line: that line."""
    out = subprocess.run(
        [sys.executable, "-m", "launchers", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    return lines[0]


def base_args(tmp_path, data_dir, *extra) -> list[str]:
    return [
        "--model",
        "esm2_8m",
        "--cluster",
        "local",
        f"cluster.runs_root={tmp_path}/runs",
        f"trainer.data.train_clusters={data_dir}/train_clusters.parquet",
        f"trainer.data.valid_clusters={data_dir}/valid_clusters.parquet",
        f"trainer.data.database={data_dir}/proteins.sqlite",
        *extra,
    ]


# ------------------------------------------------------------------------------------ torch-free


def test_render_never_imports_torch_nor_trainer_code():
    code = (
        "import sys\n"
        "from launchers.cli import main\n"
        "rc = main(['render', '--model', 'esm2_650m', '--cluster', 'h100_example', '--nodes', '8'])\n"
        "assert rc == 0, rc\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "from launchers import requeue, record, cluster, spec, config\n"
        "from launchers.backends import local, sbatch\n"
        "assert 'torch' not in sys.modules\n"
        "trainer = {m for m in sys.modules if m.startswith('bionemo')}\n"
        "assert trainer <= {'bionemo', 'bionemo.config', 'bionemo.config_data', 'bionemo.rundir'}, trainer\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_python_m_launchers_validates_and_exits_with_its_code():
    """`python -m launchers` (launchers/__main__.py) exits with the command's code: 2 and one
    line for a configuration error."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers",
            "render",
            "--model",
            "esm2_8m",
            "trainer.train.max_steps=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert (
        out.returncode == 2
        and "trainer.train.max_steps: input should be greater than 0" in out.stderr
    ), out.stderr[-2000:]
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_requeue_module_is_stdlib_only():
    """The batch host may run a bare python3: requeue.py must not need pydantic, yaml or jinja2."""
    code = (
        "import sys\n"
        "import launchers.requeue\n"
        "heavy = {'pydantic', 'yaml', 'jinja2', 'torch'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------ render / submit


def test_render_prints_script_and_config_and_writes_nothing(tmp_path, data_dir, capsys):
    rc = cli.main(["render", *base_args(tmp_path, data_dir, "job.run=r1")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#SBATCH --nodes=2" in out and "# ==== config.yaml" in out
    assert "trainer:" in out and "job:" in out and "cluster:" in out
    assert not (tmp_path / "runs").exists()


def test_submit_writes_run_dir_and_record(tmp_path, data_dir, fake_slurm, capsys):
    rc = cli.main(["submit", *base_args(tmp_path, data_dir, "job.run=r1", "job.experiment=e")])
    assert rc == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "e" / "r1"
    assert "submitted job 1000" in capsys.readouterr().out
    assert [c.split()[0] for c in fake_slurm.calls()] == ["sbatch"]
    assert fake_slurm.calls()[0].endswith(f"--parsable {run_dir}/train.sbatch")
    for name in (rundir.CONFIG, rundir.SCRIPT, rundir.SUBMISSION, rundir.LOGS):
        assert (run_dir / name).exists(), name
    saved = yaml.safe_load((run_dir / rundir.CONFIG).read_text())
    assert set(saved) == {"job", "cluster", "trainer"}
    assert saved["job"]["run"] == "r1" and saved["job"]["nodes"] == 2
    from bionemo.config import load_trainer_config

    assert load_trainer_config(run_dir / rundir.CONFIG).model.name == "esm2_8m"
    rec = record.load(run_dir)
    assert rec["backend"] == "sbatch" and record.job_ids(rec) == ["1000"]
    assert rec["policy"]["max_restarts"] == 50 and rec["policy"]["requeue_exit_code"] == 75
    assert set(rec["jobs"][0]["timings"]) == {"launcher_s", "scheduler_s", "before_submit_s"}


def test_submit_refuses_an_existing_run_dir(tmp_path, data_dir, fake_slurm, capsys):
    args = ["submit", *base_args(tmp_path, data_dir, "job.run=r1", "job.experiment=e")]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "job.run" in err and "resume" in err
    assert len(fake_slurm.calls()) == 1


def test_default_run_name_and_experiment(tmp_path, data_dir, fake_slurm):
    assert cli.main(["submit", *base_args(tmp_path, data_dir)]) == 0
    (run_dir,) = (tmp_path / "runs" / "esm2").iterdir()
    assert run_dir.name.startswith("esm2_8m-2n-") and run_dir.name.endswith("Z")


def test_a_taken_default_name_gives_way_to_the_next(tmp_path, data_dir):
    """The run directory is created with one mkdir; when another submit made the default name's
    directory first, the next name is taken and the batch script rendered again for it."""
    from datetime import datetime, timezone

    from launchers import backends, config, spec as specs

    resolved = config.resolve(
        model="esm2_8m",
        cluster="local",
        overrides=[f"cluster.runs_root={tmp_path}/runs", *base_args(tmp_path, data_dir)[5:]],
        now=datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    )
    spec = specs.build(resolved, strict=True)
    backend = backends.get("sbatch")
    first = tmp_path / "runs" / "esm2" / "esm2_8m-2n-20250102T030405Z"
    first.mkdir(parents=True)  # what a concurrent submit did a moment ago
    written = submit_cmds._write_run_dir(spec, backend, backend.files(spec), resolved.default_run)
    assert written.run_dir == first.with_name(first.name + "-02") and not list(first.iterdir())
    script = (written.run_dir / rundir.SCRIPT).read_text()
    assert f"{first.name}-02/logs/" in script and f"{first.name}/logs/" not in script
    saved = yaml.safe_load((written.run_dir / rundir.CONFIG).read_text())
    assert saved["job"]["run"] == first.name + "-02"


@pytest.mark.cluster
def test_concurrent_submits_without_a_run_name_get_a_run_directory_each(slurm_cluster, tmp_path):
    """Issue 13: 8 `submit experiment=X` at once, no run name (one-second names): 6 of 8 were
    refused "exists already". Every default name of the next two minutes is taken beforehand, so
    all 8 race for the same suffixed names, every time. Held jobs, cancelled at the end."""
    from datetime import datetime, timedelta, timezone

    runs = tmp_path / "runs"
    now = datetime.now(timezone.utc)
    taken = {f"esm2_8m-2n-{now + timedelta(seconds=s):%Y%m%dT%H%M%SZ}" for s in range(-2, 120)}
    for name in taken:
        (runs / "X" / name).mkdir(parents=True)
    argv = [
        sys.executable,
        "-m",
        "launchers",
        "submit",
        "--model",
        "esm2_8m",
        "--cluster",
        "local",
        f"cluster.runs_root={runs}",
        "experiment=X",
        "job.hold=true",
    ]
    procs = [
        subprocess.Popen(
            argv,
            cwd=REPO,
            env=slurm_cluster.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outs = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    new = sorted(set(p.name for p in (runs / "X").iterdir()) - taken)
    ids = [i for d in new for i in record.job_ids(record.load(runs / "X" / d))]
    try:
        assert [rc for _, _, rc in outs] == [0] * 8, outs
        assert len(new) == 8 and len(ids) == 8, (new, ids)
        for name in new:
            assert name[:-3] in taken and name[-3:-2] == "-"  # <default name>-NN
            saved = yaml.safe_load((runs / "X" / name / rundir.CONFIG).read_text())
            assert saved["job"]["run"] == name
            assert f"/{name}/logs/" in (runs / "X" / name / rundir.SCRIPT).read_text()
    finally:
        for job_id in ids:
            slurm_cluster.cancel(job_id)


def test_partition_size_is_checked_with_one_sinfo(
    tmp_path, data_dir, fake_slurm, monkeypatch, capsys
):
    """More nodes than the partition has would pend forever (the malformed table covers it); a
    partition the cluster lacks is refused too; without an answer from sinfo, a warning."""
    args = ["submit", *base_args(tmp_path, data_dir)]
    assert cli.main([*args, "cluster.partition=big", "--nodes", "64", "job.run=a"]) == 0
    assert cli.main([*args, "cluster.partition=gpu"]) == 2
    assert (
        "command line: cluster.partition: gpu is not a partition of this cluster; choose "
        "one of debug, big" in capsys.readouterr().err
    )
    monkeypatch.setenv("FAKE_SINFO_FAILS", "1")
    assert cli.main([*args, "--nodes", "100000", "job.run=b"]) == 0
    assert (
        "warning: job.nodes 100000 is not checked against the partition's size (sinfo: "
        "sinfo: error: Unable to contact slurm controller)" in capsys.readouterr().err
    )
    assert [c.split()[0] for c in fake_slurm.calls()] == ["sbatch", "sbatch"]
    monkeypatch.delenv("FAKE_SINFO_FAILS")
    fake_slurm.set_state("FAILED")
    run_a = tmp_path / "runs" / "esm2" / "a"
    assert cli.main(["resume", str(run_a), "job.nodes=65"]) == 2  # resume asks sinfo too
    assert "job.nodes: 65 nodes, but partition big has 64" in capsys.readouterr().err


# Cases whose files are not text (the YAML table's `files` are): written as bytes here.
BINARY_MALFORMED = [
    {
        "name": "binary config file",
        "binary_files": {"blob.yaml": bytes(range(256)) * 4},
        "args": ["--config", "{tmp}/blob.yaml"],
        "key": "--config",
        "source": "{tmp}/blob.yaml",
    },
    {
        "name": "binary model preset",
        "binary_files": {"m.yaml": b"model:\xff\xfe\x00"},
        "args": ["--model", "{tmp}/m.yaml"],
        "key": "job.model",
        "source": "{tmp}/m.yaml",
    },
]


@pytest.mark.parametrize(
    "case", MALFORMED + BINARY_MALFORMED, ids=[c["name"] for c in MALFORMED + BINARY_MALFORMED]
)
def test_malformed_is_rejected_before_sbatch(case, tmp_path, data_dir, fake_slurm, capsys):
    for name, text in case.get("files", {}).items():
        (tmp_path / name).write_text(text)
    for name, blob in case.get("binary_files", {}).items():
        (tmp_path / name).write_bytes(blob)
    args = [a.replace("{tmp}", str(tmp_path)) for a in case["args"]]
    rc = cli.main([case.get("command", "submit"), *base_args(tmp_path, data_dir), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert fake_slurm.calls() == []
    assert not (tmp_path / "runs").exists()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert any(case["key"] in line for line in lines), err
    assert all(";" in line for line in lines), err  # every problem comes with a fix
    assert "Traceback" not in err
    if "source" in case:  # `<file>: <key>: <problem>; <fix>`, one line
        source = case["source"].replace("{tmp}", str(tmp_path))
        assert len(lines) == 1 and lines[0].startswith(f"error: {source}: {case['key']}: "), err


def test_at_least_twenty_malformed_cases():
    assert len(MALFORMED) >= 20


def test_cli_exit_code_and_message_format(tmp_path, data_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers",
            "submit",
            *base_args(tmp_path, data_dir, "trainer.train.max_step=10"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(
        "error: command line: trainer.train.max_step: unknown key (did you mean 'max_steps'?); "
        "keys under trainer.train: micro_batch_size, global_batch_size, max_steps, "
    ), line


# ------------------------------------------------------------------------------------ bundled cluster


def test_submit_brings_the_bundled_cluster_up_when_needed(tmp_path, data_dir, monkeypatch):
    from launchers import cluster

    calls = []
    conf = tmp_path / "slurm.conf"
    monkeypatch.setattr(cluster, "slurm_env", lambda: {"SLURM_CONF": str(conf)})
    monkeypatch.setattr(cluster, "is_up", lambda: calls.append("is_up") or False)
    monkeypatch.setattr(cluster, "up", lambda *a, **k: calls.append("up"))
    env = sbatch_backend.client_env({"bundled": True}, start=True)
    assert calls == ["is_up", "up"] and env["SLURM_CONF"] == str(conf)
    calls.clear()
    sbatch_backend.client_env({"bundled": False}, start=True)
    sbatch_backend.client_env({"bundled": True}, start=False)
    assert calls == []


# ------------------------------------------------------------------------------------ requeue policy

POLICY = {"max_restarts": 3, "requeue_exit_code": 75, "oom_exit_code": 12, "time_limit_s": 600}


def decide(exit_code, latest, history=(), restarts=0, finished=False, **kw):
    return requeue.decide(
        finished=finished,
        exit_code=exit_code,
        latest_step=latest,
        restarts=restarts,
        policy=POLICY,
        history=list(history),
        **kw,
    )


def test_policy_finished_is_never_requeued():
    for rc in (0, 75, 1, 137):
        assert decide(rc, 40, finished=True)["decision"] == "stop"


def test_policy_requeue_on_75_until_no_progress():
    assert decide(75, 20)["decision"] == "requeue"
    prev = [
        {
            "decision": "requeue",
            "latest_step": 20,
            "outcome": "stopped",
            "job_id": "7",
            "restart": 0,
        }
    ]
    assert decide(75, 30, prev)["decision"] == "requeue"
    d = decide(75, 20, prev)
    assert d["decision"] == "stop" and "no progress" in d["reason"]


def test_policy_restart_limit():
    d = decide(75, 20, restarts=3)
    assert d["decision"] == "stop" and "max_restarts" in d["reason"]


def test_policy_crash_once_then_crash_loop():
    first = decide(1, 10)
    assert first["decision"] == "requeue" and first["outcome"] == "crashed"
    prev = [{**first, "latest_step": 10, "exit_code": 1}]
    assert decide(1, 20, prev)["decision"] == "requeue"  # progress since: not a loop
    d = decide(1, 10, prev)
    assert d["decision"] == "stop" and "crashed twice at step 10" in d["reason"]
    # exit 0 without the finished marker is a crash too
    assert decide(0, 10, prev)["decision"] == "stop"


def test_policy_scheduler_termination_is_left_to_slurm():
    d = decide(75, 10, terminated=True, elapsed_s=100)
    assert d["decision"] == "none" and d["outcome"] == "terminated"
    # SIGTERM at the time limit: the trainer got no warning in time; requeue if it saved
    d = decide(143, 10, terminated=True, elapsed_s=590)
    assert d["decision"] == "requeue" and d["outcome"] == "timeout"


def test_policy_oom_stops():
    d = decide(12, 10)
    assert d["decision"] == "stop" and "micro_batch_size" in d["reason"]


def test_requeue_main_records_then_calls_scontrol(tmp_path, fake_slurm, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record.create(run_dir, backend="sbatch", cluster="x", policy=POLICY)
    env = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}
    assert requeue.main([str(run_dir), "--exit-code", "75", "--elapsed", "50"], env) == 0
    assert fake_slurm.calls() == ["scontrol requeue 77"]
    (a,) = record.load(run_dir)["attempts"]
    assert a["decision"] == "requeue" and a["job_id"] == "77" and a["latest_step"] is None
    # the same step again: no progress, stop with the trainer's exit code
    assert (
        requeue.main([str(run_dir), "--exit-code", "75"], {**env, "SLURM_RESTART_COUNT": "1"}) == 75
    )
    assert len(fake_slurm.calls()) == 1
    assert record.load(run_dir)["attempts"][-1]["decision"] == "stop"
    # finished: exit 0, nothing requeued
    (run_dir / rundir.FINISHED).write_text("1\n")
    assert requeue.main([str(run_dir), "--exit-code", "75"], env) == 0
    assert len(fake_slurm.calls()) == 1


# ------------------------------------------------------------------------------------ status / cancel / resume


@pytest.fixture
def submitted(tmp_path, data_dir, fake_slurm, capsys) -> Path:
    assert (
        cli.main(["submit", *base_args(tmp_path, data_dir, "job.run=r1", "job.experiment=e")]) == 0
    )
    capsys.readouterr()
    return tmp_path / "runs" / "e" / "r1"


def test_status_reports_state_progress_and_reason(submitted, fake_slurm, capsys):
    step = rundir.step_dir(submitted, 20)
    step.mkdir(parents=True)
    (step / rundir.COMPLETE).write_text("20\n")
    (submitted / rundir.METRICS).write_text('{"kind": "train", "step": 25}\n')
    record.add_attempt(
        submitted,
        {
            "job_id": "1000",
            "restart": 1,
            "exit_code": 1,
            "outcome": "crashed",
            "decision": "stop",
            "latest_step": 20,
            "reason": "crash loop: crashed twice at step 20",
        },
    )
    assert cli.main(["status", str(submitted)]) == 0
    out = capsys.readouterr().out
    assert "backend   sbatch" in out and "1000 (submit)" in out
    assert "job 1000: RUNNING" in out and "restarts 1" in out
    assert "step 20" in out and "last logged step: 25" in out
    assert "crash loop: crashed twice at step 20" in out


def test_cancel_calls_scancel_and_records(submitted, fake_slurm, capsys):
    assert cli.main(["cancel", str(submitted)]) == 0
    assert fake_slurm.calls()[-1] == "scancel 1000"
    assert record.load(submitted)["events"][-1]["event"] == "cancel"


def test_resume_refuses_live_job_then_resubmits(submitted, fake_slurm, capsys):
    assert cli.main(["resume", str(submitted)]) == 2
    assert "is RUNNING" in capsys.readouterr().err
    fake_slurm.set_state("FAILED")
    assert cli.main(["resume", str(submitted), "trainer.train.max_steps=123"]) == 0
    assert fake_slurm.calls()[-1].startswith("sbatch --parsable")
    assert record.job_ids(record.load(submitted)) == ["1000", "1001"]
    assert (
        yaml.safe_load((submitted / rundir.CONFIG).read_text())["trainer"]["train"]["max_steps"]
        == 123
    )


def test_resume_refuses_finished_run_and_renamed_run(submitted, fake_slurm, capsys):
    fake_slurm.set_state("COMPLETED")
    assert cli.main(["resume", str(submitted), "job.run=other"]) == 2
    assert "job.run" in capsys.readouterr().err
    (submitted / rundir.FINISHED).write_text("10\n")
    assert cli.main(["resume", str(submitted)]) == 2
    assert "finished" in capsys.readouterr().err
    assert [c.split()[0] for c in fake_slurm.calls()].count("sbatch") == 1


def test_logs_prints_newest(submitted, capsys):
    (submitted / "logs" / "slurm-1000.out").write_text("[launcher] hello\n")
    (submitted / "logs" / "train-1000-r0.log").write_text("step 10\n")
    assert cli.main(["logs", str(submitted)]) == 0
    out = capsys.readouterr().out
    assert "[launcher] hello" in out and "step 10" in out


# ------------------------------------------------------------------------------------ local backend


def test_debug_runs_the_trainer_in_the_foreground(tmp_path, data_dir, capsys):
    stub = _exe(
        tmp_path / "python",
        """#!/bin/bash
# stands in for `python -m bionemo.train RUN_DIR`
[ "$1 $2" = "-m bionemo.train" ] || exit 3
echo "stub trainer in $(pwd) OMP=$OMP_NUM_THREADS"
echo 50 > "$3/finished"
""",
    )
    rc = cli.main(
        [
            "debug",
            "--model",
            "esm2_8m",
            f"cluster.python={stub}",
            "job.run=d1",
            *base_args(tmp_path, data_dir)[4:],
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    run_dir = tmp_path / "runs" / "debug" / "d1"
    assert f"stub trainer in {REPO}" in out
    saved = yaml.safe_load((run_dir / rundir.CONFIG).read_text())
    assert saved["job"]["backend"] == "local" and saved["job"]["nodes"] == 1
    assert saved["trainer"]["train"]["max_steps"] == 50
    assert saved["trainer"]["checkpoint"]["every_steps"] == 25
    assert saved["trainer"]["train"]["log_every"] == 5
    (a,) = record.load(run_dir)["attempts"]
    assert a["outcome"] == "finished" and a["exit_code"] == 0
    assert list((run_dir / "logs").glob("train-local-*.log"))


def test_submit_refuses_a_clusters_file_without_its_id_column(tmp_path, data_dir):
    """Read from the parquet footer's bytes before anything is written: the job would otherwise
    fail once it starts, after its wait in the queue."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"ur50_id": ["a"]}), wrong)  # the validation layout as train file
    line = refused("submit", *base_args(tmp_path, data_dir, f"trainer.data.train_clusters={wrong}"))
    assert line.startswith(
        f"error: command line: trainer.data.train_clusters: {wrong} has no column 'ur90_id'"
    ), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "nproc, expect",
    [
        ("0", "--nproc: cluster.tasks_per_node: input should be greater than or equal to 1"),
        ("100000", "--nproc: cluster.tasks_per_node: 100000 ranks would start as processes on"),
    ],
)
def test_debug_refuses_a_rank_count_this_machine_cannot_run(tmp_path, nproc, expect):
    """--nproc 0 once ran one rank; a typo's 100000 would start 100000 processes here."""
    runs = tmp_path / "runs"
    line = refused("debug", "--model", "esm2_8m", "--nproc", nproc, f"cluster.runs_root={runs}")
    assert line.startswith(f"error: {expect}"), line
    assert not runs.exists()


def test_local_backend_starts_each_rank_itself():
    # no torchrun: it reports any non-zero worker exit as 1, and the run's 75/12/28/124 must
    # reach the caller (tests/test_local_backend.py runs the ranks)
    from launchers.backends.local import command

    assert command("py", Path("/r")) == ["py", "-m", "bionemo.train", "/r"]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for c in ("submit", "render", "debug", "status", "logs", "cancel", "resume", "cluster"):
        assert c in out


def test_submission_record_is_json(submitted):
    json.loads((submitted / rundir.SUBMISSION).read_text())
