"""The launcher's configuration: the `job` and `cluster` sections, and how layers resolve into one.

A resolved configuration has three sections, written to `<run_dir>/config.yaml`:

    job:      what to run and how big: model, cluster, backend, nodes, time limit, names...
    cluster:  the cluster profile: partition, GPUs per node, container, environment, ...
    trainer:  bionemo.config.TrainerConfig, what the trainer reads

and a fourth, `sweep`, for a micro-batch sweep job (`python -m launchers sweep`; SweepConfig).

Resolution order (later layers win, key by key):

    1. model preset         configs/models/<job.model>.yaml
    2. benchmark table row  configs/benchmarks/<cluster.gpu_type>.yaml, the row of <job.model>
    3. cluster profile      configs/clusters/<job.cluster>.yaml
    4. user config files    --config FILE (in the order given)
       (`debug` adds configs/debug.yaml here)
    5. command line         --model/--cluster/--nodes/--backend, then key=value overrides

Every file has the same shape (any of the three sections); benchmark tables are the exception and
are translated into a `trainer` layer (see BenchmarkRow). Unknown keys are errors everywhere, and
every error is a ConfigError whose message reads `<file>: <dotted.key>: <problem>; <fix>`.

This module imports no torch and no trainer code beyond the torch-free `bionemo.config`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bionemo.config import DuplicateKeyError, TrainerConfig, refuse_duplicate_keys
from launchers.paths import CONFIGS, REPO_ROOT

SECTIONS = ("job", "cluster", "sweep", "trainer")

# Short spellings accepted on the command line (documented in docs/launcher.md).
ALIASES = {
    "max_steps": "trainer.train.max_steps",
    "time_limit": "job.time_limit",
    "experiment": "job.experiment",
    "run": "job.run",
}


class ConfigError(Exception):
    """A configuration or invocation the launcher refuses. One line per problem:
    `<file>: <dotted.key>: <problem>; <fix>`."""

    def __init__(self, source: str, key: str, problem: str, fix: str = ""):
        self.source, self.key, self.problem, self.fix = source, key, problem, fix
        super().__init__(f"{source}: {key}: {problem}" + (f"; {fix}" if fix else ""))

    @classmethod
    def many(cls, errors: list["ConfigError"]) -> "ConfigError":
        if len(errors) == 1:
            return errors[0]
        err = cls(errors[0].source, errors[0].key, errors[0].problem, errors[0].fix)
        err.args = ("\n".join(str(e) for e in errors),)
        err.errors = errors
        return err


# --------------------------------------------------------------------------------------------
# YAML: YAML 1.1 reads 1:30:00 as the base-60 integer 5400; a time limit must stay a string.
# --------------------------------------------------------------------------------------------


# libyaml's parser when present (several times faster; the resolvers below still apply)
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Loader(_BaseLoader):
    def construct_document(self, node):
        refuse_duplicate_keys(node)  # a key given twice is an error, not "the last one wins"
        return super().construct_document(node)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_yaml_text(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except DuplicateKeyError as e:
        raise ConfigError(source, e.key, f"given twice (lines {e.lines[0]} and {e.lines[1]}), and "
                          "YAML would keep the last silently", "keep one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        position = getattr(e, "position", None)  # ReaderError: a character YAML refuses
        where = (f"line {mark.line + 1}" if mark else f"character {position}"
                 if position is not None else "(file)")
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, where, f"not valid YAML ({problem})", "fix the syntax") from None


def load_yaml_file(path: Path, key: str = "(file)") -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(label(path), key, f"cannot read ({e.strerror})",
                          "check the path") from None
    except UnicodeDecodeError as e:
        raise ConfigError(label(path), key, f"not UTF-8 text (byte {e.object[e.start]:#04x} at "
                          f"offset {e.start}): not a YAML file", "check the path") from None
    return load_yaml_text(text, label(path))


def label(path: Path | str) -> str:
    """How a file is named in messages: relative to the repository when it lives there."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------------------------
# Values with a syntax of their own
# --------------------------------------------------------------------------------------------

_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")
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
        raise ValueError(f"{value!r} is not a usable directory name; use 1-128 characters "
                         "without leading or trailing spaces")
    if _BAD_NAME.search(value):
        raise ValueError(f"{value!r} contains '/', '\\', '%', a control character or bytes "
                         f"that are not UTF-8; {fix}")
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
_RESERVED_ENV = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "LOCAL_WORLD_SIZE"}
_SBATCH_FLAG = re.compile(r"^--[a-z][a-z0-9-]*(?:=[^\s'\"\\`$;&|<>()]+)?$")


def _pattern_check(value: str | None, rx: re.Pattern, what: str, example: str) -> str | None:
    if value is not None and not rx.match(value):
        raise ValueError(f"{value!r} is not {what}; write e.g. {example}")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# The `job` section
# --------------------------------------------------------------------------------------------


