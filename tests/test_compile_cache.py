"""The compile cache kept with the run (bionemo/train.py): a run with train.compile writes
inductor's caches into <run_dir>/compile_cache, and a restart of that run loads its compiled
graphs from there instead of compiling again. Real processes on CPU; the cold compile of the tiny
model's block and head (forward and backward) dominates the test's time. Also the compile
setting the trainer adds on CUDA (tuned generated kernels)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import yaml

from bionemo import rundir
from bionemo.train import COMPILE_CACHE, use_compile_cache
from tests.test_resume import data_dir, launch, make_run, wait_all  # noqa: F401 -- fixture

COUNTS = re.compile(
    r"compile cache (\S+): fx graph hits (\d+) misses (\d+), "
    r"aot autograd hits (\d+) misses (\d+)"
)


def set_trainer(run, **sections) -> None:
    cfg = yaml.safe_load((run / rundir.CONFIG).read_text())
    for section, values in sections.items():
        cfg["trainer"].setdefault(section, {}).update(values)
    (run / rundir.CONFIG).write_text(yaml.safe_dump(cfg))


def cache_counts(log: str) -> tuple[str, int, int, int, int]:
    found = COUNTS.findall(log)
    assert len(found) == 1, log[-3000:]
    folder, *counts = found[0]
    return folder, *map(int, counts)


def test_restart_loads_compiled_graphs_from_the_run(tmp_path, data_dir, monkeypatch):  # noqa: F811
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    run = make_run(tmp_path / "run", data_dir, compile=True, max_steps=1, log_every=1)
    # one shape (no recompile for a new length) and nothing after the last save but the marker
    set_trainer(run, data={"pad_to": "max_length"}, checkpoint={"export_final": False})
    # Each process gets its own empty default cache (inductor's is under the temp folder), so
    # only the run's folder can give the restart its hits.
    first_tmp, second_tmp = tmp_path / "tmp1", tmp_path / "tmp2"
    first_tmp.mkdir()
    second_tmp.mkdir()
    assert wait_all(launch(run, world=1, TMPDIR=str(first_tmp)), timeout=600) == [0]
    folder, fx_hits, fx_misses, aot_hits, aot_misses = cache_counts((run / "rank0.log").read_text())
    assert folder == str((run / COMPILE_CACHE).resolve())
    assert fx_misses > 0 and aot_misses > 0 and fx_hits == aot_hits == 0  # compiled here
    assert (run / COMPILE_CACHE / "fxgraph").is_dir() and (
        run / COMPILE_CACHE / "aotautograd"
    ).is_dir()

    # The restart: one more step resumes from the step-1 checkpoint in a new process.
    (run / rundir.FINISHED).unlink()
    set_trainer(run, train={"max_steps": 2})
    (run / "rank0.log").rename(run / "first.log")
    assert wait_all(launch(run, world=1, TMPDIR=str(second_tmp)), timeout=600) == [0]
    log = (run / "rank0.log").read_text()
    assert "resumed from" in log
    _, fx_hits, fx_misses, aot_hits, aot_misses = cache_counts(log)
    assert fx_hits > 0 and aot_hits > 0 and fx_misses == aot_misses == 0  # nothing compiled again


def test_a_folder_the_user_chose_is_kept(tmp_path):
    environ = {"TORCHINDUCTOR_CACHE_DIR": "/scratch/mine"}
    use_compile_cache(tmp_path / "run", environ)
    assert environ == {"TORCHINDUCTOR_CACHE_DIR": "/scratch/mine"}
    environ = {}
    use_compile_cache(tmp_path / "run", environ)
    assert environ == {"TORCHINDUCTOR_CACHE_DIR": str((tmp_path / "run" / COMPILE_CACHE).resolve())}


def test_generated_kernels_are_tuned_unless_the_environment_says_otherwise():
    """The trainer turns on inductor's max_autotune_pointwise for compiled CUDA runs
    (tune_generated_kernels; +3.2% for the 3B with FP8 on an H200), and inductor's own variable
    wins when set. Each case in a fresh process: the setting is process-wide."""
    code = (
        "import torch._inductor.config as c\n"
        "from bionemo.distributed.parallel import tune_generated_kernels\n"
        "before = c.max_autotune_pointwise; tune_generated_kernels()\n"
        "print(before, c.max_autotune_pointwise)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE"}

    def run(**extra) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    assert run() == "False True"
    assert run(TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE="0") == "False False"
    assert run(TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE="1") == "True True"
