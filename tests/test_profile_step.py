"""benchmarks/profile_step.py's step mode on CPU (its smoke-test device). The script builds the
model, optimizer and step with the engine's own functions, so it breaks when their interfaces move:
it handed the optimizer builder a stand-in config without `parallel`, which only the GPU path
reads, and the H200 profile call of 2026-12-02 failed on it. It now passes a real TrainerConfig;
on CPU this test checks the rest of the path (build, step, table, JSON row)."""

from __future__ import annotations

import json

import pytest

from benchmarks import profile_step


def test_step_runs_on_cpu_and_reports_a_row(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    argv = ["step", "--model", "esm2_8m", "--layers", "1", "--mbs", "2", "--device", "cpu"]
    argv += ["--steps", "1", "--warmup", "1", "--distinct", "1", "--json", str(rows)]
    assert profile_step.main(argv) == 0
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert row["fits"] and row["mbs"] == 2 and row["tokens_per_s"] > 0
    assert len(row["losses"]) == 1 and 2.0 < row["losses"][0] < 5.0  # ~ln(33) at init
    assert "| esm2_8m | eager |" in capsys.readouterr().out


def test_an_unknown_inductor_option_is_refused_before_anything_runs(capsys):
    """--inductor names change between torch releases: a misspelt or removed one is an error
    (exit 2, naming it), not a silently unchanged A/B."""

    with pytest.raises(SystemExit) as e:
        profile_step.main(["step", "--device", "cpu", "--inductor", "triton.no_such_option=1"])
    assert e.value.code == 2
    assert "has no inductor option triton.no_such_option" in capsys.readouterr().err
