"""The sweep searches the data-parallel strategy (and FP8 recipe) too, and --write-table records
the one it chose (issue 16). Real trainer processes: DDP and FSDP2 on 2 gloo ranks, on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from launchers.config import BenchmarkTable
from launchers.sweeping.results import markdown

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--set",
    "model.num_layers=2",
    "model.seq_length=128",
    "train.device=cpu",
    "train.precision=fp32",
    "data.valid_clusters=null",
]


def launcher(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launchers", "sweep", "--backend", "local", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sweep_searches_ddp_and_fsdp_and_writes_the_faster(tmp_path):
    tables, out = tmp_path / "tables", tmp_path / "out"
    tables.mkdir()
    shutil.copy(REPO_ROOT / "configs" / "benchmarks" / "cpu.yaml", tables / "cpu.yaml")
    before = yaml.safe_load((tables / "cpu.yaml").read_text())
    proc = launcher(
        "--model",
        "esm2_8m",
        "--gpus-per-trial",
        "2",
        "--min",
        "2",
        "--max",
        "2",
        "--recompute",
        "none",
        "--strategy",
        "ddp,fsdp",
        "--warmup-steps",
        "1",
        "--steps",
        "2",
        "--write-table",
        "--tables",
        str(tables),
        "--out",
        str(out),
        *SMALL,
        "cluster.tasks_per_node=2",
        f"cluster.runs_root={tmp_path / 'runs'}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "cpu" / "esm2_8m.json").read_text())

    # one trial per strategy, each a real run of that strategy
    assert [(t["data_parallel"], t["fp8"], t["fits"]) for t in result["trials"]] == [
        ("ddp", "none", True),
        ("fsdp", "none", True),
    ]
    for t in result["trials"]:
        cfg = yaml.safe_load((Path(t["run_dir"]) / "config.yaml").read_text())["trainer"]
        assert cfg["parallel"]["data_parallel"] == t["data_parallel"]
        assert Path(t["run_dir"]).name == f"{t['data_parallel']}-none-mbs00002"
    assert [v["label"] for v in result["variants"]] == ["ddp", "fsdp"]

    # the chosen variant is the faster one, and the table row says so
    speed = {
        v["data_parallel"]: v["policies"]["none"]["tokens_per_s_per_gpu"]
        for v in result["variants"]
    }
    faster = max(speed, key=speed.get)
    assert result["best"]["data_parallel"] == faster
    assert result["best"]["config"]["parallel"]["data_parallel"] == faster
    table = yaml.safe_load((tables / "cpu.yaml").read_text())
    row = table["rows"]["esm2_8m"]
    assert row["data_parallel"] == faster and row["fp8"] == "none"
    assert row["micro_batch_size"] == 2
    # the edited table still loads, its other rows untouched, and the row is a config layer
    layer = BenchmarkTable.model_validate(table).rows["esm2_8m"].trainer_layer()
    assert layer["parallel"]["data_parallel"] == faster and layer["train"]["fp8"] == "none"
    assert {k: v for k, v in table["rows"].items() if k != "esm2_8m"} == {
        k: v for k, v in before["rows"].items() if k != "esm2_8m"
    }
    md = (out / "cpu" / "esm2_8m.md").read_text()
    assert f"Chosen (fastest with recompute none): **{faster}**" in md
    assert "| fsdp | none | 2 | yes |" in md


def test_bad_strategy_and_fp8_are_refused_before_anything_runs(tmp_path):
    runs = tmp_path / "runs"
    for args, words in (
        (["--strategy", "ddp,fsdx"], ["--strategy", "sweep.strategies", "fsdx"]),
        (["--strategy", "ddp,ddp"], ["--strategy", "repeats"]),
        (
            ["--fp8", "none,tensorwise"],
            ["--fp8", "sweep.fp8", "tensorwise", "leave tensorwise out"],
        ),
    ):
        proc = launcher(
            "--model", "esm2_8m", *args, *SMALL, f"cluster.runs_root={runs}", timeout=60
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert all(w in lines[0] for w in words), lines[0]
    assert not runs.exists()  # nothing written


def test_old_results_without_strategies_still_render():
    """Result files written before the strategy search (no "variants", no trial strategy)."""
    old = json.loads((REPO_ROOT / "benchmarks/results/h100_80gb/esm2_650m.json").read_text())
    assert "variants" not in old
    md = markdown(old)
    assert "| ddp | none | 53 |" in md and "| ddp | none | 48 | yes |" in md


def test_results_record_the_projects_commit_not_an_enclosing_repositorys(tmp_path):
    """A copy of the project inside another git repository (a vendored checkout, a tree copied to
    a GPU machine): project_commit() must not answer with that repository's HEAD."""

    def git(*args: str, cwd: Path) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
        ).stdout.strip()

    def recorded(where: Path) -> str:
        code = "from launchers.paths import project_commit; print(project_commit())"
        return subprocess.run(
            [sys.executable, "-c", code], cwd=where, check=True, capture_output=True, text=True
        ).stdout.strip()

    outer = tmp_path / "outer"
    copy = outer / "vendor" / "bionemo-hpc"
    shutil.copytree(REPO_ROOT / "launchers", copy / "launchers", symlinks=True)
    shutil.copy(REPO_ROOT / "pyproject.toml", copy / "pyproject.toml")
    ident = ["-c", "user.email=t@example.com", "-c", "user.name=t"]
    git("init", "-q", cwd=outer)
    git("add", "-A", cwd=outer)
    git(*ident, "commit", "-q", "-m", "outer", cwd=outer)
    outer_head = git("rev-parse", "HEAD", cwd=outer)

    assert recorded(copy) == "None"  # not the outer HEAD
    (copy / "COMMIT_STAMP").write_text("0123abcd-dirty\n")  # what `make stamp` writes
    assert recorded(copy) == "0123abcd-dirty" != outer_head

    # A copy whose own .git is an older snapshot (the GPU machines'): a stamp written after its
    # HEAD commit wins; once a newer commit is made there, git does.
    git("init", "-q", cwd=copy)
    git("add", "-A", cwd=copy)
    env = {**os.environ, "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z"}
    subprocess.run(
        ["git", *ident, "commit", "-q", "-m", "old snapshot"], cwd=copy, env=env, check=True
    )
    assert recorded(copy) == "0123abcd-dirty"
    (copy / "new_file").write_text("x")
    git("add", "new_file", cwd=copy)
    os.utime(copy / "COMMIT_STAMP", (1_000_000_000, 1_000_000_000))  # stamp from 2001
    git(*ident, "commit", "-q", "-m", "newer", cwd=copy)
    assert recorded(copy) == git("rev-parse", "HEAD", cwd=copy)