class JobConfig(Section):
    """What to run, where and how big. Set by --model/--cluster/--nodes/--backend or job.* keys."""

    model: str  # preset name (configs/models/<model>.yaml) or a path to a preset file
    cluster: str = "local"  # profile name (configs/clusters/<cluster>.yaml) or a path
    # sbatch: render a batch script and submit it. submitit: a submitit Checkpointable job.
    # nemo_run: a NeMo-Run Experiment on run.SlurmExecutor. local: run the trainer on this
    # machine, in the foreground (one process per rank). docs/launcher.md, Backends.
    backend: Literal["sbatch", "submitit", "nemo_run", "local"] = "sbatch"
    nodes: int = Field(1, ge=1)
    experiment: str | None = None  # runs/<experiment>/...; default: trainer.model.family
    # runs/<experiment>/<run>; default: <model>-<nodes>n-<UTC timestamp>, and -02, -03, ... when
    # submits in the same second want that name (the run directory is created atomically)
    run: str | None = None
    time_limit: str | None = None  # SLURM syntax; default: cluster.time_limit
    dependency: str | None = None  # sbatch --dependency, e.g. afterok:1234
    constraint: str | None = None  # sbatch --constraint (node features)
    exclude: str | None = None  # sbatch --exclude (a host list)
    hold: bool = False  # submit held (sbatch --hold); release with `scontrol release <id>`
    # The requeue policy (launchers/requeue.py) stops after this many restarts of one job.
    max_restarts: int = Field(50, ge=0)
    # Check that trainer.data files exist before submitting. Turn off only when the data lives
    # where the submitting host cannot see it (e.g. only inside the container).
    check_data: bool = True

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
        return _pattern_check(v, re.compile(r"^[A-Za-z0-9_.,:&|*\[\]()\-]+$"),
                              "a SLURM constraint expression", "h100&ib")


# --------------------------------------------------------------------------------------------
# The `cluster` section (a cluster profile)
# --------------------------------------------------------------------------------------------


class ClusterConfig(Section):
    """A cluster profile: configs/clusters/<name>.yaml, section `cluster`."""

    name: str  # the profile's name; set from the file name
    # The bundled local cluster (launchers/cluster.py): submit starts it when it is down and
    # talks to it through its own SLURM_CONF.
    bundled: bool = False
    partition: str | None = None  # sbatch --partition; null: the cluster's default
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    # Selects the benchmark table configs/benchmarks/<gpu_type>.yaml (a100_80gb, h100_80gb, cpu).
    gpu_type: str
    gpus_per_node: int = Field(0, ge=0)  # > 0: one rank per GPU, --gpus-per-node is rendered
    tasks_per_node: int | None = Field(None, ge=1)  # ranks per node without GPUs (default 1)
    cpus_per_task: int = Field(1, ge=1)  # CPUs per rank (sbatch and srun --cpus-per-task)
    time_limit: str = "01:00:00"  # default job.time_limit (SLURM syntax)
    # Seconds before the time limit at which SLURM sends trainer.train.stop_signal to the ranks
    # (sbatch --signal=<sig>@<lead>). SLURM checks about once a minute, so it may come up to
    # 60 s earlier. The trainer must save and exit within the lead time.
    signal_lead_s: int = Field(120, gt=0)
    exclusive: bool = False  # sbatch --exclusive: whole nodes
    container_image: str | None = None  # pyxis --container-image (enables the pyxis flags)
    container_mounts: list[str] = []  # pyxis --container-mounts, each SRC:DST[:FLAGS]
    container_workdir: str | None = None  # pyxis --container-workdir; default: workdir
    # Where the job runs (the repository checkout, as the compute nodes see it); relative paths
    # below (python, runs_root) are relative to it. null: this repository.
    workdir: str | None = None
    python: str = "python3"  # the interpreter that runs the trainer (inside the container)
    # The batch host's interpreter for the requeue decision (stdlib only); default: `python`
    # without a container, python3 with one.
    host_python: str | None = None
    env: dict[str, str] = {}  # exported before srun; never secrets (see docs/launcher.md)
    setup: list[str] = []  # shell lines run before srun (e.g. `module load ...`), verbatim
    srun_args: list[str] = []  # extra srun flags, e.g. --mpi=pmix
    sbatch_args: list[str] = []  # extra #SBATCH flags, e.g. --mem=0
    runs_root: str = "runs"  # run directories live in <runs_root>/<experiment>/<run>

    @field_validator("partition", "account", "qos")
    @classmethod
    def _word(cls, v):
        return _pattern_check(v, _SLURM_WORD, "a SLURM name (letters, digits, _.,:+-)",
                              "gpu or batch,backfill")

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
                raise ValueError(f"{k!r} is not an environment variable name; use letters, "
                                 "digits and _")
            if _SECRET.search(k):
                raise ValueError(
                    f"{k} looks like a secret, and secrets are never written into configs or "
                    "scripts; export it in the shell that submits (the job inherits it)")
            if k in _RESERVED_ENV or k.startswith("SLURM_"):
                raise ValueError(f"{k} is set by the batch script or SLURM; remove it from "
                                 "cluster.env")
            if isinstance(val, bool) or val is None:
                raise ValueError(f"{k}: give the value as a quoted string, e.g. {k}: \"1\"")
            out[k] = str(val) if isinstance(val, (int, float)) else val
        return out

    @field_validator("container_mounts")
    @classmethod
    def _mounts(cls, v):
        for m in v:
            if "," in m or not re.match(r"^[^\s:]+(:[^\s:]+){0,2}$", m):
                raise ValueError(f"{m!r} is not one pyxis mount; write SRC[:DST[:FLAGS]], one "
                                 "list item per mount")
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
            raise ValueError(f"{v!r} contains '%' or '\\', which SLURM reads as file-name "
                             "patterns; choose a directory without them")
        return v

    @field_validator("setup", "python", "host_python", "workdir", "container_image",
                     "container_workdir", "runs_root", "srun_args")
    @classmethod
    def _one_line(cls, v):
        for item in v if isinstance(v, list) else [v]:
            if item is not None and (not item or re.search(r"[\x00-\x1f]", item)):
                raise ValueError(f"{item!r} is empty or spans lines; give one line")
        return v


# --------------------------------------------------------------------------------------------
# The `sweep` section (a micro-batch sweep job)
# --------------------------------------------------------------------------------------------

