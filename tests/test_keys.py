"""Field documentation in one place: every config key has a description in the schema, docs/
launcher.md's key table is the one `python -m launchers keys` generates, and the command prints
key, type, default and description (or refuses an unknown section with exit 2)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from launchers import keys

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "launcher.md"
BLOCK = re.compile(r"<!-- keys (?P<section>[\w.]+):.*?-->\n(?P<table>.*?)<!-- end keys -->", re.S)
REGENERATE = "python -m launchers keys {section} --markdown"


def test_every_key_has_a_description():
    everything = keys.all_keys()
    assert len(everything) > 100  # job, cluster, sweep and every trainer section
    missing = [f"{k.schema}: {k.key}" for k in everything if not k.description]
    assert not missing, "fields without Field(description=...): " + ", ".join(missing)


def test_docs_key_tables_are_generated_from_the_schema():
    blocks = list(BLOCK.finditer(DOCS.read_text()))
    assert [b["section"] for b in blocks] == ["cluster"]
    known = {k.key for k in keys.all_keys()}
    for b in blocks:
        documented = re.findall(r"^\| `([\w.]+)` \|", b["table"], re.M)
        assert documented and set(documented) <= known, set(documented) - known
        # every field of the section is in the table, as the schema describes it today
        assert b["table"] == keys.markdown(keys.select(b["section"])), (
            f"docs/launcher.md's `{b['section']}` table drifted from the schema; regenerate it "
            f"with `{REGENERATE.format(section=b['section'])}`"
        )


def test_keys_command_prints_key_type_default_description():
    out = subprocess.run(
        [sys.executable, "-m", "launchers", "keys", "trainer.train"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("trainer.train.max_steps "))
    assert lines[head].split() == ["trainer.train.max_steps", "int", "500000"]
    assert lines[head + 1].strip() == "optimizer steps of the run"
    assert all(line.startswith(("trainer.train.", "    ")) for line in lines)


def test_keys_command_refuses_an_unknown_section():
    out = subprocess.run(
        [sys.executable, "-m", "launchers", "keys", "trainer.trian"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and not out.stdout
    assert "trainer.trian: no such section or key (did you mean 'trainer.train'?)" in out.stderr


def test_types_and_defaults_read_like_yaml():
    by_key = {k.key: k for k in keys.all_keys()}
    assert by_key["job.backend"][1:3] == ("sbatch|submitit|nemo_run|local", "sbatch")
    assert by_key["cluster.partition"][1:3] == ("str | null", "null")
    assert by_key["cluster.gpu_type"].default == "required"
    assert by_key["trainer.optim.betas"].default == "[0.9, 0.98]"
    # trainer.data is one schema per model family: both are listed
    assert {by_key["trainer.data.database"].schema, by_key["trainer.data.vocab"].schema} == {
        "DataConfig",
        "CellDataConfig",
    }
