"""The micro-batch sweep (launchers/sweeping/): search logic, table edits, and a real CPU sweep.

The CPU sweep runs real trainer processes under a real address-space limit (RLIMIT_AS), so the
sizes that do not fit fail with a real allocation failure and the trainer's exit code 12. The
limit is calibrated here, so the test does not depend on this machine's torch build: halfway
between the peak address space of micro batch 8 and of 16, so 8 surely fits, 16 surely does not,
and the sweep must find the exact boundary in between. The search starts at 8 and stops at 16
(five trials: 8, 16, then three bisection steps): a trial below 8 would only repeat what 8 shows.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launchers.cli import main as launcher_main
from bionemo import rundir
from launchers.sweeping import orchestrator, results, trials
from launchers.sweeping.search import search

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small weights, long sequences: activations (which grow with the micro batch) dominate memory.
# Measured with torch 2.13 CPU: 10-20 MiB of address space per sequence over a ~0.9 GiB base
# (not linear in the micro batch, hence the calibration on both sides of the crossover).
TINY_MODEL = [
    "model.num_layers=1",
    "model.hidden_size=128",
    "model.num_attention_heads=2",
    "model.ffn_hidden_size=256",
    "model.seq_length=1024",
    "train.device=cpu",
    "train.precision=fp32",
]
SEARCH = ["--min", "8", "--max", "16", "--warmup-steps", "1", "--steps", "1"]
# Measured without a limit; the limit goes halfway between their peaks, a margin of several
# sequences' worth of memory on either side, far more than the run-to-run noise (~5 MiB).
CALIBRATION = (8, 16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    subprocess.run(
        [sys.executable, "-m", "bionemo.data.sample", "--out", str(out), "--clusters", "200"],
        check=True,
        capture_output=True,
    )
    return out


def data_overrides(data_dir: Path) -> list[str]:
    return [
        f"data.train_clusters={data_dir / 'train_clusters.parquet'}",
        "data.valid_clusters=null",
        f"data.database={data_dir / 'proteins.sqlite'}",
    ]


# ------------------------------------------------------------------------------------ search


def recording(limit: int):
    calls = []

    def fits(m):
        calls.append(m)
        return m <= limit

    return fits, calls


def test_search_doubles_then_bisects():
    fits, calls = recording(13)
    assert search(fits, 1, 512) == 13
    assert calls == [1, 2, 4, 8, 16, 12, 14, 13]


def test_search_edges():
    fits, calls = recording(1000)
    assert search(fits, 1, 48) == 48 and calls == [1, 2, 4, 8, 16, 32, 48]
    fits, calls = recording(0)
    assert search(fits, 2, 64) is None and calls == [2]
    # A later recompute policy starts at the previous policy's maximum ...
    fits, calls = recording(40)
    assert search(fits, 1, 512, start=24) == 40 and calls == [24, 48, 36, 42, 39, 40, 41]
    # ... and falls back to the floor if even that does not fit.
    fits, calls = recording(5)
    assert search(fits, 1, 512, start=24) == 5 and calls == [24, 1, 12, 6, 3, 4, 5]


# ------------------------------------------------------------------------------------ config


def dry_run(capsys, tmp: Path, launcher_args: list[str]) -> list[str]:
    """`python -m launchers sweep --backend local --dry-run ...`: write the resolved config.yaml it
    prints to tmp/config.yaml; return the orchestrator's arguments it would run (after
    `python -m launchers.sweeping`), with --base-config pointing at that file."""
    capsys.readouterr()
    assert launcher_main(["sweep", "--backend", "local", "--dry-run", *launcher_args]) == 0
    out = capsys.readouterr().out
    script, config_text = out.split("# ==== config.yaml -> ", 1)
    (tmp / "config.yaml").write_text(config_text.split("\n", 1)[1])
    joined = script.replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if "-m launchers.sweeping" in ln]
    words = shlex.split(line.split(" && ", 1)[1])
    words = words[words.index("launchers.sweeping") + 1 :]
    words[words.index("--base-config") + 1] = str(tmp / "config.yaml")
    return words


def test_trial_config_applies_sweep_settings_last(tmp_path, capsys):
    words = dry_run(
        capsys,
        tmp_path,
        [
            "--model",
            "esm2_8m",
            "--memory-cap-gib",
            "40",
            "--set",
            "train.micro_batch_size=999",
            "data.pad_to=longest",
            "trainer.model.num_layers=2",
            "--set",
            "data.database=data/x.sqlite",
        ],
    )
    args = orchestrator.parse_args(words)
    cfg = trials.trial_config(trials.load_base(args), args, "selective", 24)
    assert cfg["model"]["num_layers"] == 2  # user overrides, with or without "trainer."
    assert cfg["train"]["micro_batch_size"] == 24 and cfg["data"]["pad_to"] == "max_length"
    assert cfg["model"]["activation_checkpointing"] == "selective"
    assert cfg["train"]["max_steps"] == 13 and cfg["train"]["log_every"] == 1
    assert cfg["checkpoint"]["enabled"] is False and cfg["train"]["limit_val_batches"] == 0
    assert cfg["train"]["memory_cap_gib"] == 40
    assert cfg["data"]["database"] == str(REPO_ROOT / "data/x.sqlite")  # made absolute


def test_gpu_table_names():
    assert trials.gpu_table_name("NVIDIA H100 80GB HBM3") == "h100_80gb"
    assert trials.gpu_table_name("NVIDIA H200") == "h200_141gb"
    assert trials.gpu_table_name("NVIDIA A100-SXM4-80GB") == "a100_80gb"
    assert trials.gpu_table_name("NVIDIA L40S") == "nvidia_l40s"


def test_update_table_keeps_other_rows_and_comments(tmp_path):
    table = tmp_path / "h100_80gb.yaml"
    shutil.copy(REPO_ROOT / "configs" / "benchmarks" / "h100_80gb.yaml", table)
    original = table.read_text()
    old = yaml.safe_load(original)
    row = {
        **old["rows"]["esm2_650m"],
        "micro_batch_size": 40,
        "max_micro_batch_size": 56,
        "global_batch_size": None,
        "gpus": 8,
        "measured": True,
        "source": "benchmarks/results/h100_80gb/esm2_650m.json",
        "date": "2026-01-02",
    }
    results.update_table(table, "h100_80gb", "esm2_650m", row)
    text = table.read_text()
    new = yaml.safe_load(text)
    assert new["rows"]["esm2_650m"] == row
    assert {k: v for k, v in new["rows"].items() if k != "esm2_650m"} == {
        k: v for k, v in old["rows"].items() if k != "esm2_650m"
    }
    assert new["measured"] == old["measured"]  # the table-level keys are left alone
    # Comments elsewhere survive, including the inline ones of other rows (the rewritten row's
    # own lines are replaced).
    lines = original.splitlines()
    start = lines.index("  esm2_650m:")
    end = next(i for i in range(start + 1, len(lines)) if re.match(r"  \S", lines[i]))
    for line in lines[:start] + lines[end:]:
        if "#" in line:
            assert line in text, line
    assert "date: '2026-01-02'" in text  # a string, not a YAML date

    results.update_table(table, "h100_80gb", "esm2_new", {"micro_batch_size": 4})
    assert yaml.safe_load(table.read_text())["rows"]["esm2_new"] == {"micro_batch_size": 4}
    fresh = tmp_path / "h200_141gb.yaml"
    results.update_table(fresh, "h200_141gb", "esm2_8m", {"micro_batch_size": 128})
    assert yaml.safe_load(fresh.read_text())["rows"] == {"esm2_8m": {"micro_batch_size": 128}}
    try:  # the launcher reads both back (when its schema is there)
        from launchers.config import BenchmarkTable
    except ImportError:
        return
    BenchmarkTable.model_validate(yaml.safe_load(fresh.read_text()))


def test_table_row_keeps_global_batch_only_when_divisible():
    result = {
        "policies": {"none": {"micro_batch_size": 48, "max_micro_batch_size": 64}},
        "tensor_parallel": 1,
        "world_size": 8,
        "date": "2026-01-02T03:04:05+00:00",
        "gpu": "h100_80gb",
    }
    row = results.table_row(result, {"global_batch_size": 2048, "notes": "x"}, "r.json")
    assert row["global_batch_size"] is None and row["notes"] == "x"  # 2048 % 48 != 0
    assert row["micro_batch_size"] == 48 and row["max_micro_batch_size"] == 64
    assert row["gpus"] == 8 and row["measured"] is True and "2026-01-02" in row["source"]
    columns = results.table_columns()
    if columns is not None:  # whatever the launcher's schema, the row must pass it
        assert set(row) <= columns, set(row) - columns
    result["policies"]["none"]["micro_batch_size"] = 32
    assert (
        results.table_row(result, {"global_batch_size": 2048}, "r.json")["global_batch_size"]
        == 2048
    )


# ------------------------------------------------------------------------------------ real sweep

# Runs the trainer exactly as a trial does, and records its peak address space (VmPeak) at exit.
_MEASURE = """
import atexit, os, sys
from pathlib import Path
run_dir = Path(sys.argv[1])
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmPeak:"))
    (run_dir / f"vmpeak_kib.{os.environ.get('RANK', '0')}").write_text(line.split()[1])