POLICIES = ("none", "selective", "full")  # = benchmarks.sweep.POLICIES, most memory first


class SweepConfig(Section):
    """A micro-batch sweep in ONE allocation (`python -m launchers sweep`, docs/sweep.md): the
    batch script runs `python -m benchmarks.sweep --inside-allocation` once, and every trial is an
    srun step of the job. Trials start from the resolved `trainer` section; the sweep's
    tensor-parallel size, memory cap and compile switch are trainer.parallel.tensor,
    trainer.train.memory_cap_gib and trainer.train.compile (flags --tp, --memory-cap-gib,
    --compile). A trial spans all job.nodes nodes."""

    # Ranks per node of each trial (GPUs per node); default: the profile's ranks per node.
    gpus_per_trial: int | None = Field(None, ge=1)
    min: int = Field(1, ge=1)  # smallest micro batch tried
    max: int = Field(512, ge=1)  # largest micro batch tried
    warmup_steps: int = Field(3, ge=0)  # steps dropped before timing
    steps: int = Field(10, ge=1)  # timed steps per trial
    # activation_checkpointing policies swept, in this order (each starts where the last ended)
    recompute: list[Literal["none", "selective", "full"]] = list(POLICIES)
    gpu_name: str | None = None  # results and table name, e.g. h100_80gb; default: detected
    write_table: bool = False  # update the model's row in <tables>/<gpu>.yaml
    # CPU trials only: address-space limit (RLIMIT_AS) of every trial process, a real OOM
    cpu_memory_limit_gib: float | None = Field(None, gt=0)
    trial_timeout_s: float = Field(1800, gt=0)  # a trial running longer counts as hung
    # Results: <out>/<gpu>/<model>.*, copied into <run_dir>/results. Relative to cluster.workdir.
    out: str = "benchmarks/results"
    tables: str = "configs/benchmarks"  # benchmark tables for write_table, relative to workdir

    @field_validator("recompute", mode="before")
    @classmethod
    def _policies(cls, v):
        if isinstance(v, str):  # --recompute none,selective
            v = [x.strip() for x in v.split(",") if x.strip()]
        if isinstance(v, list):
            if not v:
                raise ValueError("no policy given; list some of none, selective, full")
            if len(set(v)) != len(v):
                raise ValueError(f"{v} repeats a policy; list each of none, selective, full once")
        return v

    @field_validator("recompute")
    @classmethod
    def _order(cls, v):
        return [x for x in POLICIES if x in v]  # most memory first: the search relies on it

    @field_validator("gpu_name")
    @classmethod
    def _gpu_name(cls, v):
        return _pattern_check(v, re.compile(r"^[a-z0-9_.-]+$"),
                              "a table name (lower-case letters, digits, _.-)", "h100_80gb")

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
    sweep: SweepConfig | None = None  # a sweep job (`python -m launchers sweep`); absent: training
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


# --------------------------------------------------------------------------------------------
# Benchmark tables
# --------------------------------------------------------------------------------------------


class BenchmarkRow(Section):
    micro_batch_size: int = Field(gt=0)  # -> trainer.train.micro_batch_size
    engine: Literal["torch", "megatron"] | None = None  # -> trainer.train.engine (TP/PP > 1: megatron)
    tensor_parallel: int = Field(1, gt=0)  # -> trainer.parallel.tensor
    pipeline_parallel: int = Field(1, gt=0)  # -> trainer.parallel.pipeline
    global_batch_size: int | None = Field(None, gt=0)  # -> trainer.train.global_batch_size
    gpus: int = Field(0, ge=0)  # the job size the row was measured at (reference only)
    max_micro_batch_size: int | None = Field(None, gt=0)  # larger micro batches draw a warning
    measured: bool | None = None  # default: the table's flag
    source: str | None = None  # default: the table's source
    date: str | None = None  # when the row was measured (written by `make sweep --write-table`)
    notes: str | None = None

    def trainer_layer(self) -> dict:
        train = {"micro_batch_size": self.micro_batch_size,
                 "global_batch_size": self.global_batch_size}
        if self.engine is not None:
            train["engine"] = self.engine
        return {
            "train": train,
            "parallel": {"tensor": self.tensor_parallel, "pipeline": self.pipeline_parallel},
        }


# GPU types (cluster.gpu_type prefixes) with FP8 tensor cores: Hopper and Blackwell.
FP8_GPU_TYPES = ("h100", "h200", "h800", "gh200", "b100", "b200", "gb200")


class BenchmarkTable(Section):
    gpu_type: str
    kind: Literal["gpu", "cpu"]  # cpu: the profile must have gpus_per_node 0; gpu: > 0
    measured: bool
    source: str
    rows: dict[str, BenchmarkRow]


def known_names(folder: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / folder).glob("*.yaml"))


def load_table(gpu_type: str) -> tuple[Path, BenchmarkTable] | None:
    path = CONFIGS / "benchmarks" / f"{gpu_type}.yaml"
    if not re.match(r"^[A-Za-z0-9_.-]+$", gpu_type) or not path.is_file():
        return None
    raw = load_yaml_file(path)
    try:
        return path, BenchmarkTable.model_validate(raw)
    except ValidationError as e:
        raise _translate(e, {}, default_source=label(path), prefix=()) from None


# --------------------------------------------------------------------------------------------
# Layers and merging
# --------------------------------------------------------------------------------------------

Key = tuple[str, ...]


@dataclass
class Layer:
    source: str  # label used in messages
    data: dict
    origins: dict[Key, str] = field(default_factory=dict)  # leaf key -> label (when finer)


