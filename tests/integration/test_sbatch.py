"""The launcher against the bundled SLURM cluster: real `python -m launchers submit`, real jobs.

Every job is ESM-2 8M shrunk to two layers at sequence length 128 on 2 nodes x 1 rank (gloo), so
a step takes a fraction of a second on CPU; BIONEMO_STEP_SLEEP (seconds the trainer sleeps after
each step) stretches runs that must still be running when something happens to them.

To fit CI's budget the slow cases overlap: the time-limit run and its uninterrupted twin are
submitted by the first test that needs them and checked by the last one, while the other tests
run. The node-failure test runs before them because it needs whole nodes (--exclusive) for
itself. A background thread releases requeued jobs of this module at once (SLURM would otherwise
hold each one ~120 s before restarting it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bionemo import rundir
from launchers import cli, cluster, record
from tests.integration._runs import (
    FINAL,
    REPO,
    SMALL,
    TL_COMMON,
    TL_LIMITED,
    TL_STEPS,
    Releaser,
    assert_finished,
    assert_same_weights,
    hostnames,
    logs,
    wait_for,
    wait_time_limit_pair,
)

MALFORMED_FILE = REPO / "tests" / "golden" / "malformed.yaml"

# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bionemo.data.sample",
            "--out",
            str(out),
            "--clusters",
            "300",
            "--seed",
            "3",
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def releaser(slurm_cluster):
    thread = Releaser(slurm_cluster)
    thread.start()
    yield thread
    thread.done.set()
    for job_id in thread.jobs:
        slurm_cluster.cancel(job_id)


class Launcher:
    def __init__(self, slurm, releaser, data_dir: Path, runs_root: Path):
        self.slurm, self.releaser = slurm, releaser
        self.data = [
            f"trainer.data.train_clusters={data_dir}/train_clusters.parquet",
            f"trainer.data.valid_clusters={data_dir}/valid_clusters.parquet",
            f"trainer.data.database={data_dir}/proteins.sqlite",
        ]
        self.runs_root = runs_root

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launchers", *args],
            cwd=REPO,
            env=self.slurm.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def submit(self, run: str, *overrides: str, experiment: str = "it") -> tuple[Path, str]:
        out = self.cli(
            "submit",
            "--model",
            "esm2_8m",
            "--cluster",
            "local",
            "--nodes",
            "2",
            f"cluster.runs_root={self.runs_root}",
            f"job.experiment={experiment}",
            f"job.run={run}",
            *SMALL,
            *self.data,
            *overrides,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        run_dir = self.runs_root / experiment / run
        job_id = record.job_ids(record.load(run_dir))[-1]
        self.releaser.jobs.add(job_id)
        return run_dir, job_id

    def wait_final(self, job_id: str, timeout: float) -> dict:
        return self.slurm.wait_job(job_id, FINAL, timeout=timeout, poll=1.0)


@pytest.fixture(scope="module")
def launcher(slurm_cluster, releaser, data_dir, runs_root) -> Launcher:
    return Launcher(slurm_cluster, releaser, data_dir, runs_root)


# ------------------------------------------------------------------------------------ rejected early


def test_malformed_are_rejected_before_sbatch_and_the_queue_stays_empty(
    launcher, tmp_path, monkeypatch, capsys
):
    import yaml

    cases = yaml.safe_load(MALFORMED_FILE.read_text())
    assert len(cases) >= 20
    monkeypatch.setenv("SLURM_CONF", launcher.slurm.env["SLURM_CONF"])
    before = launcher.slurm.run(["squeue", "-h", "-o", "%i"]).stdout.split()
    for case in cases:
        for name, text in case.get("files", {}).items():
            (tmp_path / name).write_text(text)
        args = [a.replace("{tmp}", str(tmp_path)) for a in case["args"]]
        rc = cli.main(
            [
                case.get("command", "submit"),
                "--model",
                "esm2_8m",
                "--cluster",
                "local",
                f"cluster.runs_root={tmp_path}/runs",
                "job.experiment=malformed",
                *launcher.data,
                *args,
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2, (case["name"], err)
        assert case["key"] in err, (case["name"], err)
    after = launcher.slurm.run(["squeue", "-h", "-o", "%i"]).stdout.split()
    assert set(after) <= set(before), "a malformed submission reached the queue"
    names = launcher.slurm.run(["squeue", "-h", "-o", "%j"]).stdout.split()
    assert not [n for n in names if n.startswith("malformed")]
    assert not (tmp_path / "runs").exists()


def test_shell_metacharacters_in_the_experiment_name_are_inert(launcher, tmp_path):
    nasty = "$(touch PWNED);`touch PWNED` 'q' \"dq\" & | < > * ? [x] ~ {a,b} !x #c $HOME"
    run_dir, job_id = launcher.submit(
        "meta", "max_steps=4", "trainer.checkpoint.every_steps=2", experiment=nasty
    )
    assert run_dir.is_dir() and run_dir.parent.name == nasty
    rec = launcher.wait_final(job_id, timeout=180)
    assert rec["JobState"] == "COMPLETED", logs(run_dir)
    assert rec["StdOut"] == f"{run_dir}/logs/slurm-{job_id}.out"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", rec["JobName"])
    assert_finished(run_dir, 4)
    assert not list(launcher.runs_root.rglob("PWNED")) and not (REPO / "PWNED").exists()


# ------------------------------------------------------------------------------------ node failure


def test_node_failure_requeues_and_resumes_on_healthy_nodes(launcher):
    slurm = launcher.slurm
    run_dir, job_id = launcher.submit(
        "node-failure",
        "max_steps=24",
        "trainer.checkpoint.every_steps=4",
        "cluster.exclusive=true",
        "cluster.env.BIONEMO_STEP_SLEEP=0.4",
    )
    rec = slurm.wait_job(job_id, {"RUNNING"}, timeout=120)
    first = hostnames(slurm, rec["NodeList"])
    wait_for(lambda: rundir.latest_complete_step(run_dir), 120, "a first checkpoint", run_dir)
    victim = first[-1]  # not the batch host, so the batch script lives to record what happened
    try:
        slurm.run(
            [
                "scontrol",
                "update",
                f"nodename={victim}",
                "state=down",
                "reason=launcher-node-failure-test",
            ],
            check=True,
        )
        rec = launcher.wait_final(job_id, timeout=300)
        assert rec["JobState"] == "COMPLETED", logs(run_dir)
        assert int(rec["Restarts"]) >= 1
        last = hostnames(slurm, rec["NodeList"])
        assert victim not in last and len(last) == 2, (first, last)
    finally:
        cluster.reset_node(victim)
    assert_finished(run_dir, 24)
    resumed = (run_dir / "logs" / f"train-{job_id}-r1.log").read_text()
    assert re.search(r"resumed from \S+step-\d+ \(step \d+", resumed), resumed


# ------------------------------------------------------------------------------------ time limit (background)


@pytest.fixture(scope="module")
def time_limit_runs(launcher):
    """Submitted once, by the first test that asks; checked by test_time_limit_..."""
    ref = launcher.submit("uninterrupted", *TL_COMMON)
    limited = launcher.submit("time-limit", *TL_COMMON, *TL_LIMITED)  # see TL_LIMITED's comment
    return {"ref": ref, "limited": limited}


def test_two_node_run_completes(launcher, time_limit_runs):
    slurm = launcher.slurm
    run_dir, job_id = launcher.submit(
        "two-node", "max_steps=20", "trainer.checkpoint.every_steps=10"
    )
    rec = launcher.wait_final(job_id, timeout=240)
    assert rec["JobState"] == "COMPLETED", logs(run_dir)
    assert_finished(run_dir, 20)
    # both ranks took part, on two nodes
    nodes = hostnames(slurm, rec["NodeList"])
    assert len(set(nodes)) == 2
    step = rundir.step_dir(run_dir, 20)
    assert (step / "rng-rank00000.pt").is_file() and (step / "rng-rank00001.pt").is_file()
    train_log = (run_dir / "logs" / f"train-{job_id}-r0.log").read_text()
    assert "[rank 0]" in train_log and "[rank 1]" in train_log, train_log
    metrics = [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [5, 10, 15, 20]
    assert (run_dir / rundir.CONFIG).is_file() and (run_dir / rundir.SCRIPT).is_file()
    (attempt,) = record.load(run_dir)["attempts"]
    assert attempt["outcome"] == "finished" and attempt["decision"] == "stop"

    # a finished run is never requeued: not by the requeue step, not by `resume`
    env = {**slurm.env, "SLURM_JOB_ID": job_id}
    out = subprocess.run(
        [sys.executable, "-m", "launchers.requeue", str(run_dir), "--exit-code", "75"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "never requeued" in out.stdout
    assert launcher.slurm.job(job_id)["JobState"] == "COMPLETED"
    out = launcher.cli("resume", str(run_dir))
    assert out.returncode == 2 and "finished" in out.stderr
    out = launcher.cli("status", str(run_dir))
    assert out.returncode == 0 and "finished  yes" in out.stdout and "COMPLETED" in out.stdout


def test_preemption_resumes_from_the_last_complete_checkpoint(launcher, time_limit_runs):
    slurm = launcher.slurm
    run_dir, job_id = launcher.submit(
        "preempted",
        "max_steps=24",
        "trainer.checkpoint.every_steps=4",
        "cluster.env.BIONEMO_STEP_SLEEP=0.4",
    )
    slurm.wait_job(job_id, {"RUNNING"}, timeout=120)
    wait_for(lambda: rundir.latest_complete_step(run_dir), 120, "a first checkpoint", run_dir)
    slurm.run(["scontrol", "requeue", job_id], check=True)  # what preemption with requeue does
    rec = launcher.wait_final(job_id, timeout=300)
    assert rec["JobState"] == "COMPLETED", logs(run_dir)
    assert int(rec["Restarts"]) == 1
    assert_finished(run_dir, 24)
    attempts = record.load(run_dir)["attempts"]
    assert attempts[0]["outcome"] == "terminated" and attempts[0]["decision"] == "none"
    saved_at = attempts[0]["latest_step"]
    resumed = (run_dir / "logs" / f"train-{job_id}-r1.log").read_text()
    m = re.search(r"resumed from \S+step-\d+ \(step (\d+)", resumed)
    assert m and int(m.group(1)) == saved_at, resumed


def test_crash_loop_stops_and_status_says_why(launcher, time_limit_runs, data_dir, tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(
        b"PAR1" + b"this is not parquet\n" + b"PAR1"
    )  # present (passes validation), unreadable
    run_dir, job_id = launcher.submit(
        "crash-loop", "max_steps=20", f"trainer.data.train_clusters={broken}"
    )
    rec = launcher.wait_final(job_id, timeout=240)
    assert rec["JobState"] == "FAILED", logs(run_dir)
    assert int(rec["Restarts"]) == 1  # requeued once, then stopped
    first, second = record.load(run_dir)["attempts"]
    assert (first["outcome"], first["decision"]) == ("crashed", "requeue")
    assert (second["outcome"], second["decision"]) == ("crashed", "stop")
    assert "crashed twice" in second["reason"]
    out = launcher.cli("status", str(run_dir))
    assert out.returncode == 0 and "crash loop: crashed twice" in out.stdout, out.stdout
    active = launcher.slurm.run(["squeue", "-h", "-j", job_id, "-o", "%T"]).stdout.split()
    assert not set(active) - {"FAILED", "COMPLETED"}


def test_time_limit_requeues_itself_and_matches_an_uninterrupted_run(
    launcher, time_limit_runs, tmp_path
):
    ref_dir, _ = time_limit_runs["ref"]
    run_dir, _ = time_limit_runs["limited"]
    rec = wait_time_limit_pair(launcher, time_limit_runs["ref"], time_limit_runs["limited"])
    attempts = record.load(run_dir)["attempts"]
    signalled = [a for a in attempts if a["outcome"] == "stopped" and a["decision"] == "requeue"]
    assert signalled, attempts
    assert "warning signal" in signalled[0]["reason"]
    assert int(rec["Restarts"]) == len(signalled)
    assert attempts[-1]["outcome"] == "finished"
    assert_same_weights(
        rundir.step_dir(ref_dir, TL_STEPS), rundir.step_dir(run_dir, TL_STEPS), tmp_path
    )
