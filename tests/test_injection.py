"""Shell injection through user strings, on all three SLURM backends (issue 13, defect 5).

Every user string that reaches a shell is quoted or refused:
- sbatch and submitit quote: names, cluster.env values, srun flags and container settings made of
  shell metacharacters render into scripts that `bash -n` accepts, and that, run under bash with
  stand-ins for srun and scontrol, execute nothing and hand every value over intact;
- NeMo-Run builds `mkdir -p`, `sbatch` and `srun --output` command lines from the run directory
  without quoting (launchers/backends/nemo_run_backend.py), so with --backend nemo_run a run
  directory that is not one plain shell word is refused at validation: exit 2, one line naming
  the key, nothing written. Its other strings (env values, srun flags) are quoted, as above.

The payloads `touch <TOKEN>` would create a file named exactly TOKEN; the tests look for it in the
working directory, the run directories, $HOME, /tmp and the repository.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from launchers import cli, config
from launchers import spec as specs
from launchers.backends import nemo_run_backend, sbatch, submitit_backend

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
TOKEN = f"pwn-{uuid.uuid4().hex[:8]}"
# What the issue found, plus the usual suspects; `{t}` is the file a successful injection creates.
HOSTILE = {
    "dollar-paren": "x$(touch {t})",
    "backticks": "x`touch {t}`",
    "semicolon": "r;touch {t};x",
    "and-and": "r && touch {t}",
    "quotes": "q'\"; touch {t}; echo \"'",
    "spaces": "two words {t}",
    "pipe-redirect": "a|touch {t}>b",
}


def hostile(name: str) -> str:
    return HOSTILE[name].format(t=TOKEN)


def strays(*roots: Path) -> list[Path]:
    """Files named TOKEN: under the test's own folders (recursively), at the top of $HOME, /tmp,
    the repository and the working directory."""
    found = []
    for root in roots:
        found += list(root.rglob(TOKEN)) if root.is_dir() else []
    for top in (Path.home(), Path("/tmp"), REPO, Path.cwd()):
        if (top / TOKEN).exists():
            found.append(top / TOKEN)
    return found


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("key", ["job.experiment", "job.run"])
def test_nemo_run_refuses_a_run_directory_it_would_pass_to_a_shell(
    case, key, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    rc = cli.main(
        [
            "render",
            "--backend",
            "nemo_run",
            "--model",
            "esm2_8m",
            "--cluster",
            "local",
            f"cluster.runs_root={runs}",
            f"{key}={hostile(case)}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: command line: {key}: "), err
    assert "NeMo-Run" in lines[0] and "--backend sbatch" in lines[0]
    assert not runs.exists() and not strays(tmp_path)


def test_nemo_run_submit_refuses_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """The issue's command: exit 2 naming both keys; no run directory, no job, no stray file
    (before the fix: both files and a stray runs/x/r directory at submit time)."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    rc = cli.main(
        [
            "submit",
            "--backend",
            "nemo_run",
            "--model",
            "esm2_8m",
            "--cluster",
            "local",
            f"cluster.runs_root={runs}",
            "job.hold=true",
            f"experiment=x$(touch {TOKEN}1)",
            f"run=r;touch {TOKEN}2;x",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert [line.split(": ")[2] for line in err.splitlines() if line.startswith("error: ")] == [
        "job.experiment",
        "job.run",
    ]
    assert not runs.exists()
    assert not list(tmp_path.rglob(f"{TOKEN}*")) and not (REPO / f"{TOKEN}1").exists()


def test_nemo_run_refuses_a_runs_root_with_spaces(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(
        [
            "render",
            "--backend",
            "nemo_run",
            "--model",
            "esm2_8m",
            "--cluster",
            "local",
            f"cluster.runs_root={tmp_path}/my runs",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "cluster.runs_root: " in err and "my runs" in err, err


@pytest.mark.parametrize("backend", ["sbatch", "submitit", "nemo_run"])
def test_a_newline_in_a_name_is_refused_on_every_backend(backend, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(
        [
            "render",
            "--backend",
            backend,
            "--model",
            "esm2_8m",
            "--cluster",
            "local",
            f"cluster.runs_root={tmp_path}/runs",
            f"job.run=a\ntouch {TOKEN}",
        ]
    )
    assert rc == 2 and "job.run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ quoting

ENV_VALUE = f"$(touch {TOKEN}) `touch {TOKEN}`; touch {TOKEN} && 'q' \"dq\"\nline two $HOME"
SRUN_ARG = f"--comment=$(touch {TOKEN});touch {TOKEN} 'q' \"dq\" `touch {TOKEN}`"
MOUNT = f"/data$(touch%{TOKEN}):/d`touch%{TOKEN}`"  # pyxis mounts: no spaces or commas


def _spec(runs: Path, experiment: str, run: str, backend: str, container: bool) -> specs.JobSpec:
    overrides = [
        f"cluster.runs_root={runs}",
        f"job.experiment={experiment}",
        f"job.run={run}",
        f"job.backend={backend}",
        f"cluster.srun_args=[{json.dumps(SRUN_ARG)}]",
        f"cluster.host_python={sys.executable}",
    ]
    if container:
        overrides += [
            f"cluster.container_image=img$(touch {TOKEN})",
            f"cluster.container_mounts=[{json.dumps(MOUNT)}]",
        ]
    resolved = config.resolve(
        model="esm2_8m", cluster="local", nodes=1, now=NOW, overrides=overrides
    )
    resolved.config.cluster.env["INJ"] = ENV_VALUE  # newlines too (no validator refuses them)
    return specs.build(resolved, strict=False)


def _stub(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_script(text: str, tmp_path: Path) -> list[dict]:
    """Run a batch script under bash with srun/scontrol stand-ins; return each srun call's argv
    and $INJ. The trainer's srun gets the run directory last: it is marked finished there, so the
    requeue decision that follows stops."""
    bin_dir, cwd, home = tmp_path / "bin", tmp_path / "cwd", tmp_path / "home"
    for d in (bin_dir, cwd, home):
        d.mkdir(exist_ok=True)
    calls = tmp_path / "srun-calls.jsonl"
    _stub(
        bin_dir / "srun",
        f"""#!{sys.executable}
import json, os, pathlib, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(dict(argv=sys.argv[1:], inj=os.environ.get("INJ"))) + "\\n")
if "hostname" in sys.argv:
    print("127.0.0.1")
elif pathlib.Path(sys.argv[-1], "config.yaml").is_file():
    pathlib.Path(sys.argv[-1], "finished").write_text("1\\n")
""",
    )
    _stub(
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
        "HOME": str(home),
    }
    script = tmp_path / "job.sh"
    script.write_text(text)
    out = subprocess.run(
        ["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert calls.exists(), out.stdout + out.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()]


def _prepare(spec: specs.JobSpec) -> None:
    (spec.run_dir / "logs").mkdir(parents=True)
    (spec.run_dir / "config.yaml").write_text(spec.config_text())


def _check_bash_syntax(text: str) -> None:
    out = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("container", [False, True])
@pytest.mark.parametrize("backend", ["sbatch", "submitit"])
def test_hostile_strings_render_inert_and_round_trip(backend, container, tmp_path):
    experiment = "".join(hostile(k) for k in ("dollar-paren", "backticks", "quotes"))
    run = "".join(hostile(k) for k in ("semicolon", "and-and", "spaces", "pipe-redirect"))
    spec = _spec(tmp_path / "runs", experiment, run, backend, container)
    text = sbatch.render(spec) if backend == "sbatch" else submitit_backend.script(spec)
    _check_bash_syntax(text)
    _prepare(spec)
    calls = run_script(text, tmp_path)
    assert not strays(tmp_path), text
    (step,) = [c for c in calls if "hostname" not in c["argv"]]
    argv, run_dir = step["argv"], str(spec.run_dir)
    assert step["inj"] == ENV_VALUE
    assert SRUN_ARG in argv
    if container:
        assert f"--container-mounts={MOUNT}" in argv
        assert f"--container-image=img$(touch {TOKEN})" in argv
    if backend == "sbatch":
        assert argv[-1] == run_dir and argv[0] == f"--output={run_dir}/logs/train-%j-r0.log"
    else:  # submitit's task runner, with its folder in the run directory
        assert argv[-1] == f"{run_dir}/submitit"
        assert argv[argv.index("--output") + 1].startswith(f"{run_dir}/submitit/")


@pytest.mark.parametrize("container", [False, True])
def test_nemo_run_quotes_everything_else_and_round_trips(container, tmp_path):
    """With a run directory of plain words (odd ones included), NeMo-Run's script carries the
    hostile env value, srun flag and container settings intact and executes none of them."""
    spec = _spec(tmp_path / "runs", "inj=1,a:b+c@d", "r.1-x_y", "nemo_run", container)
    text = nemo_run_backend.script(spec)
    _check_bash_syntax(text)
    _prepare(spec)
    calls = run_script(text, tmp_path)
    assert not strays(tmp_path), (strays(tmp_path), text)
    step = calls[-1]
    argv, run_dir = step["argv"], str(spec.run_dir)
    assert step["inj"] == ENV_VALUE and SRUN_ARG in argv
    assert argv[-3:] == ["-m", "bionemo.train", run_dir]
    assert argv[argv.index("--output") + 1].startswith(f"{run_dir}/logs/log-")
    if container:
        assert f"--container-mounts={MOUNT}" in argv


def test_shell_quoting_guard_names_plain_words_only():
    ok = ["runs", "/abs/path/runs", "inj=1,a:b+c@d", "r.1-x_y"]
    bad = ["a b", "x$(y)", "a;b", "a`b`", "q'", 'd"', "a&b", "a|b", "a>b", "~x", "a*b", "é"]
    assert all(config.NEMO_RUN_WORD.match(v) and shlex.quote(v) == v for v in ok)
    assert not any(config.NEMO_RUN_WORD.match(v) for v in bad)