def _leaves(d: dict, prefix: Key = ()) -> list[Key]:
    out = []
    for k, v in d.items():
        key = prefix + (str(k),)
        if isinstance(v, dict) and v:
            out.extend(_leaves(v, key))
        else:
            out.append(key)
    return out


def merge(layers: list[Layer]) -> tuple[dict, dict[Key, str]]:
    """Deep-merge layers (dicts merge key by key; anything else is replaced) and remember which
    layer set each leaf."""
    merged: dict = {}
    origins: dict[Key, str] = {}
    for layer in layers:
        _merge_into(merged, layer.data)
        for key in _leaves(layer.data):
            origins.pop(key, None)  # re-insert: the most recently set keys come last
            origins[key] = layer.origins.get(key, layer.source)
    return merged, origins


def _merge_into(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge_into(dst[k], v)
        else:
            dst[k] = _copy(v)


def _copy(v):
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _get(d: dict, key: Key):
    for part in key:
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, key: Key, value) -> None:
    for part in key[:-1]:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[key[-1]] = value


def file_layer(path: Path, source_key: str) -> Layer:
    """A config file: a mapping with any of the sections job, cluster, trainer."""
    src = label(path)
    if not Path(path).is_file():
        raise ConfigError(src, source_key, "no such file", "check the path")
    raw = load_yaml_file(path, source_key)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(src, "(top level)", "must be a mapping of sections",
                          "write `job:`, `cluster:` and/or `trainer:` sections")
    for k, v in raw.items():
        if k not in SECTIONS:
            raise ConfigError(src, str(k), "unknown section" + _did_you_mean(str(k), SECTIONS),
                              "a config file has only the sections job, cluster, trainer "
                              "(and sweep, for `python -m launchers sweep`)")
        if not isinstance(v, dict):
            raise ConfigError(src, str(k), "must be a mapping", f"write `{k}:` followed by keys")
    return Layer(src, raw)


def _did_you_mean(word: str, options) -> str:
    import difflib  # only on the error path
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
    members = get_args(base) if (get_origin(base) is Union
                                 or type(base).__name__ == "UnionType") else (base,)
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
                raise ConfigError("command line", ".".join(key), f"unknown key{hint}",
                                  f"keys under {here}: {', '.join(options)}")
            ann = owner.model_fields[part].annotation
        elif get_origin(base) is dict:
            ann = get_args(base)[1]
        else:
            raise ConfigError("command line", ".".join(key),
                              f"{'.'.join(key[:i])} is a single value and has no sub-keys",
                              f"write {'.'.join(key[:i])}=VALUE")
    return ann


def _is_text(ann) -> bool:
    base, _ = _unwrap_optional(ann)
    if base in (str, Path):
        return True
    if get_origin(base) is Literal:
        return all(isinstance(a, str) for a in get_args(base))
    return False


_SURROGATE = re.compile(r"[\ud800-\udfff]")  # how Python keeps argv bytes that are not UTF-8


def check_utf8(text: str, source: str, key: str) -> None:
    """Refuse text decoded from bytes that are not UTF-8: it cannot be written to config.yaml,
    the batch script or a file name that other tools read back."""
    def shown(t: str) -> str:
        return repr(t.encode("utf-8", "surrogateescape"))[2:-1]

    if _SURROGATE.search(text) or _SURROGATE.search(key):
        raise ConfigError(source, shown(key), f"'{shown(text)}' is not UTF-8 text",
                          "pass it in UTF-8 (a UTF-8 locale, or rename the file)")


def parse_override(item: str) -> tuple[Key, Any]:
    name, _, raw = item.partition("=")
    check_utf8(raw, "command line", ALIASES.get(name.strip(), name.strip()))
    if "=" not in item:
        raise ConfigError("command line", item, "not a key=value override",
                          "write e.g. trainer.train.max_steps=100 (see docs/launcher.md)")
    name = ALIASES.get(name.strip(), name.strip())
    key = tuple(name.split("."))
    if not name or any(not p for p in key):
        raise ConfigError("command line", name or "(empty)", "empty key",
                          "write e.g. trainer.train.max_steps=100")
    if key[0] not in SECTIONS:
        raise ConfigError("command line", name, "unknown key" + _did_you_mean(key[0], SECTIONS),
                          "keys start with job., cluster., trainer. or sweep. (aliases: "
                          + ", ".join(ALIASES) + ")")
    if len(key) == 1:
        raise ConfigError("command line", name, "a whole section cannot be set",
                          f"set one key, e.g. {name}.KEY=VALUE")
    ann = schema_type(key)
    _, optional = _unwrap_optional(ann)
    if _is_text(ann) and not (optional and raw.strip() in ("null", "~")):
        return key, raw  # a run name like 0100 or a time like 1:00:00 stays text
    return key, load_yaml_text(raw, "command line") if raw.strip() else None


def cli_layer(flags: dict[str, Any], overrides: list[str],
              options: list[tuple[str, str, Any]] = ()) -> Layer:
    """The command line: flags (--model, ...) first, then other options given as (flag, dotted
    key, value) (the sweep's --min, --tp, ...), then key=value overrides in order."""
    data: dict = {}
    origins: dict[Key, str] = {}
    for name, value in flags.items():
        if value is not None:
            _set(data, ("job", name), value)
            origins[("job", name)] = f"--{name}"
    for flag, dotted, value in options:
        if value is not None:
            _set(data, tuple(dotted.split(".")), value)
            origins[tuple(dotted.split("."))] = flag
    for item in overrides:
        key, value = parse_override(item)
        _set(data, key, value)
        # replacing a mapping replaces the origins of everything under it
        for k in list(origins):
            if k[: len(key)] == key:
                del origins[k]
        origins[key] = "command line"
    return Layer("command line", data, origins)


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


