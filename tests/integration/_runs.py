"""Shared helpers for the backend tests on the bundled cluster (test_submitit.py, test_nemo_run.py).

Jobs are the native tests' shape: ESM-2 8M shrunk to two layers at sequence length 128 on
2 nodes x 1 rank (gloo), a fraction of a second per step; BIONEMO_STEP_SLEEP stretches a run that
must still be going when its time limit comes.

CI has two cores and a budget for the whole suite, so the slow runs are shared and overlap: the
first backend test that asks (`slow_runs`) submits, at once, ONE uninterrupted reference run
(through the native backend: the resumed runs of the other backends must end bit-identical to it)
and one time-limited run per backend. Each test module then only waits for its own. A thread
makes requeued jobs eligible at once (SLURM would hold each ~120 s), and the jobs still alive at
the end of the session are cancelled.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bionemo import rundir
from launchers import record

REPO = Path(__file__).resolve().parents[2]
FINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
SMALL = [
    "trainer.model.num_layers=2",
    "trainer.model.seq_length=128",
    "trainer.train.micro_batch_size=4",
    "trainer.train.log_every=5",
    "trainer.train.val_every=1000",
    "trainer.train.limit_val_batches=0",
    "trainer.optim.warmup_steps=5",
    "trainer.checkpoint.keep_last=2",
]

# The time-limited runs: a 2-minute limit with the warning 30 s before it; slurmctld's ~30 s tick
# sends it 60-90 s into the job, while the slowed-down run (~2.7 s a step) is still going.
TL_STEPS = 40
TL_COMMON = [f"max_steps={TL_STEPS}", "trainer.checkpoint.every_steps=10"]
TL_LIMITED = [
    "job.time_limit=00:02:00",
    "cluster.signal_lead_s=30",
    "cluster.env.BIONEMO_STEP_SLEEP=2.5",
]
SLOW_BACKENDS = ("submitit", "nemo_run")
# Geneformer through the same path (issue 6): 2 layers at 128 tokens over a 2,005-token vocabulary
# (the sample builder's --genes 2000 plus 5 special tokens); dropout stays on, so the per-rank RNG
# states must come back exactly too.
GENEFORMER = [
    "trainer.model.num_layers=2",
    "trainer.model.seq_length=128",
    "trainer.model.vocab_size=2005",
    "trainer.train.micro_batch_size=4",
    "trainer.train.log_every=5",
    "trainer.train.val_every=1000",
    "trainer.train.limit_val_batches=0",
    "trainer.optim.warmup_steps=5",
    "trainer.checkpoint.keep_last=2",
]


class Releaser(threading.Thread):
    """Releases requeued jobs (pending again, Restarts > 0) as soon as SLURM lets them run."""

    def __init__(self, slurm):
        super().__init__(daemon=True, name="release-requeued")
        self.slurm, self.jobs, self.done = slurm, set(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            for job_id in list(self.jobs):
                rec = self.slurm.job(job_id)
                if rec.get("JobState") == "PENDING" and int(rec.get("Restarts") or 0) > 0:
                    try:
                        self.slurm.release(job_id)
                    except AssertionError:
                        pass  # raced with the scheduler; next round


class Runs:
    """Submits through `python -m launchers` (a fresh process, as `make submit` does)."""

    def __init__(self, slurm, data_dir: Path, cells_dir: Path, runs_root: Path):
        self.slurm, self.runs_root = slurm, runs_root
        self.data = {
            "esm2_8m": [
                *SMALL,
                f"trainer.data.train_clusters={data_dir}/train_clusters.parquet",
                f"trainer.data.valid_clusters={data_dir}/valid_clusters.parquet",
                f"trainer.data.database={data_dir}/proteins.sqlite",
            ],
            "geneformer_10m": [
                *GENEFORMER,
                f"trainer.data.train={cells_dir}/train",
                f"trainer.data.valid={cells_dir}/valid",
                f"trainer.data.vocab={cells_dir}/vocab.json",
                f"trainer.data.gene_medians={cells_dir}/gene_medians.json",
            ],
        }
        self.releaser = Releaser(slurm)
        self.releaser.start()
        self.slow: dict | None = None

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launchers", *args],
            cwd=REPO,
            env=self.slurm.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(
        self,
        backend: str,
        run: str,
        *overrides: str,
        experiment: str = "backends",
        model: str = "esm2_8m",
    ) -> tuple[Path, str]:
        out = self.cli(
            "submit",
            "--backend",
            backend,
            "--model",
            model,
            "--cluster",
            "local",
            "--nodes",
            "2",
            f"cluster.runs_root={self.runs_root}",
            f"job.experiment={experiment}",
            f"job.run={run}",
            *self.data[model],
            *overrides,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        run_dir = self.runs_root / experiment / run
        job_id = record.job_ids(record.load(run_dir))[-1]
        self.releaser.jobs.add(job_id)
        return run_dir, job_id

    def wait_final(self, job_id: str, timeout: float) -> dict:
        return self.slurm.wait_job(job_id, FINAL, timeout=timeout, poll=1.0)

    def close(self) -> None:
        self.releaser.done.set()
        for job_id in self.releaser.jobs:
            if self.slurm.job(job_id).get("JobState") not in FINAL:
                self.slurm.cancel(job_id)


_SHARED: dict[str, Runs] = {}


def shared(slurm, tmp_path_factory, request) -> Runs:
    """One Runs per test session (a module global: both test modules get the same object)."""
    if "runs" not in _SHARED:
        data = tmp_path_factory.mktemp("backends-data")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bionemo.data.sample",
                "--out",
                str(data),
                "--clusters",
                "300",
                "--seed",
                "3",
            ],
            check=True,
            capture_output=True,
        )
        cells = tmp_path_factory.mktemp("backends-cells")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bionemo.data.cells_sample",
                "--out",
                str(cells),
                "--cells",
                "200",
                "--valid-cells",
                "20",
                "--genes",
                "2000",
                "--genes-per-cell",
                "300",
            ],
            check=True,
            capture_output=True,
        )
        runs = Runs(slurm, data, cells, tmp_path_factory.mktemp("backends-runs"))
        request.config.add_cleanup(runs.close)
        _SHARED["runs"] = runs
    return _SHARED["runs"]


def slow_runs(runs: Runs) -> dict:
    """The reference and the time-limited runs, submitted together by the first caller."""
    if runs.slow is None:
        slow = {"ref": runs.submit("sbatch", "reference", *TL_COMMON)}
        for backend in SLOW_BACKENDS:
            slow[backend] = runs.submit(backend, f"time-limit-{backend}", *TL_COMMON, *TL_LIMITED)
        gf = dict(model="geneformer_10m", experiment="geneformer")
        slow["geneformer-ref"] = runs.submit("sbatch", "reference", *TL_COMMON, **gf)
        slow["geneformer"] = runs.submit("sbatch", "time-limit", *TL_COMMON, *TL_LIMITED, **gf)
        runs.slow = slow
    return runs.slow


# ------------------------------------------------------------------------------------ checks


def logs(run_dir: Path, tail: int | None = 3000) -> str:
    """Every log of the run (its logs/ and submitit's folder): the last `tail` characters of each
    for an assertion's message; tail=None, whole, to search in (a line near the start of a long
    log, such as an attempt's "resumed from", falls outside the tail)."""
    files = sorted((run_dir / rundir.LOGS).glob("*")) + sorted((run_dir / "submitit").glob("*.out"))
    start = -tail if tail else 0
    return "\n".join(f"==> {p.name}\n{p.read_text(errors='replace')[start:]}" for p in files)


def wait_for(predicate, timeout: float, what: str, run_dir: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}\n" + (logs(run_dir) if run_dir else "")
    )


