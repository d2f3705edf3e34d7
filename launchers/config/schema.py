"""The launcher's schema: the `job`, `cluster` and `sweep` sections, the resolved LaunchConfig, and
dotted-key lookups (overrides, messages). Section and benchmark tables: tables.py (re-exported)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, field_validator

from bionemo.config import FP8_RECIPES, STRATEGIES, FP8Recipe, Strategy, TrainerConfig
from launchers.config.errors import ConfigError, _did_you_mean
from launchers.config.tables import FP8_GPU_TYPES as FP8_GPU_TYPES
from launchers.config.tables import FA4_GPU_TYPES as FA4_GPU_TYPES
from launchers.config.tables import BenchmarkRow as BenchmarkRow
from launchers.config.tables import BenchmarkTable as BenchmarkTable
from launchers.config.tables import Section as Section

SECTIONS = ("job", "cluster", "sweep", "trainer")

# Short spellings accepted on the command line (documented in docs/launcher.md).
ALIASES = {
    "max_steps": "trainer.train.max_steps",
    "time_limit": "job.time_limit",
    "experiment": "job.experiment",
    "run": "job.run",
}


# --------------------------------------------------------------------------------------------
# Values with a syntax of their own
# --------------------------------------------------------------------------------------------

_TIME = re.compile(
    r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"
)
TIME_FIX = "write SLURM's [days-]hours:minutes:seconds, e.g. 00:30:00, 04:00:00 or 1-00:00:00"


def parse_time_limit(text: str) -> int:
    """Seconds of a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a SLURM time limit")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:
        secs = ((g["d"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    elif "c" in g:
        secs = (g["a"] * 60 + g["b"]) * 60 + g["c"]
    elif "b" in g:
        secs = g["a"] * 60 + g["b"]
    else:
        secs = g["a"] * 60
    if secs <= 0:
        raise ValueError(f"{text!r} is zero")  # the fix is TIME_FIX
    return secs


def format_time_limit(seconds: int) -> str:
    d, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}-{h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


# Experiment and run names become directory names and reach the batch script (always quoted).
# Shell metacharacters are fine; what would change the path or SLURM's file patterns is not.
_BAD_NAME = re.compile(r"[/\\%\x00-\x1f\x7f\ud800-\udfff]")  # surrogates: bytes not UTF-8


def check_name(value: str | None) -> str | None:
    if value is None:
        return value
    fix = "any other characters are fine (shell metacharacters included: every value is quoted)"
    if not value or value in (".", "..") or value != value.strip() or len(value) > 128:
        raise ValueError(
            f"{value!r} is not a usable directory name; use 1-128 characters "
            "without leading or trailing spaces"
        )
    if _BAD_NAME.search(value):
        raise ValueError(
            f"{value!r} contains '/', '\\', '%', a control character or bytes "
            f"that are not UTF-8; {fix}"
        )
    return value


# With --backend nemo_run the run directory must be one plain shell word: NeMo-Run 0.11 puts it
# unquoted into `mkdir -p`, `sbatch <script>` and `srun --output` (launchers/backends/
# nemo_run_backend.py says why refusing beats quoting there). shlex's safe set, minus '%'.
NEMO_RUN_WORD = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")
_SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,:+\-]+$")  # partition, account, qos, node lists
_HOSTLIST = re.compile(r"^[A-Za-z0-9_.,\[\]\-]+$")
_DEPENDENCY = re.compile(
    r"^(?:(?:after(?:any|burstbuffer|corr|notok|ok)?(?::\d+(?:_\d+)?(?:\+\d+)?)+|singleton)"
    r"(?:[,?](?=.)|$))+$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
# Set by the batch script or by SLURM itself; a profile must not shadow them.
_RESERVED_ENV = {
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
}
_SBATCH_FLAG = re.compile(r"^--[a-z][a-z0-9-]*(?:=[^\s'\"\\`$;&|<>()]+)?$")


def _pattern_check(value: str | None, rx: re.Pattern, what: str, example: str) -> str | None:
    if value is not None and not rx.match(value):
        raise ValueError(f"{value!r} is not {what}; write e.g. {example}")
    return value


# --------------------------------------------------------------------------------------------
# The `job` section
# --------------------------------------------------------------------------------------------


class JobConfig(Section):
    """What to run, where and how big. Set by --model/--cluster/--nodes/--backend or job.* keys."""

    model: str = Field(
        description=("preset name (configs/models/<model>.yaml) or a path to a preset file")
    )
    cluster: str = Field(
        "local", description=("profile name (configs/clusters/<cluster>.yaml) or a path")
    )
    backend: Literal["sbatch", "submitit", "nemo_run", "local"] = Field(
        "sbatch",
        description=(
            "sbatch: render a batch script and submit it. submitit: a submitit Checkpointable job. "
            "nemo_run: a NeMo-Run Experiment on run.SlurmExecutor. local: run the trainer on this "
            "machine, in the foreground (one process per rank). docs/launcher.md, Backends."
        ),
    )
    nodes: int = Field(
        1, ge=1, description=("nodes of the job (ranks: nodes x the profile's ranks per node)")
    )
    experiment: str | None = Field(
        None, description=("runs/<experiment>/...; default: trainer.model.family")
    )
    run: str | None = Field(
        None,
        description=(
            "runs/<experiment>/<run>; default: <model>-<nodes>n-<UTC timestamp>, and -02, -03, ... "
            "when submits in the same second want that name (the run directory is created atomically)"
        ),
    )
    time_limit: str | None = Field(None, description="SLURM syntax; default: cluster.time_limit")
    dependency: str | None = Field(None, description="sbatch --dependency, e.g. afterok:1234")
    constraint: str | None = Field(None, description="sbatch --constraint (node features)")
    exclude: str | None = Field(None, description="sbatch --exclude (a host list)")
    hold: bool = Field(
        False, description=("submit held (sbatch --hold); release with `scontrol release <id>`")
    )
    max_restarts: int = Field(
        50,
        ge=0,
        description=(
            "The requeue policy (launchers/requeue.py) stops after this many restarts of one job."
        ),
    )
    check_data: bool = Field(
        True,
        description=(
            "Check that trainer.data files exist before submitting. Turn off only when the data lives "
            "where the submitting host cannot see it (e.g. only inside the container)."
        ),
    )

    @field_validator("experiment", "run")
    @classmethod
    def _names(cls, v):
        return check_name(v)

    @field_validator("time_limit", mode="before")
    @classmethod
    def _time(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)  # SLURM reads a bare number as minutes
        if v is not None:
            parse_time_limit(v)
        return v

    @field_validator("dependency")
    @classmethod
    def _dep(cls, v):
        return _pattern_check(v, _DEPENDENCY, "a SLURM dependency", "afterok:1234 or singleton")

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v):
        return _pattern_check(v, _HOSTLIST, "a SLURM host list", "node[01-04],node09")

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, v):
        return _pattern_check(
            v,
            re.compile(r"^[A-Za-z0-9_.,:&|*\[\]()\-]+$"),
            "a SLURM constraint expression",
            "h100&ib",
        )


# --------------------------------------------------------------------------------------------
# The `cluster` section (a cluster profile)
# --------------------------------------------------------------------------------------------


class ClusterConfig(Section):
    """A cluster profile: configs/clusters/<name>.yaml, section `cluster`."""

    name: str = Field(description="the profile's name; set from the file name")
    bundled: bool = Field(
        False,
        description=(
            "The bundled local cluster (launchers/cluster.py): submit starts it when it is down and "
            "talks to it through its own SLURM_CONF."
        ),
    )
    partition: str | None = Field(
        None, description=("sbatch --partition; null: the cluster's default")
    )
    account: str | None = Field(None, description="sbatch --account")
    qos: str | None = Field(None, description="sbatch --qos")
    gpu_type: str = Field(
        description=(
            "Selects the benchmark table configs/benchmarks/<gpu_type>.yaml (a100_80gb, h100_80gb, "
            "cpu)."
        )
    )
    gpus_per_node: int = Field(
        0, ge=0, description=("> 0: one rank per GPU, --gpus-per-node is rendered")
    )
    tasks_per_node: int | None = Field(
        None, ge=1, description=("ranks per node without GPUs (default 1)")
    )
    cpus_per_task: int = Field(
        1,
        ge=1,
        description=(
            "CPUs per rank (sbatch and srun --cpus-per-task); also the default OMP_NUM_THREADS"
        ),
    )
    time_limit: str = Field("01:00:00", description="default job.time_limit (SLURM syntax)")
    signal_lead_s: int = Field(
        120,
        gt=0,
        description=(
            "Seconds before the time limit at which SLURM sends trainer.train.stop_signal to the "
            "ranks (sbatch --signal=<sig>@<lead>). SLURM checks about once a minute, so it may come "
            "up to 60 s earlier. The trainer must save and exit within the lead time."
        ),
    )
    exclusive: bool = Field(False, description="sbatch --exclusive: whole nodes")
    container_image: str | None = Field(
        None, description=("pyxis --container-image (enables the pyxis flags)")
    )
    container_mounts: list[str] = Field(
        [],
        description=(
            "pyxis --container-mounts, each SRC:DST[:FLAGS]; mount the shared filesystem at the "
            "same path, so paths mean the same inside and out"
        ),
    )
    container_workdir: str | None = Field(
        None, description=("pyxis --container-workdir; default: workdir")
    )
    workdir: str | None = Field(
        None,
        description=(
            "Where the job runs (the repository checkout, as the compute nodes see it); relative "
            "paths below (python, runs_root) are relative to it. null: this repository."
        ),
    )
    python: str = Field(
        "python3", description=("the interpreter that runs the trainer (inside the container)")
    )
    host_python: str | None = Field(
        None,
        description=(
            "The batch host's interpreter for the requeue decision (stdlib only); default: `python` "
            "without a container, python3 with one."
        ),
    )
    env: dict[str, str] = Field(
        {}, description=("exported before srun; never secrets (see docs/launcher.md)")
    )
    setup: list[str] = Field(
        [], description=("shell lines run before srun (e.g. `module load ...`), verbatim")
    )
    srun_args: list[str] = Field([], description="extra srun flags, e.g. --mpi=pmix")
    sbatch_args: list[str] = Field([], description="extra #SBATCH flags, e.g. --mem=0")
    runs_root: str = Field(
        "runs", description=("run directories live in <runs_root>/<experiment>/<run>")
    )

    @field_validator("partition", "account", "qos")
    @classmethod
    def _word(cls, v):
        return _pattern_check(
            v, _SLURM_WORD, "a SLURM name (letters, digits, _.,:+-)", "gpu or batch,backfill"
        )

    @field_validator("time_limit", mode="before")
    @classmethod
    def _time(cls, v):
        return JobConfig._time(v)

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v):
        if not isinstance(v, dict):
            return v
        out = {}
        for k, val in v.items():
            if not isinstance(k, str) or not _ENV_NAME.match(k):
                raise ValueError(
                    f"{k!r} is not an environment variable name; use letters, digits and _"
                )
            if _SECRET.search(k):
                raise ValueError(
                    f"{k} looks like a secret, and secrets are never written into configs or "
                    "scripts; export it in the shell that submits (the job inherits it)"
                )
            if k in _RESERVED_ENV or k.startswith("SLURM_"):
                raise ValueError(
                    f"{k} is set by the batch script or SLURM; remove it from cluster.env"
                )
            if isinstance(val, bool) or val is None:
                raise ValueError(f'{k}: give the value as a quoted string, e.g. {k}: "1"')
            out[k] = str(val) if isinstance(val, (int, float)) else val
        return out

    @field_validator("container_mounts")
    @classmethod
    def _mounts(cls, v):
        for m in v:
            if "," in m or not re.match(r"^[^\s:]+(:[^\s:]+){0,2}$", m):
                raise ValueError(
                    f"{m!r} is not one pyxis mount; write SRC[:DST[:FLAGS]], one "
                    "list item per mount"
                )
        return v

    @field_validator("sbatch_args")
    @classmethod
    def _sbatch_args(cls, v):
        for a in v:
            if not _SBATCH_FLAG.match(a):
                raise ValueError(f"{a!r} is not a single sbatch flag; write e.g. --mem=0")
        return v

    @field_validator("runs_root")
    @classmethod
    def _runs_root(cls, v):
        if "%" in v or "\\" in v:
            raise ValueError(
                f"{v!r} contains '%' or '\\', which SLURM reads as file-name "
                "patterns; choose a directory without them"
            )
        return v

    @field_validator(
        "setup",
        "python",
        "host_python",
        "workdir",
        "container_image",
        "container_workdir",
        "runs_root",
        "srun_args",
    )
    @classmethod
    def _one_line(cls, v):
        for item in v if isinstance(v, list) else [v]:
            if item is not None and (not item or re.search(r"[\x00-\x1f]", item)):
                raise ValueError(f"{item!r} is empty or spans lines; give one line")
        return v


