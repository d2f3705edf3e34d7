"""benchmarks/restart_cost.py's own logic, without a GPU: how it reads a run's saves (a blocking
time that includes waiting for an earlier background write) and how it keeps to its budget (a
phase past the deadline is killed, the ones that no longer fit are skipped, and summary.json and
logs.tar.gz are written all the same)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.restart_cost import analyse
from bionemo import rundir

REPO = Path(__file__).resolve().parents[1]


def _write(run: Path, records: list[dict], committed: dict[int, float]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    for step, at in committed.items():
        marker = rundir.step_dir(run, step) / rundir.COMPLETE
        marker.parent.mkdir(parents=True)
        marker.write_text(f"{step}\n")
        os.utime(marker, (at, at))


def _train(step: int, t: float) -> dict:
    return {"kind": "train", "step": step, "time": t, "loss": 2.0}


def _ckpt(step: int, t: float, blocked: float, asynchronous: bool) -> dict:
    return {
        "kind": "checkpoint",
        "step": step,
        "time": t,
        "save_blocking_s": blocked,
        "async": asynchronous,
    }


def test_a_save_that_waited_for_the_previous_write_says_so(tmp_path):
    run = tmp_path / "run"
    recs = [_train(1, 100.0), _train(2, 101.0), _ckpt(2, 106.0, 5.0, True)]
    recs += [_train(3, 107.0), _train(4, 112.0), _train(5, 113.0)]  # committed during step 4
    recs += [_train(6, 114.0), _ckpt(6, 114.5, 0.5, True), _train(7, 115.5)]
    recs += [_ckpt(7, 125.5, 10.0, False)]  # waited for step 6's write until 120.0
    _write(run, recs, {2: 110.0, 6: 120.0, 7: 125.4})
    out = analyse(run, run / rundir.METRICS)
    saves = {s["step"]: s for s in out["saves"]}
    assert "includes_wait_for_step" not in saves[2] and saves[2]["save_to_commit_s"] == 9.0
    assert "includes_wait_for_step" not in saves[6]  # step 2 was committed before it began
    assert saves[7]["includes_wait_for_step"] == 6 and saves[7]["blocking_after_wait_s"] == 5.5
    during = {s["step"]: s["during"] for s in out["steps"]}
    assert during == {1: "first", 2: "-", 3: "writing", 4: "commit", 5: "-", 6: "-", 7: "writing"}
    assert out["step_s_median"] == {"no_write": 1.0, "while_writing": 1.0}
    assert out["commit_step_s"] == [{"step": 4, "step_s": 5.0}]


def test_budget_kills_the_phase_past_the_deadline_and_skips_the_rest(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    # --sleep 5: the 12 steps take a minute, the deadline comes at 20 s (budget - 5 s reserve)
    cmd = [sys.executable, str(REPO / "benchmarks" / "restart_cost.py"), "--out", str(out)]
    cmd += ["--runs", str(runs), "--device", "cpu", "--model", "esm2_8m", "--num-layers", "1"]
    cmd += ["--seq-length", "64", "--mbs", "2", "--every", "5", "--steps", "12", "--sleep", "5"]
    cmd += ["--blocking-model", "esm2_8m", "--budget", "25", "--estimate-scale", "0.01"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    phases = summary["phases"]
    assert phases["async"] == "timed out" and summary["starts"]["async"]["timed_out"]
    assert (
        phases["restart_warm"]
        == phases["restart_cold"]
        == ("skipped: no checkpoint of the async run")
    )
    assert phases["esm2_8m_sync"].startswith("skipped: budget")
    assert phases["esm2_8m_async"].startswith("skipped: budget")
    assert summary["total_s"] < 25
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "async/first.log" in names and "async/config.yaml" in names
    assert not [n for n in names if "checkpoints" in n or "compile_cache" in n]
