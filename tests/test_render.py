"""The rendered batch script: golden files, review points, quoting, strictness.

Golden files live in tests/golden/. When a change to the template or the profiles is intended,
review the diff this test prints, then regenerate them with one command:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_render.py
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import stat
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import pytest

from launchers import config, slurm, spec
from launchers.backends import sbatch

REPO = config.REPO_ROOT
GOLDEN = REPO / "tests" / "golden"
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
REGENERATE = "UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_render.py"


def render(model="esm2_8m", cluster="local", nodes=None, overrides=()) -> str:
    resolved = config.resolve(
        model=model, cluster=cluster, nodes=nodes, overrides=list(overrides), now=NOW
    )
    return sbatch.render(spec.build(resolved, strict=False))


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; create it with: {REGENERATE}"
    expected = path.read_text()
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), text.splitlines(True), f"golden/{name}", "rendered now"
            )
        )
        pytest.fail(
            f"the rendered script differs from tests/golden/{name}:\n{diff}\n"
            f"If the change is intended, regenerate: {REGENERATE}",
            pytrace=False,
        )


H100_ARGS = dict(model="esm2_650m", cluster="h100_example", nodes=8)


def test_golden_h100_example():
    check_golden("h100_example_esm2_650m_8n.sbatch", render(**H100_ARGS))


def test_golden_local():
    text = render().replace(str(REPO), "<REPO>")
    check_golden("local_esm2_8m_2n.sbatch", text)


# A sweep job (`python -m launchers sweep`): the flags as the CLI maps them (launchers/cli.py).
SWEEP_OPTIONS = [
    ("--min", "sweep.min", "2"),
    ("--max", "sweep.max", "64"),
    ("--recompute", "sweep.recompute", "none,full"),
    ("--memory-cap-gib", "trainer.train.memory_cap_gib", "1.5"),
    ("--write-table", "sweep.write_table", True),
]


def render_sweep(model="esm2_8m", cluster="local", overrides=(), options=SWEEP_OPTIONS) -> str:
    resolved = config.resolve(
        model=model,
        cluster=cluster,
        overrides=list(overrides),
        options=options,
        kind="sweep",
        now=NOW,
    )
    return sbatch.render(spec.build(resolved, strict=False))


def test_golden_local_sweep():
    check_golden("local_esm2_8m_sweep.sbatch", render_sweep().replace(str(REPO), "<REPO>"))


def test_sweep_script_runs_the_sweep_once_without_signal_or_requeue():
    text = render_sweep(
        model="esm2_650m",
        cluster="h100_example",
        overrides=["job.nodes=2"],
        options=[("--gpus-per-trial", "sweep.gpus_per_trial", "4")],
    )
    h = header(text)
    assert "--requeue" not in h and "--signal" not in h  # a sweep is run again, not resumed
    assert h["--nodes"] == "2" and h["--ntasks-per-node"] == h["--gpus-per-node"] == "8"
    assert "bionemo.train" not in text and "launchers.requeue" not in text
    joined = text.replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if "-m launchers.sweeping" in ln]
    words = shlex.split(line)
    assert words[:4] == ["python3", "-m", "launchers.sweeping", "--inside-allocation"]  # host side
    assert words[words.index("--python") + 1] == "python"  # trials: the container's interpreter
    assert words[words.index("--nodes") + 1] == "2"
    assert words[words.index("--gpus-per-trial") + 1] == "4"
    assert words[words.index("--out") + 1] == "/lustre/fsw/bionemo/bionemo-hpc/benchmarks/results"
    run_dir = "/lustre/fsw/bionemo/runs/sweep/esm2_650m-2n-20250101T000000Z"
    assert words[words.index("--base-config") + 1] == f"{run_dir}/config.yaml"
    assert words[words.index("--work-dir") + 1] == f"{run_dir}/trials"
    assert "--compile" in words  # the profile's trainer.train.compile
    srun = [w.partition("=")[2] for w in words if w.startswith("--srun-arg=")]
    assert "--container-image=/lustre/fsw/bionemo/images/bionemo-hpc.sqsh" in srun
    assert "--cpus-per-task=16" in srun and "--overlap" not in srun  # the batch shell is no step
    assert not [f for f in srun if f.startswith(("--nodes", "--ntasks"))]  # the sweep's own
    out = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def header(text: str) -> dict[str, str]:
    """#SBATCH options as sbatch reads them (see sbatch_words)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            for word in sbatch_words(line[len("#SBATCH ") :]):
                name, _, value = word.partition("=")
                out[name] = value
    return out