@dataclass
class Resolved:
    config: LaunchConfig
    origins: dict[Key, str]  # which layer set each key (for messages)
    layers: list[str]  # sources, lowest first
    warnings: list[str]
    table: BenchmarkTable
    # job.run was chosen by _fill_defaults: submit may take the next of run_names() when
    # another submit created that directory first
    default_run: bool = False
    # The keys _fill_defaults set or rewrote, with their values before it ran (None: unset): a
    # recipe (launchers/recipe.py) keeps these, so each submit of it derives them afresh.
    derived: dict[Key, Any] = field(default_factory=dict)


def _preset_path(kind: str, name: str, key: str, source: str) -> Path:
    """configs/<kind>/<name>.yaml, or `name` itself when it is a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        p = Path(name)
        if not p.is_file():
            raise ConfigError(source, key, f"no such file {name!r}", "check the path")
        return p
    p = CONFIGS / kind / f"{name}.yaml"
    if not re.match(r"^[A-Za-z0-9_.-]+$", name) or not p.is_file():
        known = known_names(kind)
        raise ConfigError(source, key, f"unknown {kind[:-1]} {name!r}"
                          + _did_you_mean(name, known), "known: " + ", ".join(known))
    return p


def _highest(layers: list[Layer], key: Key):
    """The value of `key` in the highest layer that sets it, and that layer's label."""
    for layer in reversed(layers):
        parent = _get(layer.data, key[:-1])
        if isinstance(parent, dict) and key[-1] in parent:
            return parent[key[-1]], layer.origins.get(key, layer.source)
    return None, None


