"""A user's own model through the launcher (trainer.model.plugin; bionemo/models/__init__.py):
the example plugin (examples/tiny_plugin, a 2-layer GRU masked LM, not on sys.path: it reaches
the trainer through cluster.env.PYTHONPATH as a user's package would) trains with `launchers
debug`, stops on the warning signal, resumes bit-exactly, and exports; a plugin that does not
import is refused before anything is written. Real processes, CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bionemo import rundir
from bionemo.config import ModelConfig
from launchers import config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny_plugin"
PRESET = EXAMPLE / "tiny_gru.yaml"
MAX_STEPS = 24


def debug(runs: Path, run: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launchers",
        "debug",
        "--model",
        str(PRESET),
        f"cluster.runs_root={runs}",
        f"job.run={run}",
        f"cluster.env.PYTHONPATH={EXAMPLE}",
        "cluster.env.OMP_NUM_THREADS=1",
        "trainer.train.device=cpu",
        "trainer.train.precision=fp32",
        f"max_steps={MAX_STEPS}",
        "trainer.train.log_every=1",
        "trainer.train.limit_val_batches=0",
        "trainer.checkpoint.every_steps=10",
        *extra,
    ]


def weights(run_dir: Path, tmp: Path) -> dict:
    out = tmp / f"{run_dir.name}.pt"
    dcp_to_torch_save(rundir.step_dir(run_dir, MAX_STEPS), out)
    return torch.load(out, weights_only=False)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _last_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (OSError, ValueError):  # not there yet, or a line half written
        return 0


def test_plugin_trains_stops_and_resumes_bitwise(tmp_path):
    runs = tmp_path / "runs"
    ref, run = runs / "debug" / "ref", runs / "debug" / "stopped"
    # The uninterrupted reference and the run to stop, side by side (two cores).
    ref_log, run_log = tmp_path / "ref.out", tmp_path / "stopped.out"
    with open(ref_log, "w") as a, open(run_log, "w") as b:
        uninterrupted = subprocess.Popen(
            debug(runs, "ref"), cwd=REPO, stdout=a, stderr=subprocess.STDOUT
        )
        # Stopped by the scheduler's warning signal part-way, then resumed by the launcher.
        launcher = subprocess.Popen(
            debug(runs, "stopped", "cluster.env.BIONEMO_STEP_SLEEP=0.2"),
            cwd=REPO,
            stdout=b,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while _last_step(run) < 5:
            assert launcher.poll() is None and time.monotonic() < deadline, run_log.read_text()
            time.sleep(0.1)
        launcher.send_signal(signal.SIGUSR2)  # the launcher forwards it to the trainer
        launcher.wait(timeout=120)
        uninterrupted.wait(timeout=300)
    finally:
        for proc in (uninterrupted, launcher):
            if proc.poll() is None:
                proc.kill()
    assert uninterrupted.returncode == 0, ref_log.read_text()
    out = run_log.read_text()
    assert launcher.returncode == rundir.REQUEUE_EXIT_CODE, out
    saved = rundir.latest_complete_step(run)
    assert saved is not None and 5 <= saved < MAX_STEPS and not rundir.is_finished(run), out

    done = subprocess.run(
        [sys.executable, "-m", "launchers", "resume", str(run), "cluster.env.BIONEMO_STEP_SLEEP=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and rundir.is_finished(run), done.stdout + done.stderr
    assert f"resumed from {rundir.step_dir(run, saved)}" in done.stdout + done.stderr

    assert losses(run) == losses(ref)
    final, expected = weights(run, tmp_path), weights(ref, tmp_path)
    assert "gru.weight_hh_l1_reverse" in final["model"]  # the plugin's GRU, not ESM-2
    for part in ("model", "optim"):
        flat = dict(_leaves(final[part])), dict(_leaves(expected[part]))
        assert flat[0].keys() == flat[1].keys()
        for key, tensor in flat[0].items():
            assert (
                torch.equal(tensor, flat[1][key])
                if isinstance(tensor, torch.Tensor)
                else tensor == flat[1][key]
            ), f"{part}/{key} differs"


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


@pytest.mark.parametrize(
    "plugin, why",
    [
        ("no_such_pkg.model:build", "no module named 'no_such_pkg'"),
        ("tiny_plugin.nope:build", "no module named 'tiny_plugin.nope'"),
    ],
)
def test_plugin_that_does_not_import_is_refused_before_anything_is_written(tmp_path, plugin, why):
    runs = tmp_path / "runs"
    done = subprocess.run(
        debug(runs, "bad", f"trainer.model.plugin={plugin}"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: command line: trainer.model.plugin: ") and why in line, line
    assert "cluster.env.PYTHONPATH" in line
    assert not runs.exists()


def test_plugin_path_syntax_and_engine_are_checked_by_the_schema():
    with pytest.raises(
        config.ConfigError, match="trainer.model.plugin: 'my_pkg/model.py' is not module:factory"
    ):
        config.resolve(model="esm2_8m", overrides=["trainer.model.plugin=my_pkg/model.py"])
    with pytest.raises(config.ConfigError, match="megatron builds its own ESM-2"):
        config.resolve(
            model="esm2_8m",
            overrides=["trainer.model.plugin=my_pkg.model:build", "trainer.train.engine=megatron"],
        )


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))


def _cfg(**kw) -> ModelConfig:
    raw = config.load_yaml_file(PRESET)["trainer"]["model"]
    return ModelConfig.model_validate({**raw, **kw})


def test_missing_factory_or_wrong_object_is_an_error_naming_the_key(
    example_on_path, tmp_path, monkeypatch
):
    from bionemo.models import PluginError, build_model

    with pytest.raises(
        PluginError,
        match=r"^trainer.model.plugin: 'tiny_plugin.model:nope': "
        r"tiny_plugin.model has no function 'nope'",
    ):
        build_model(_cfg(plugin="tiny_plugin.model:nope"))
    (tmp_path / "half_plugin.py").write_text(
        "import torch\n"
        "def no_module(cfg):\n    return object()\n"
        "def no_loss(cfg):\n    return torch.nn.Linear(2, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for factory, got in (("no_module", "object"), ("no_loss", "Linear")):
        with pytest.raises(PluginError, match=f"returned {got}, not a torch.nn.Module with a loss"):
            build_model(_cfg(plugin=f"half_plugin:{factory}"))


def test_export_writes_what_the_plugin_reads_back(example_on_path, tmp_path):
    from bionemo.models import build_model, export_model
    from tiny_plugin.model import load

    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    out = export_model(model, cfg, tmp_path / "final_model")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not (tmp_path / "final_model.partial").exists()
    ids = torch.randint(4, 24, (2, 16))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(load(out)(ids, mask), model(ids, mask))
