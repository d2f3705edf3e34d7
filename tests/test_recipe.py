"""Recipes (launchers/recipe.py): `launchers recipe` writes every key of the resolved config with
the layer that set it; `submit --config RECIPE` runs it with the user's edit and needs nothing
else; a bad edit is refused naming the file and the key before anything is written. The round
trip runs the real trainer (local backend, ESM-2 8M shrunk, 2 steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bionemo import rundir
from launchers import cli, config, recipe

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "trainer.model.num_layers=2",
    "trainer.model.seq_length=128",
    "trainer.train.micro_batch_size=4",
    "trainer.train.device=cpu",
    "trainer.train.limit_val_batches=0",
    "trainer.checkpoint.export_final=false",
    "cluster.env.OMP_NUM_THREADS=1",
]


def make_recipe(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "my.yaml"
    assert (
        cli.main(
            [
                "recipe",
                "--model",
                "esm2_8m",
                f"cluster.runs_root={tmp_path}/runs",
                *args,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def read(path: Path) -> dict[str, tuple[str, str]]:
    """dotted key -> (value text, comment) of every leaf line of a recipe."""
    out, stack = {}, []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        name, _, rest = line.strip().partition(":")
        del stack[depth:]
        if not rest.strip():
            stack.append(name)
            continue
        value, _, comment = rest.partition(" # ")
        out[".".join([*stack, name])] = (value.strip(), comment.strip())
    return out


def edit(path: Path, key: str, new_line: str) -> None:
    """Replace the line of `key` (its last name, first match at its depth) with new_line."""
    name, depth = key.split(".")[-1], key.count(".")
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("  " * depth + name + ":"))
    lines[i] = "  " * depth + new_line
    path.write_text("\n".join(lines) + "\n")


def test_every_key_appears_with_the_layer_that_set_it(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("trainer:\n  train:\n    log_every: 3\n")
    path = make_recipe(tmp_path, "--nodes", "2", "--config", str(user), "max_steps=7")
    resolved = config.resolve(
        model="esm2_8m",
        nodes=2,
        config_files=[user],
        overrides=["max_steps=7", f"cluster.runs_root={tmp_path}/runs"],
    )
    lines = read(path)
    every = {
        ".".join(k)
        for k in config._leaves(resolved.config.model_dump(mode="json", exclude={"sweep"}))
    }
    assert set(lines) == every
    assert all(comment for _, comment in lines.values())
    assert config.load_yaml_file(path) == recipe.data(resolved)  # reads back as written

    comments = {k: c for k, (_, c) in lines.items()}
    assert comments["trainer.model.num_layers"] == "model preset configs/models/esm2_8m.yaml"
    assert comments["trainer.train.micro_batch_size"] == (
        "benchmark table configs/benchmarks/cpu.yaml (row esm2_8m)"
    )
    assert comments["cluster.gpu_type"] == "cluster profile configs/clusters/local.yaml"
    assert comments["trainer.train.log_every"] == f"--config {user}"
    assert comments["trainer.train.max_steps"] == "command line"
    assert comments["job.nodes"] == "command line (--nodes)"
    assert comments["trainer.logging.wandb_offline"] == "default"
    # derived at submit, not frozen: a new run per submit, paths relative to the checkout
    assert lines["job.run"][0] == "null" and "at submit: a new name" in comments["job.run"]
    assert lines["cluster.workdir"] == ("null", f"default; at submit: {REPO}")
    assert lines["cluster.python"][0] == ".venv/bin/python"


def test_edit_then_submit_runs_the_edit_and_each_submit_is_a_new_run(tmp_path):
    path = make_recipe(tmp_path, "--backend", "local", "--nodes", "1", "max_steps=5", *SMALL)
    edit(path, "trainer.train.max_steps", "max_steps: 2   # edited")

    for _ in range(2):  # one recipe, two submits: two runs
        done = subprocess.run(
            [sys.executable, "-m", "launchers", "submit", "--config", str(path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    runs = [
        config.load_resolved(d / rundir.CONFIG)
        for d in sorted((tmp_path / "runs" / "esm2").iterdir())
    ]
    assert len(runs) == 2
    assert runs[0]["job"]["run"] != runs[1]["job"]["run"]
    for saved in runs:
        assert saved["trainer"]["train"]["max_steps"] == 2
        assert saved["trainer"]["model"]["num_layers"] == 2
        run_dir = Path(saved["cluster"]["runs_root"]) / "esm2" / saved["job"]["run"]
        assert rundir.is_finished(run_dir)
        steps = [
            json.loads(line)["step"]
            for line in (run_dir / rundir.METRICS).read_text().splitlines()
            if json.loads(line)["kind"] == "train"
        ]
        assert max(steps) == 2
        header = (run_dir / rundir.CONFIG).read_text().splitlines()[1]
        assert header.endswith(f"< {path} < command line"), header  # the recipe is a layer


@pytest.mark.parametrize(
    "key, bad, problem",
    [
        (
            "trainer.train.max_steps",
            "max_stepz: 2",
            "trainer.train.max_stepz: unknown key (did you mean 'max_steps'?)",
        ),
        (
            "trainer.train.max_steps",
            "max_steps: many",
            "trainer.train.max_steps: input should be a valid integer",
        ),
        (
            "trainer.train.max_steps",
            "max_steps: 2\n    max_steps: 3",
            "trainer.train.max_steps: given twice",
        ),
    ],
)
def test_a_bad_edit_is_refused_naming_the_file_and_key_before_anything(
    tmp_path, capsys, key, bad, problem
):
    path = make_recipe(tmp_path)  # the bundled cluster, sbatch: nothing may reach it
    edit(path, key, bad)
    capsys.readouterr()
    assert cli.main(["submit", "--config", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {path}: {problem}"), line
    assert not (tmp_path / "runs").exists()  # no run directory, so nothing was submitted


def test_recipe_refuses_to_overwrite_and_prints_without_out(tmp_path, capsys):
    path = make_recipe(tmp_path)
    before = path.read_text()
    assert cli.main(["recipe", "--model", "esm2_8m", "--out", str(path)]) == 2
    assert "--out: " in capsys.readouterr().err and path.read_text() == before
    assert cli.main(["recipe", "--model", "esm2_8m", f"cluster.runs_root={tmp_path}/runs"]) == 0

    def without_run_name(text):  # its comment shows a name derived from the clock
        return [line for line in text.splitlines() if not line.startswith("  run: ")]

    assert without_run_name(capsys.readouterr().out) == without_run_name(before)


def test_make_submit_with_a_recipe_passes_no_default_model(tmp_path):
    """The Makefile's MODEL/CLUSTER defaults would override the recipe's job.model/job.cluster."""

    def command(*words):
        out = subprocess.run(
            ["make", "-n", "submit", *words], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        return next(line for line in out.splitlines() if "-m launchers submit" in line).split()

    assert "--model" not in command("CONFIG=my.yaml") and "--cluster" not in command(
        "CONFIG=my.yaml"
    )
    assert command("CONFIG=my.yaml", "MODEL=esm2_650m")[4:6] == ["--model", "esm2_650m"]
    assert command()[4:8] == ["--model", "esm2_8m", "--cluster", "local"]