def resolve(
    *,
    model: str | None = None,
    cluster: str | None = None,
    nodes: int | None = None,
    backend: str | None = None,
    config_files: list[str | Path] = (),
    overrides: list[str] = (),
    extra_layers: list[Path] = (),
    options: list[tuple[str, str, Any]] = (),
    kind: str = "train",
    base: dict | None = None,
    now: datetime | None = None,
) -> Resolved:
    """Resolve the layers into one validated LaunchConfig (nothing is written).

    `base` replaces the preset/table/profile layers with an already resolved config (resume).
    `kind` "sweep" adds the sweep section (its defaults); "train" refuses one.
    """
    user = [file_layer(Path(f), "--config") for f in config_files]
    user += [file_layer(Path(f), "(defaults)") for f in extra_layers]
    cli = cli_layer({"model": model, "cluster": cluster, "nodes": nodes, "backend": backend},
                    list(overrides), list(options))
    upper = user + [cli]
    if kind == "sweep":
        upper.insert(0, Layer("(sweep defaults)", {"sweep": {}, "job": {"experiment": "sweep"}}))
    else:
        _, sweep_src = _highest(upper, ("sweep",))
        if sweep_src is not None:
            raise ConfigError(sweep_src, "sweep", "sweep settings belong to a sweep job",
                              "run `python -m launchers sweep` (make sweep BACKEND=...), or "
                              "remove them")

    if base is not None:
        if kind == "sweep":
            upper = upper[1:]  # the saved config has its sweep section
        lower = [Layer("config.yaml", base)]
        layers = lower + upper
        merged, origins = merge(layers)
    else:
        model_name, model_src = _highest(upper, ("job", "model"))
        if not model_name:
            raise ConfigError("command line", "job.model", "no model given",
                              "pass --model NAME; known: " + ", ".join(known_names("models")))
        cluster_name, cluster_src = _highest(upper, ("job", "cluster"))
        cluster_name = cluster_name or "local"
        if not isinstance(model_name, str) or not isinstance(cluster_name, str):
            raise ConfigError(model_src or cluster_src or "command line", "job.model",
                              "must be a name", "pass --model NAME --cluster NAME")
        preset = file_layer(_preset_path("models", model_name, "job.model", model_src), "job.model")
        profile_path = _preset_path("clusters", cluster_name, "job.cluster",
                                    cluster_src or "(default)")
        profile = file_layer(profile_path, "job.cluster")
        # the profile's name is its file name unless it says otherwise
        profile.data.setdefault("cluster", {}).setdefault("name", profile_path.stem)

        gpu_type, gpu_src = _highest([profile] + upper, ("cluster", "gpu_type"))
        if not gpu_type:
            raise ConfigError(label(profile_path), "cluster.gpu_type", "missing",
                              "set the GPU type (known: " + ", ".join(known_names("benchmarks"))
                              + ")")
        found = load_table(str(gpu_type))
        if found is None:
            known = known_names("benchmarks")
            raise ConfigError(gpu_src, "cluster.gpu_type", f"unknown GPU type {gpu_type!r}"
                              + _did_you_mean(str(gpu_type), known),
                              f"known: {', '.join(known)} (a new type needs "
                              f"configs/benchmarks/{gpu_type}.yaml)")
        table_path, table = found
        model_key = Path(model_name).stem
        row = table.rows.get(model_key)
        table_layer = Layer(f"{label(table_path)} (row {model_key})",
                            {"trainer": row.trainer_layer()} if row else {})
        layers = [preset, table_layer, profile] + upper
        merged, origins = merge(layers)

    # Text no file can hold: YAML's "\udcff" escape (the pure-Python parser, used without libyaml,
    # accepts it) or a caller's undecoded bytes (main() refuses argv's before this).
    for key in _leaves(merged):
        value = _get(merged, key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                check_utf8(item, _src(origins, key), ".".join(key))
    try:
        cfg = LaunchConfig.model_validate(merged)
    except ValidationError as e:
        raise _translate(e, origins) from None

    default_run = base is None and cfg.job.run is None
    derived: dict[Key, Any] = {}
    if base is None:
        before = {s: dict(getattr(cfg, s).__dict__) for s in ("job", "cluster")}
        _fill_defaults(cfg, now or datetime.now(timezone.utc))
        derived = {(s, k): v for s, old in before.items() for k, v in old.items()
                   if getattr(getattr(cfg, s), k) != v}
        table_source = table_layer.source
    else:  # resuming: the table only feeds the checks
        found = load_table(cfg.cluster.gpu_type)
        if found is None:
            raise ConfigError(_src(origins, ("cluster", "gpu_type")), "cluster.gpu_type",
                              f"unknown GPU type {cfg.cluster.gpu_type!r}",
                              "known: " + ", ".join(known_names("benchmarks")))
        table_path, table = found
        row = table.rows.get(cfg.trainer.model.name)
        table_source = label(table_path)
    warnings: list[str] = []
    _check(cfg, origins, table, row, table_source, warnings)
    return Resolved(cfg, origins, [layer.source for layer in layers], warnings, table,
                    default_run, derived)


def _fill_defaults(cfg: LaunchConfig, now: datetime) -> None:
    """Make every implicit choice explicit, so the written config says what ran."""
    job, cl = cfg.job, cfg.cluster
    if job.experiment is None:
        job.experiment = cfg.trainer.model.family
    if job.run is None:
        stamp = now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        job.run = f"{Path(job.model).stem}-{job.nodes}n-{stamp}"  # run_names() adds -02, ...
    if job.time_limit is None:
        job.time_limit = cl.time_limit
    workdir = Path(os.path.expanduser(cl.workdir)) if cl.workdir else REPO_ROOT
    cl.workdir = str(workdir)
    if "/" in cl.python and not Path(cl.python).is_absolute():
        cl.python = str(workdir / cl.python)
    if cl.host_python is None:
        cl.host_python = "python3" if cl.container_image else cl.python
    elif "/" in cl.host_python and not Path(cl.host_python).is_absolute():
        cl.host_python = str(workdir / cl.host_python)
    if cl.container_image and cl.container_workdir is None:
        cl.container_workdir = cl.workdir
    root = Path(os.path.expanduser(cl.runs_root))
    cl.runs_root = str(root if root.is_absolute() else workdir / root)
    sw = cfg.sweep
    if sw is not None:
        if sw.gpus_per_trial is None:
            sw.gpus_per_trial = cfg.tasks_per_node
        for name in ("out", "tables"):
            folder = Path(os.path.expanduser(getattr(sw, name)))
            setattr(sw, name, str(folder if folder.is_absolute() else workdir / folder))


def run_names(default: str):
    """Candidates for a default run name, in order: the name, then -02 ... -99 (zero-padded, so
    they sort in submission order). Submits in the same second create their run directories
    with mkdir, which succeeds for exactly one of them; the others take the next candidate."""
    yield default
    for i in range(2, 100):
        yield f"{default}-{i:02d}"


def _src(origins: dict[Key, str], key: Key, default: str = "resolved config") -> str:
    """The label of the layer that set `key` (or the closest key above or below it)."""
    for k in (key, *(key[:i] for i in range(len(key) - 1, 0, -1))):
        if k in origins:
            return origins[k]
    below = [v for k, v in origins.items() if k[: len(key)] == key]
    return below[-1] if below else default


def _check(cfg: LaunchConfig, origins, table: BenchmarkTable, row: BenchmarkRow | None,
           table_source: str, warnings: list[str]) -> None:
    """Checks across sections (the schema has checked each value already)."""
    errors: list[ConfigError] = []
    job, cl, tr = cfg.job, cfg.cluster, cfg.trainer

    def err(key: str, problem: str, fix: str):
        errors.append(ConfigError(_src(origins, tuple(key.split("."))), key, problem, fix))

    # GPU type and GPU count agree
    if table.kind == "cpu" and cl.gpus_per_node:
        err("cluster.gpus_per_node", f"{cl.gpus_per_node} GPUs on a CPU gpu_type ({cl.gpu_type})",
            "set cluster.gpus_per_node=0 or a GPU type such as h100_80gb")
    if table.kind == "gpu" and not cl.gpus_per_node:
        err("cluster.gpus_per_node", f"0 GPUs per node with gpu_type {cl.gpu_type}",
            "set cluster.gpus_per_node to the GPUs of one node (one rank per GPU)")
    if cl.gpus_per_node and cl.tasks_per_node not in (None, cl.gpus_per_node):
        err("cluster.tasks_per_node",
            f"{cl.tasks_per_node} tasks but {cl.gpus_per_node} GPUs per node",
            "remove tasks_per_node: with GPUs the launcher runs one rank per GPU")
    # A SLURM job gets the GPUs it asks for (--gpus-per-node): none without cluster.gpus_per_node.
    # The local backend runs on this machine, whose GPUs it sees whatever the profile says.
    if not cl.gpus_per_node and job.backend != "local":
        if tr.train.device == "cuda":
            err("trainer.train.device", f"cuda, but cluster {cl.name} gives the job no GPUs "
                "(cluster.gpus_per_node 0)", "set cluster.gpus_per_node (and a GPU gpu_type), "
                "or trainer.train.device=cpu")
        elif tr.train.engine == "megatron":
            err("trainer.train.engine", f"megatron needs CUDA, but cluster {cl.name} gives the "
                "job no GPUs (cluster.gpus_per_node 0)", "use a GPU profile, or "
                "trainer.train.engine=torch")

    # Strategy and FP8 against the hardware (the schema checked them against engine and device)
    if tr.train.fp8 != "none" and not cl.gpu_type.lower().startswith(FP8_GPU_TYPES):
        err("trainer.train.fp8", f"{tr.train.fp8} needs FP8 tensor cores, which gpu_type "
            f"{cl.gpu_type} lacks", "set trainer.train.fp8=none, or use an H100/H200-class "
            "cluster profile")
    if tr.parallel.fsdp_cpu_offload and not cl.gpus_per_node:
        err("trainer.parallel.fsdp_cpu_offload", f"offloads GPU state, but cluster {cl.name} "
            "gives the job no GPUs", "remove the offload, or use a GPU cluster profile")
    if tr.parallel.data_parallel == "hsdp" and job.nodes < 2 and cfg.sweep is None:
        err("trainer.parallel.data_parallel", "hsdp replicates across nodes and this job has "
            "one node", "use trainer.parallel.data_parallel=fsdp, or --nodes 2 or more")

    # Time limit and warning lead
    limit = cfg.time_limit_s
    if cl.signal_lead_s >= limit:
        err("cluster.signal_lead_s",
            f"the warning lead {cl.signal_lead_s} s is not shorter than the time limit "
            f"{job.time_limit} ({limit} s)",
            f"lower cluster.signal_lead_s below {limit} or raise job.time_limit")
    elif cl.signal_lead_s + 60 >= limit:
        warnings.append(
            f"the warning signal may come as the job starts: SLURM sends it up to 60 s before "
            f"the lead ({cl.signal_lead_s} s) and the limit is {limit} s")

    # Backend
    if job.backend == "local" and cfg.sweep is not None:
        err("job.backend", "a sweep job runs in a SLURM allocation, not with the local backend",
            "choose --backend sbatch, submitit or nemo_run; for a sweep on this machine run "
            "`make sweep` without BACKEND (python -m benchmarks.sweep)")
    elif job.backend == "local" and job.nodes != 1:
        err("job.nodes", f"the local backend runs on this machine only, not on {job.nodes} nodes",
            "use job.nodes=1 (--nodes 1) or --backend sbatch")
    elif job.backend == "nemo_run":
        for key, value in (("cluster.runs_root", cl.runs_root), ("job.experiment", job.experiment),
                           ("job.run", job.run)):
            if not NEMO_RUN_WORD.match(value):
                err(key, f"{value!r} has characters NeMo-Run would pass to a shell unquoted "
                    "(it builds its mkdir/sbatch/srun command lines from the run directory)",
                    "use only letters, digits and _.,:+=@/- with --backend nemo_run, or use "
                    "--backend sbatch or submitit, which quote every value")

    if cfg.sweep is not None:  # a sweep job: its trials, not the job, have a parallel layout
        _check_sweep(cfg, err)
        if errors:
            raise ConfigError.many(errors)
        return

    # Parallel layout and batch arithmetic
    world = cfg.world_size
    tp, pp = tr.parallel.tensor, tr.parallel.pipeline
    if world % (tp * pp):
        err("trainer.parallel.tensor",
            f"tensor x pipeline = {tp} x {pp} does not divide the world size {world} "
            f"({job.nodes} nodes x {cfg.tasks_per_node} ranks)",
            "choose parallel sizes whose product divides the world size, or change the nodes")
    elif tr.model.num_attention_heads % tp:
        err("trainer.parallel.tensor",
            f"{tp} does not divide trainer.model.num_attention_heads "
            f"{tr.model.num_attention_heads}",
            "choose a tensor-parallel size that divides the head count")
    else:
        dp = world // (tp * pp)
        mbs, gbs = tr.train.micro_batch_size, tr.train.global_batch_size
        if gbs is not None and gbs % (mbs * dp):
            per = mbs * dp
            nodes_ok = [n for n in range(1, 4 * job.nodes + 9)
                        if (n * cfg.tasks_per_node) % (tp * pp) == 0
                        and gbs % (mbs * n * cfg.tasks_per_node // (tp * pp)) == 0]
            near = sorted(nodes_ok, key=lambda n: abs(n - job.nodes))[:3]
            fix = (f"set trainer.train.global_batch_size to a multiple of {per} "
                   f"(e.g. {max(per, round(gbs / per) * per)}), or null for {per}")
            if near:
                fix += f"; or use --nodes {' / '.join(map(str, sorted(near)))}"
            err("trainer.train.global_batch_size",
                f"{gbs} is not a multiple of micro batch x data-parallel size = "
                f"{mbs} x {dp} = {per}", fix)
        if row and row.max_micro_batch_size and mbs > row.max_micro_batch_size:
            warnings.append(
                f"trainer.train.micro_batch_size {mbs} exceeds the largest that fit in "
                f"{table_source}: {row.max_micro_batch_size}")
        if not errors:
            try:
                tr.check_parallel(world)  # the trainer's own check, in case it knows more
            except ValueError as e:
                problem, _, fix = str(e).partition("; ")
                err("trainer.parallel", problem, fix or "see docs/launcher.md")
    if row is not None and not (row.measured if row.measured is not None else table.measured):
        warnings.append(f"{table_source} is unmeasured ({row.source or table.source})")
    if errors:
        raise ConfigError.many(errors)


def _check_sweep(cfg: LaunchConfig, err) -> None:
    """A sweep job's settings against the allocation. The trials' global batch is null (one micro
    batch per rank), so only their parallel layout is checked, at their own world size."""
    sw, cl, tr = cfg.sweep, cfg.cluster, cfg.trainer
    if sw.min > sw.max:
        err("sweep.min", f"{sw.min} is above sweep.max {sw.max}",
            "choose 1 <= --min <= --max")
    if sw.gpus_per_trial > cfg.tasks_per_node:
        err("sweep.gpus_per_trial",
            f"{sw.gpus_per_trial} ranks per node, but the allocation has {cfg.tasks_per_node} "
            f"per node (cluster {cl.name})",
            f"use --gpus-per-trial {cfg.tasks_per_node} or less")
    if sw.cpu_memory_limit_gib is not None and cl.gpus_per_node:
        err("sweep.cpu_memory_limit_gib", "is for CPU trials: CUDA reserves far more address "
            "space than any limit allows", "cap GPU memory with --memory-cap-gib instead")
    if sw.write_table and "none" not in sw.recompute:
        err("sweep.write_table", "tables describe the recompute policy 'none', which this sweep "
            "leaves out", "add none to --recompute, or drop --write-table")
    world = sw.gpus_per_trial * cfg.job.nodes
    tp, pp = tr.parallel.tensor, tr.parallel.pipeline
    if world % (tp * pp) or tr.model.num_attention_heads % tp:
        err("trainer.parallel.tensor",
            f"tensor x pipeline = {tp} x {pp} must divide a trial's world size {world} "
            f"({cfg.job.nodes} nodes x {sw.gpus_per_trial} ranks) and tensor the head count "
            f"{tr.model.num_attention_heads}", "choose --tp (and --gpus-per-trial) to fit")


# --------------------------------------------------------------------------------------------
# pydantic errors -> ConfigError
# --------------------------------------------------------------------------------------------


_KEY_FIRST = re.compile(r"^([a-z_]+\.[a-z_]+)\b")
_NESTED = re.compile(r"(?:^|; |Value error, )(data\.[\w.]+): (.+?)(?= \(model\.family|; data\.|$)")


def _nested_error(origins, loc: Key, msg: str, default_source: str,
                  family: str | None) -> ConfigError:
    source = _src(origins, loc, default_source)
    if msg.startswith("Extra inputs"):
        models = _models_at(loc[:-1])
        ours = [m for m in models if loc[-1] not in m.model_fields]  # the schema that refused it
        if len(ours) < len(models) and len(ours) == 1:  # another family's key
            return ConfigError(source, ".".join(loc),
                               "belongs to another model family's data section, not to "
                               + (family or ours[0].__name__) + "'s",
                               "set data keys for the model you run: "
                               + ", ".join(ours[0].model_fields))
        options = _fields_of(ours or models)
        return ConfigError(source, ".".join(loc), "unknown key" + _did_you_mean(loc[-1], options),
                           "keys here: " + ", ".join(options) if options else "remove it")
    return ConfigError(source, ".".join(loc), msg[0].lower() + msg[1:],
                       _fix_for(source, ".".join(loc)))


def _fix_for(source: str, key: str) -> str:
    if source == "command line":
        return f"pass a valid {key}=VALUE"
    if source.startswith("--"):
        return f"pass a valid {source} value"
    return f"fix the value in {source} or override it with {key}=VALUE"


def _translate(exc: ValidationError, origins, default_source: str = "resolved config",
               prefix: Key | None = None) -> ConfigError:
    errors = []
    for e in exc.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "(top level)"
        source = _src(origins, loc, default_source)
        kind, msg = e["type"], e["msg"]
        got = e.get("input")
        if kind == "extra_forbidden":
            options = _fields_at(loc[:-1])
            problem = "unknown key" + _did_you_mean(loc[-1], options)
            fix = f"keys here: {', '.join(options)}" if options else "remove it"
        elif kind == "missing":
            problem = "missing (no layer sets it)"
            fix = f"set it in a config file or pass {key}=VALUE"
            if loc[:2] == ("trainer", "train") and loc[-1] == "micro_batch_size":
                fix = ("add a row for the model to the cluster's benchmark table "
                       f"(configs/benchmarks/) or pass {key}=N")
        elif kind == "value_error" and _NESTED.search(msg):
            # the trainer validates its data section itself and names the keys in the message
            family = re.search(r"model\.family '(\w+)'", msg)
            for m in _NESTED.finditer(msg.removeprefix("Value error, ")):
                sub = loc + tuple(m.group(1).split("."))
                errors.append(_nested_error(origins, sub, m.group(2), default_source,
                                            family.group(1) if family else None))
            continue
        elif kind == "value_error":
            text = msg.removeprefix("Value error, ")
            problem, _, fix = text.partition("; ")
            fix = fix or f"fix {key}"
            # The trainer's cross-section checks start with the key they are about
            # ("parallel.tensor=2 ..."): name it in full.
            if (first := _KEY_FIRST.match(problem)) and loc == ("trainer",):
                key = f"trainer.{first.group(1)}"
                source = _src(origins, loc + tuple(first.group(1).split(".")), default_source)
            if "time limit" in problem or problem.endswith("is zero"):
                fix = TIME_FIX
        else:
            problem = f"{msg[0].lower()}{msg[1:]} (got {got!r})"
            fix = _fix_for(source, key)
        errors.append(ConfigError(source, key, problem, fix))
    return ConfigError.many(errors)


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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def dump(cfg: LaunchConfig, layers: list[str] = ()) -> str:
    """The text of <run_dir>/config.yaml (plain YAML; the comment lists the layers)."""
    head = "# Resolved by `python -m launchers`; the trainer reads the `trainer` section.\n"
    if layers:
        head += "# Layers, lowest first: " + " < ".join(layers) + "\n"
    data = cfg.model_dump(mode="json", exclude={"sweep"} if cfg.sweep is None else None)
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return head + body


def load_resolved(path: Path) -> dict:
    raw = load_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(label(path), "(top level)", "not a resolved config", "")
    return raw
