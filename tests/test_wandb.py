"""W&B: offline by default, and a resumed run continues the same W&B run (real wandb, offline)."""

from __future__ import annotations

import signal
import time

import yaml

from bionemo import rundir
from bionemo.config import REQUEUE_EXIT_CODE
from tests.test_resume import data_dir, launch, make_run, train_losses, wait_all  # noqa: F401


def test_resumed_run_continues_the_same_wandb_run(tmp_path, data_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = make_run(tmp_path / "wb", data_dir, max_steps=12)
    cfg = yaml.safe_load((run / rundir.CONFIG).read_text())
    cfg["trainer"]["logging"] = {"wandb_project": "bionemo-test"}  # offline unless configured
    (run / rundir.CONFIG).write_text(yaml.safe_dump(cfg))

    (proc,) = launch(run, world=1, BIONEMO_STEP_SLEEP="0.3")
    while max(train_losses(run) if (run / rundir.METRICS).exists() else {0: 0}) < 3:
        assert proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=120) == REQUEUE_EXIT_CODE
    assert wait_all(launch(run, world=1)) == [0]

    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # one folder per process...
    assert len({name.rsplit("-", 1)[1] for name in runs}) == 1  # ...of one W&B run id