def hostnames(slurm, nodelist: str) -> list[str]:
    return slurm.run(["scontrol", "show", "hostnames", nodelist], check=True).stdout.split()


def weights(step_dir: Path, out_dir: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = out_dir / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)


def assert_same_weights(a_step: Path, b_step: Path, out_dir: Path) -> None:
    import torch

    a, b = weights(a_step, out_dir), weights(b_step, out_dir)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def assert_finished(run_dir: Path, max_steps: int) -> None:
    assert rundir.is_finished(run_dir), logs(run_dir)
    assert rundir.latest_complete_step(run_dir) == max_steps


def wait_time_limit_pair(waiter, ref: tuple[Path, str], limited: tuple[Path, str]) -> dict:
    """The uninterrupted reference and the time-limited run, each (run_dir, job_id), both end
    COMPLETED with all TL_STEPS steps done; returns the time-limited job's final record.
    `waiter`: anything with `wait_final(job_id, timeout)`."""
    for (run_dir, job_id), timeout in ((ref, 300), (limited, 600)):
        rec = waiter.wait_final(job_id, timeout=timeout)
        assert rec["JobState"] == "COMPLETED", logs(run_dir)
    assert_finished(ref[0], TL_STEPS)
    assert_finished(limited[0], TL_STEPS)
    return rec