def sbatch_words(line: str) -> list[str]:
    """Split an #SBATCH line the way sbatch does: whitespace separates, single or double quotes
    group, a backslash escapes the next character, an unquoted # ends the line."""
    words, word, quote, escape, started = [], [], "", False, False
    for ch in line:
        if escape:
            word.append(ch)
            escape = False
        elif ch == "\\":
            escape, started = True, True
        elif quote:
            if ch == quote:
                quote = ""
            else:
                word.append(ch)
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "#":
            break
        elif ch.isspace():
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
    if started:
        words.append("".join(word))
    return words


def test_h100_review_points():
    text = render(**H100_ARGS)
    h = header(text)
    assert "--exclusive" in h  # whole nodes
    assert h["--ntasks-per-node"] == h["--gpus-per-node"] == "8"  # one rank per GPU
    assert h["--nodes"] == "8" and h["--cpus-per-task"] == "16" and h["--time"] == "04:00:00"
    assert (h["--partition"], h["--account"], h["--qos"]) == ("batch", "bionemo", "normal")
    assert "--requeue" in h and h["--signal"] == "USR2@300"  # no B: -> the ranks get it
    assert (
        h["--output"]
        == "/lustre/fsw/bionemo/runs/esm2/esm2_650m-8n-20250101T000000Z/logs/slurm-%j.out"
    )
    assert h["--open-mode"] == "append"
    for flag in (
        "--container-image=/lustre/fsw/bionemo/images/bionemo-hpc.sqsh",
        "--container-mounts=/lustre/fsw/bionemo:/lustre/fsw/bionemo",
        "--container-workdir=/lustre/fsw/bionemo/bionemo-hpc",
    ):
        assert f"    {flag} \\\n" in text
    assert 'srun --output="$RUN_DIR/logs/train-%j-r$RESTART.log"' in text
    assert 'python -m bionemo.train "$RUN_DIR" &' in text
    assert 'exec "$PY" -m launchers.requeue "$RUN_DIR" "${args[@]}"' in text
    assert 's.bind(("", 0))' in text and "export MASTER_PORT\n" in text  # free at job start
    assert "export NCCL_DEBUG=WARN" in text and "export PYTHONUNBUFFERED=1" in text


def test_local_profile_has_no_gpu_line_and_one_task_per_node():
    text = render()
    h = header(text)
    assert "--gpus-per-node" not in h and "--exclusive" not in h and "--partition" not in h
    assert h["--ntasks-per-node"] == "1" and h["--nodes"] == "2" and h["--cpus-per-task"] == "1"
    assert "export OMP_NUM_THREADS=1" in text
    assert "--container-image" not in text


def test_optional_lines():
    text = render(
        overrides=[
            "job.dependency=afterok:12:13",
            "job.constraint=h100&ib",
            "job.exclude=node[1-2]",
            "job.hold=true",
            "cluster.sbatch_args=[--mem=0]",
            "cluster.setup=[module load x]",
            "cluster.srun_args=[--mpi=pmix]",
        ]
    )
    h = header(text)
    assert (h["--dependency"], h["--constraint"], h["--exclude"]) == (
        "afterok:12:13",
        "h100&ib",
        "node[1-2]",
    )
    assert "--hold" in h and h["--mem"] == "0"
    assert "\nmodule load x\n" in text and "    --mpi=pmix \\\n" in text
    for absent in ("--dependency", "--constraint", "--exclude", "--hold", "--mem"):
        assert absent not in header(render())


