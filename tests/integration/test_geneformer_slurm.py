"""Geneformer through the same launcher (issue 6): a 2-node Geneformer 10M run (shrunk to two
layers at 128 tokens, dropout on) on the bundled cluster hits its time limit, saves on the warning
signal, is requeued, resumes and finishes with weights identical to an uninterrupted run.

Both runs are among the shared slow runs (tests/integration/_runs.py), so they overlap with the
backends' time-limit runs instead of adding their own minutes.
"""

from __future__ import annotations

import yaml

from bionemo import rundir
from tests.integration._runs import check_time_limit_run, runs  # noqa: F401 -- `runs` is a fixture


def test_geneformer_time_limit_requeues_and_resumes_exactly(runs, tmp_path):  # noqa: F811
    run_dir, _ = check_time_limit_run(
        runs, "sbatch", tmp_path, key="geneformer", ref="geneformer-ref"
    )
    trainer = yaml.safe_load((run_dir / rundir.CONFIG).read_text())["trainer"]
    assert trainer["model"]["family"] == "geneformer"
    assert trainer["model"]["hidden_dropout"] > 0  # the RNG states had to be restored exactly