# --------------------------------------------------------------------------------------------
# The `sweep` section (a micro-batch sweep job)
# --------------------------------------------------------------------------------------------

Policy = Literal["none", "selective", "full"]
POLICIES: tuple[Policy, ...] = (
    "none",
    "selective",
    "full",
)  # most memory first (the sweep's order)


def comma_list(value):
    """A sweep list given on the command line as one string (`--recompute none,selective`) ->
    its names; anything else unchanged."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return value


class SweepConfig(Section):
    """A micro-batch sweep in ONE allocation (`python -m launchers sweep`, docs/sweep.md): the
    batch script runs the sweep's orchestrator (`python -m launchers.sweeping`) once, and every
    trial is an srun step of the job; with the local backend it runs here. Trials start from
    the resolved `trainer` section; the sweep's tensor-parallel size, memory cap and compile
    switch are trainer.parallel.tensor, trainer.train.memory_cap_gib and trainer.train.compile
    (flags --tp, --memory-cap-gib, --compile). A trial spans all job.nodes nodes."""

    gpus_per_trial: int | None = Field(
        None,
        ge=1,
        description=(
            "Ranks per node of each trial (GPUs per node); default: the profile's ranks per node."
        ),
    )
    min: int = Field(1, ge=1, description="smallest micro batch tried")
    max: int = Field(512, ge=1, description="largest micro batch tried")
    warmup_steps: int = Field(3, ge=0, description="steps dropped before timing")
    steps: int = Field(10, ge=1, description="timed steps per trial")
    recompute: list[Policy] = Field(
        list(POLICIES),
        description=(
            "activation_checkpointing policies swept, in this order (each starts where the last "
            "ended)"
        ),
    )
    strategies: list[Strategy] | None = Field(None, description="data_parallel strategies searched")
    fp8: list[FP8Recipe] | None = Field(None, description="train.fp8 recipes searched")
    gpu_name: str | None = Field(None, description="table name (h100_80gb); default: detected")
    write_table: bool = Field(False, description="update the model's row in <tables>/<gpu>.yaml")
    cpu_memory_limit_gib: float | None = Field(
        None,
        gt=0,
        description=(
            "CPU trials only: address-space limit (RLIMIT_AS) of every trial process, a real OOM"
        ),
    )
    trial_timeout_s: float = Field(1800, gt=0, description="a trial running longer counts as hung")
    out: str = Field(
        "benchmarks/results",
        description=(
            "Results: <out>/<gpu>/<model>.*, copied into <run_dir>/results. Relative to "
            "cluster.workdir."
        ),
    )
    tables: str = Field("configs/benchmarks", description="write_table's folder (workdir-relative)")

    @field_validator("recompute", "strategies", "fp8", mode="before")
    @classmethod
    def _lists(cls, v, info):
        v = comma_list(v)
        if isinstance(v, list):
            names = {"recompute": POLICIES, "strategies": STRATEGIES, "fp8": FP8_RECIPES}
            choices = ", ".join(names[info.field_name])
            if not v:
                raise ValueError(f"nothing given; list some of {choices}")
            if len(set(v)) != len(v):
                raise ValueError(f"{v} repeats a name; list each of {choices} once")
        return v

    @field_validator("recompute")
    @classmethod
    def _order(cls, v):
        return [x for x in POLICIES if x in v]  # most memory first: the search relies on it

    @field_validator("gpu_name")
    @classmethod
    def _gpu_name(cls, v):
        return _pattern_check(
            v,
            re.compile(r"^[a-z0-9_.-]+$"),
            "a table name (lower-case letters, digits, _.-)",
            "h100_80gb",
        )

    @field_validator("out", "tables")
    @classmethod
    def _folder(cls, v):
        if not v or re.search(r"[\x00-\x1f]", v):
            raise ValueError(f"{v!r} is empty or spans lines; give one folder")
        return v


class LaunchConfig(Section):
    """The resolved configuration, as written to <run_dir>/config.yaml."""

    job: JobConfig
    cluster: ClusterConfig
    sweep: SweepConfig | None = Field(
        None, description=("a sweep job (`python -m launchers sweep`); absent: training")
    )
    trainer: TrainerConfig

    # Derived values (not stored: recomputed from the sections).
    @property
    def kind(self) -> str:
        """What the job runs: "train" (the trainer on every rank) or "sweep"."""
        return "train" if self.sweep is None else "sweep"

    @property
    def tasks_per_node(self) -> int:
        c = self.cluster
        return c.gpus_per_node if c.gpus_per_node else (c.tasks_per_node or 1)

    @property
    def world_size(self) -> int:
        return self.job.nodes * self.tasks_per_node

    @property
    def time_limit_s(self) -> int:
        return parse_time_limit(self.job.time_limit or self.cluster.time_limit)


Key = tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Command-line overrides: key=value, typed by the schema
# --------------------------------------------------------------------------------------------


def _unwrap_optional(ann):
    if get_origin(ann) is Union or type(ann).__name__ == "UnionType":
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return ann, False


def _models_in(ann) -> list[type[BaseModel]]:
    """The pydantic models an annotation stands for (one, or each member of a union)."""
    base, _ = _unwrap_optional(ann)
    members = (
        get_args(base)
        if (get_origin(base) is Union or type(base).__name__ == "UnionType")
        else (base,)
    )
    return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]


def _fields_of(models: list[type[BaseModel]]) -> list[str]:
    return list(dict.fromkeys(f for m in models for f in m.model_fields))


def schema_type(key: Key):
    """The annotation a dotted key points at, or raise ConfigError for an unknown key."""
    ann: Any = LaunchConfig
    for i, part in enumerate(key):
        base, _ = _unwrap_optional(ann)
        models = _models_in(ann)
        if models:
            owner = next((m for m in models if part in m.model_fields), None)
            if owner is None:
                here = ".".join(key[:i]) or "(top level)"
                options = _fields_of(models)
                hint = _did_you_mean(part, options)
                raise ConfigError(
                    "command line",
                    ".".join(key),
                    f"unknown key{hint}",
                    f"keys under {here}: {', '.join(options)}",
                )
            ann = owner.model_fields[part].annotation
        elif get_origin(base) is dict:
            ann = get_args(base)[1]
        else:
            raise ConfigError(
                "command line",
                ".".join(key),
                f"{'.'.join(key[:i])} is a single value and has no sub-keys",
                f"write {'.'.join(key[:i])}=VALUE",
            )
    return ann


def _is_text(ann) -> bool:
    base, _ = _unwrap_optional(ann)
    if base in (str, Path):
        return True
    if get_origin(base) is Literal:
        return all(isinstance(a, str) for a in get_args(base))
    return False


def _models_at(loc: Key) -> list[type[BaseModel]]:
    """The schema model(s) at a location (several where the schema has a union)."""
    ann: Any = LaunchConfig
    for part in loc:
        owner = next((m for m in _models_in(ann) if part in m.model_fields), None)
        if owner is None:
            return []
        ann = owner.model_fields[part].annotation
    return _models_in(ann)


def _fields_at(loc: Key) -> list[str]:
    """The keys allowed at a location of the schema (for 'did you mean')."""
    return _fields_of(_models_at(loc))