def test_rendered_scripts_are_valid_bash():
    for args in (H100_ARGS, {}):
        out = subprocess.run(["bash", "-n"], input=render(**args), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_no_secret_is_rendered(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekrit-value")
    text = render(**H100_ARGS)
    assert "sekrit-value" not in text and "WANDB_API_KEY" not in text
    with pytest.raises(config.ConfigError, match="secret"):
        render(overrides=["cluster.env.HF_TOKEN=abc"])


# ------------------------------------------------------------------------------------ quoting

NASTY = "$(touch PWNED);`touch PWNED` 'q' \"dq\" & | < > * ? [x] ~ {a,b} !x #c $HOME"


def stub(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_shell_metacharacters_in_names_render_inert(tmp_path):
    """Render a run whose experiment and run names are made of shell metacharacters, then run
    the script under bash with stand-ins for srun and scontrol: nothing is executed, and the
    trainer receives the run directory intact."""
    runs = tmp_path / "runs"
    resolved = config.resolve(
        model="esm2_8m",
        cluster="local",
        now=NOW,
        overrides=[f"cluster.runs_root={runs}", f"job.experiment={NASTY}", f"job.run={NASTY} 2"],
    )
    job = spec.build(resolved, strict=False)
    text = sbatch.render(job)
    run_dir = job.run_dir
    assert run_dir == runs / NASTY / f"{NASTY} 2"
    (run_dir / "logs").mkdir(parents=True)

    h = header(text)
    assert h["--output"] == f"{run_dir}/logs/slurm-%j.out"  # as sbatch will parse it
    assert re.fullmatch(r"[A-Za-z0-9._-]+", h["--job-name"])

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_file = tmp_path / "srun-argv.json"
    stub(
        bin_dir / "srun",
        f"""#!{os.sys.executable}
import json, sys, pathlib
json.dump(sys.argv[1:], open({str(argv_file)!r}, "w"))
pathlib.Path(sys.argv[-1], "finished").write_text("1\\n")
""",
    )
    stub(
        bin_dir / "scontrol",
        """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show node") echo "NodeName=node1 Arch=x NodeAddr=127.0.0.1 NodeHostName=h" ;;
esac
""",
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node1",
        "HOME": str(tmp_path),
    }
    script = tmp_path / "train.sbatch"
    script.write_text(text)
    out = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()
    argv = json.loads(argv_file.read_text())
    assert argv[-3:] == ["-m", "bionemo.train", str(run_dir)]
    assert argv[0] == f"--output={run_dir}/logs/train-%j-r0.log"
    assert "MASTER_ADDR" not in out.stderr
    rec = json.loads((run_dir / "submission.json").read_text())
    assert rec["attempts"][-1]["outcome"] == "finished"


def test_sbatch_quote_round_trips():
    for value in ["plain", "with space", "q'uote", 'd"q', "#hash", "a\\b", "$(x) `y`"]:
        assert sbatch_words(f"--x={slurm.sbq(value)}") == [f"--x={value}"]


def test_unquoted_values_and_undefined_variables_are_errors():
    env = slurm.environment()
    with pytest.raises(jinja2.TemplateError, match="unquoted"):
        env.from_string("echo {{ x }}").render(x="$(rm -rf ~)")
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("echo {{ missing | q }}").render()
    with pytest.raises(jinja2.TemplateError):
        env.from_string("{{ flag | q }}").render(flag=True)  # decide booleans in Python
    assert env.from_string("echo {{ x | q }} {{ n }}").render(x="a b", n=3) == "echo 'a b' 3"


def test_every_expression_in_the_templates_is_filtered():
    """Belt and braces for the finalize hook: no bare {{ name }} of a string in the sources."""
    for path in (REPO / "templates" / "slurm").glob("*.j2"):
        for expr in re.findall(r"{{(.*?)}}", path.read_text()):
            name = expr.strip()
            if "|" not in name:
                assert name in {
                    "nodes",
                    "tasks_per_node",
                    "world_size",
                    "gpus_per_node",
                    "cpus_per_task",
                    "signal_lead_s",
                    "requeue_exit_code",
                    "line",
                }, (path.name, name)
