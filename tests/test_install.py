"""A non-editable `pip install .` renders and submits from any directory (docs/design.md,
Installing next to bionemo-scdl).

The project is installed into a fresh venv from a copy of its source (pip's own build, no
dependencies, no build isolation, no index: a few seconds, offline). The launcher's third-party
packages (pydantic, yaml, jinja2, ...) and bionemo-scdl come from this test's environment through
a .pth file naming its site-packages: Python appends that folder after the venv's own
site-packages and does not read the .pth files inside it, so the checkout's editable install
stays invisible. Every command runs in an empty folder outside the checkout, without PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bionemo import rundir

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "bionemo", "launchers", "configs", "templates")
PARQUET = b"PAR1" + bytes(8) + b"PAR1"  # what the data check reads of a parquet file
SQLITE = b"SQLite format 3\x00" + bytes(84)  # ... and of an SQLite database


class Installed:
    def __init__(self, venv: Path, project: Path):
        self.venv, self.project = venv, project
        self.python, self.command = venv / "bin" / "python", venv / "bin" / "bionemo-hpc"
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.project,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():  # launchers/configs and launchers/templates stay symbolic links
            shutil.copytree(path, src / name, symlinks=True, ignore=skip)
        else:
            shutil.copy2(path, src / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(
        subprocess.run(
            [
                venv / "bin" / "python",
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (purelib / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # pip (from the dependencies' folder) installs into the venv; --ignore-installed: it never
    # touches the checkout's editable install, which it can see there
    out = subprocess.run(
        [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--ignore-installed",
            "--disable-pip-version-check",
            str(src),
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    project = tmp / "project"  # a user's folder: their data, their runs
    (project / "data" / "sample").mkdir(parents=True)
    for name in ("train_clusters.parquet", "valid_clusters.parquet"):
        (project / "data" / "sample" / name).write_bytes(PARQUET)
    (project / "data" / "sample" / "proteins.sqlite").write_bytes(SQLITE)
    return Installed(venv, project)


def test_the_installed_package_and_its_data_come_from_the_venv(installed):
    code = (
        "import json, importlib.util, bionemo, launchers, launchers.paths as p\n"
        "scdl = importlib.util.find_spec('bionemo.scdl')\n"
        "print(json.dumps(dict(bionemo=bionemo.__file__, launchers=launchers.__file__,"
        " configs=str(p.CONFIGS), templates=str(p.TEMPLATES), root=str(p.REPO_ROOT),"
        " installed=p.INSTALLED, scdl=scdl and scdl.origin)))\n"
    )
    out = installed.run(installed.python, "-c", code)
    assert out.returncode == 0, out.stderr
    where = json.loads(out.stdout)
    site = installed.venv.resolve()
    for key in ("bionemo", "launchers", "configs", "templates"):
        assert Path(where[key]).resolve().is_relative_to(site), (key, where[key])
    configs, templates = Path(where["configs"]), Path(where["templates"])
    assert not configs.is_symlink() and (configs / "models" / "esm2_8m.yaml").is_file()
    assert (configs / "clusters" / "local.yaml").is_file() and (configs / "debug.yaml").is_file()
    assert not templates.is_symlink() and (templates / "slurm" / "train.sbatch.j2").is_file()
    assert where["installed"] and Path(where["root"]) == installed.project.resolve()
    # bionemo-scdl's `bionemo` namespace folder stays importable beside our regular package
    import importlib.util

    if importlib.util.find_spec("bionemo.scdl") is not None:
        assert where["scdl"] and not Path(where["scdl"]).resolve().is_relative_to(site)


def test_the_console_command_renders_from_any_directory(installed):
    out = installed.run(installed.command, "render", "--model", "esm2_8m", "job.run=r0")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=2" in out.stdout and "-m bionemo.train" in out.stdout
    assert f"workdir: {installed.project.resolve()}" in out.stdout
    assert (
        installed.run(
            installed.python, "-m", "launchers", "render", "--model", "esm2_8m", "job.run=r0"
        ).stdout
        == out.stdout
    )
    usage = installed.run(installed.command, "--help").stdout
    assert usage.startswith("usage: bionemo-hpc") and "submit" in usage


@pytest.mark.cluster
def test_the_console_command_submits_from_any_directory(installed, slurm_cluster):
    """A held job on the bundled cluster (BIONEMO_CLUSTER_DIR: the running one), then cancelled."""
    env = {**installed.env, "BIONEMO_CLUSTER_DIR": str(slurm_cluster.dir)}
    out = installed.run(
        installed.command,
        "submit",
        "--model",
        "esm2_8m",
        "job.hold=true",
        "job.experiment=installed",
        "job.run=r1",
        f"cluster.python={installed.python}",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    run_dir = installed.project / "runs" / "installed" / "r1"
    job_id = json.loads((run_dir / rundir.SUBMISSION).read_text())["jobs"][-1]["job_id"]
    try:
        assert f"submitted job {job_id}" in out.stdout
        job = slurm_cluster.job(job_id)
        assert job.get("JobState") == "PENDING" and "held" in job.get("Reason", "").lower(), job
        saved = (run_dir / rundir.CONFIG).read_text()
        assert f"workdir: {installed.project.resolve()}" in saved, saved
    finally:
        slurm_cluster.cancel(job_id)