atexit.register(peak)
from bionemo.train import main
sys.exit(main([str(run_dir)]))
"""


def vm_peaks(tmp: Path, args, sizes, world: int = 1, env: dict | None = None) -> dict[int, int]:
    """Peak address space in bytes of a trial of each size (the largest over its `world`
    ranks), all measured concurrently. `env` is added to the trials' environment."""
    preset = trials.load_base(args)
    trials.prepare_data(trials.trial_config(preset, args, "none", sizes[0]))  # as the sweep does
    env, procs = {**trials.trial_environment(args), **(env or {})}, {}
    for m in sizes:
        run_dir = tmp / f"calibrate-{m}"
        run_dir.mkdir()
        cfg = trials.trial_config(preset, args, "none", m)
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": cfg}))
        port = trials.free_port()
        for rank in range(world):
            rank_env = {
                **env,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            procs[m, rank] = subprocess.Popen(
                [sys.executable, "-c", _MEASURE, str(run_dir)],
                env=rank_env,
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
    for p in procs.values():
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    return {
        m: max(
            int((tmp / f"calibrate-{m}" / f"vmpeak_kib.{r}").read_text()) * 1024
            for r in range(world)
        )
        for m in sizes
    }


def test_cpu_search_finds_the_real_limit(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2-core CI machines; also steadier memory
    common = [
        "--model",
        "esm2_8m",
        "--recompute",
        "none",
        "--gpu-name",
        "cpu",
        "--set",
        *TINY_MODEL,
        *data_overrides(data_dir),
        *SEARCH,
    ]
    # The calibration runs get the trials' config (the launcher's) and environment (allocator
    # settings included).
    lo, hi = CALIBRATION
    calibrate = dry_run(capsys, tmp_path, [*common, "--cpu-memory-limit-gib", "1"])
    peaks = vm_peaks(tmp_path, orchestrator.parse_args(calibrate), CALIBRATION)
    per_sequence = (peaks[hi] - peaks[lo]) / (hi - lo)
    assert per_sequence > 5 * 2**20, peaks  # activations must dominate, or the test means little
    limit_gib = (peaks[lo] + peaks[hi]) / 2 / 2**30
    print(f"VmPeak {peaks}; {per_sequence / 2**20:.1f} MiB per sequence; limit {limit_gib:.3f} GiB")

    out, work = tmp_path / "out", tmp_path / "work"
    # the compatibility shim (benchmarks/sweep.py): the old command line, through the launcher
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.sweep",
            *common,
            "--cpu-memory-limit-gib",
            f"{limit_gib:.4f}",
            "--out",
            str(out),
            "--work-dir",
            str(work),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    result = json.loads((out / "cpu" / "esm2_8m.json").read_text())
    trials = {t["micro_batch_size"]: t for t in result["trials"]}
    best = result["policies"]["none"]["max_micro_batch_size"]
    assert lo <= best < hi, trials  # the calibrated sizes fit and do not fit, as measured
    assert trials[best]["fits"] and not trials[best + 1]["fits"]  # the bisection's boundary
    assert max(m for m, t in trials.items() if t["fits"]) == best
    assert min(m for m, t in trials.items() if not t["fits"]) == best + 1  # monotone
    for m, t in trials.items():
        log = (Path(t["run_dir"]) / "rank0.log").read_text()
        if t["fits"]:
            assert t["tokens_per_s_per_gpu"] > 0 and t["peak_memory_gib"] < limit_gib
        else:  # a real allocation failure, reported by the trainer as out of memory (exit 12)
            assert "can't allocate memory" in log and "out of memory" in log, log[-2000:]
            # ... and recorded for the requeue decision, which may only see srun's 143
            events = rundir.read_events(Path(t["run_dir"]))
            assert any(e["event"] == "oom" for e in events), events
    for ext in ("json", "csv", "md"):
        assert (out / "cpu" / f"esm2_8m.{ext}").stat().st_size > 0
    for plot in ("throughput", "memory"):
        assert (out / "cpu" / f"esm2_8m_{plot}.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        result["best"]["config"]["train"]["micro_batch_size"]
        == result["policies"]["none"]["micro_batch_size"]
    )


def test_cpu_scaling_runs_each_world_size(tmp_path, data_dir, monkeypatch):
    """benchmarks/scaling.py: a real trainer run per world size (1 and 2 gloo ranks), the same
    micro batch per rank, efficiency relative to the smallest."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, work = tmp_path / "out", tmp_path / "work"
    tiny = [s for s in TINY_MODEL if not s.startswith("model.seq_length")] + [
        "model.seq_length=128"
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.scaling",
            "--model",
            "esm2_8m",
            "--gpus",
            "2,1",
            "--mbs",
            "2",
            "--steps",
            "2",
            "--warmup-steps",
            "1",
            "--out",
            str(out),
            "--work-dir",
            str(work),
            "--set",
            *tiny,
            *data_overrides(data_dir),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "cpu" / "scaling-esm2_8m.json").read_text())
    points = result["points"]
    assert [p["gpus"] for p in points] == [1, 2]  # sorted, smallest is the reference
    assert points[0]["efficiency"] == 1.0
    for p in points:
        assert p["tokens_per_s_per_gpu"] > 0
        assert p["tokens_per_s"] == pytest.approx(p["tokens_per_s_per_gpu"] * p["gpus"])
        assert p["efficiency"] == pytest.approx(
            p["tokens_per_s_per_gpu"] / points[0]["tokens_per_s_per_gpu"], abs=1e-4
        )
        # each point really ran at its world size: one rank log per rank
        assert len(list(Path(p["run_dir"]).glob("rank*.log"))) == p["gpus"]
    assert "| 2 |" in (out / "cpu" / "scaling-esm2_8m.md").read_text()


def test_table_row_records_the_fp8_mlp_kernels_it_was_measured_with():
    """train.fp8_mlp is not searched: a sweep run with trainer.train.fp8_mlp=fused measured its
    figures with it, so the row it writes says so, and the launcher turns it back into the key;
    a torchao sweep leaves a row without the column as it was, and resets one that had fused."""
    from launchers.config import BenchmarkTable

    def result(mlp: str) -> dict:
        config = {"train": {"fp8": "tensorwise", "fp8_mlp": mlp}}
        best = {"data_parallel": "ddp", "fp8": "tensorwise", "config": config}
        policies = {"none": {"micro_batch_size": 56, "max_micro_batch_size": 58}}
        return dict(policies=policies, tensor_parallel=1, world_size=1, best=best,
                    date="2026-12-03T01:00:00+00:00", gpu="h200_141gb")  # fmt: skip

    row = results.table_row(result("fused"), {}, "r.json")
    assert row["fp8_mlp"] == "fused" and row["fp8"] == "tensorwise"
    table = {"gpu_type": "h200_141gb", "kind": "gpu", "measured": True, "source": "r.json"}
    table["rows"] = {"esm2_3b": row}
    layer = BenchmarkTable.model_validate(table).rows["esm2_3b"].trainer_layer()
    assert layer["train"]["fp8_mlp"] == "fused" and layer["train"]["fp8"] == "tensorwise"
    assert "fp8_mlp" not in results.table_row(result("torchao"), {}, "r.json")
    assert results.table_row(result("torchao"), row, "r.json")["fp8_mlp"] == "torchao"