def check_time_limit_run(
    runs: Runs, backend: str, tmp_path: Path, key: str | None = None, ref: str = "ref"
) -> tuple[Path, dict]:
    """The acceptance of one backend: the 2-node run hit its time limit, got the warning,
    saved, was requeued, resumed and finished, with weights identical to the reference.
    `key`/`ref` pick another pair of the shared slow runs (default: the backend's, ESM-2's)."""
    slow = slow_runs(runs)
    ref_dir, _ = slow[ref]
    run_dir, _ = slow[key or backend]
    rec = wait_time_limit_pair(runs, slow[ref], slow[key or backend])
    # a 2-node run: both ranks saved (their RNG states), on two nodes
    assert len(set(hostnames(runs.slurm, rec["NodeList"]))) == 2
    step = rundir.step_dir(run_dir, TL_STEPS)
    assert (step / "rng-rank00000.pt").is_file() and (step / "rng-rank00001.pt").is_file()
    # warning -> save -> requeue (recorded by the project's policy) -> resume -> finish
    data = record.load(run_dir)
    assert data["backend"] == backend
    attempts = data["attempts"]
    signalled = [a for a in attempts if a["outcome"] == "stopped" and a["decision"] == "requeue"]
    assert signalled, attempts
    assert "warning signal" in signalled[0]["reason"]
    assert int(rec["Restarts"]) == len(signalled)
    assert attempts[-1]["outcome"] == "finished" and attempts[-1]["decision"] == "stop"
    resumed = re.findall(r"resumed from \S+step-0*(\d+) \(step (\d+)", logs(run_dir, tail=None))
    assert resumed and int(resumed[0][1]) == signalled[0]["latest_step"], logs(run_dir)
    assert_same_weights(rundir.step_dir(ref_dir, TL_STEPS), step, tmp_path)
    return run_dir, rec


def check_status_logs_cancel(runs: Runs, backend: str) -> Path:
    """A second, long job: `status` while it runs, `logs` with the trainer's output, `cancel`."""
    slow_runs(runs)  # the slow runs are under way while this one is checked
    run_dir, job_id = runs.submit(
        backend,
        f"cancel-{backend}",
        "max_steps=400",
        "trainer.checkpoint.every_steps=5",
        "cluster.env.BIONEMO_STEP_SLEEP=0.5",
    )
    runs.slurm.wait_job(job_id, {"RUNNING"}, timeout=120)
    wait_for(lambda: rundir.latest_complete_step(run_dir), 120, "a first checkpoint", run_dir)

    out = runs.cli("status", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert f"backend   {backend}" in out.stdout, out.stdout
    assert f"job {job_id}: RUNNING" in out.stdout, out.stdout
    out = runs.cli("logs", str(run_dir), "-n", "200")
    assert out.returncode == 0, out.stderr
    assert "[train] step 5" in out.stdout, out.stdout

    out = runs.cli("cancel", str(run_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"cancelled job(s) {job_id}" in out.stdout, out.stdout
    rec = runs.wait_final(job_id, timeout=60)
    assert rec["JobState"] == "CANCELLED", rec
    events = record.load(run_dir)["events"]
    assert events[-1]["event"] == "cancel"
    # through the backend's own handle (not a bare scancel)
    assert events[-2]["event"] == "cancel-via" and "scancel" not in events[-2]["detail"], events
    out = runs.cli("status", str(run_dir))
    assert out.returncode == 0 and f"job {job_id}: CANCELLED" in out.stdout, out.stdout
    assert not rundir.is_finished(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory, request) -> Runs:
    return shared(slurm_cluster, tmp_path_factory, request)
