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

The package imports no torch and no trainer code beyond the torch-free `bionemo.config`. Its
modules, lowest first (each imports only those above it):

    errors    ConfigError
    yaml_io   reading YAML (duplicate keys refused, times kept as text), writing config.yaml
    tables    Section (the base of every section), benchmark tables
    schema    the job, cluster and sweep sections, LaunchConfig (re-exports tables' names)
    layers    config files and the command line as layers; merging them
    checks    checks across sections; pydantic errors as ConfigErrors
    resolve   resolution of a fresh submit and of a resume

Callers import from `launchers.config`; the names below are its interface.
"""

from launchers.config.checks import _check, _translate
from launchers.config.errors import ConfigError, _did_you_mean
from launchers.config.layers import (
    Layer,
    _get,
    _leaves,
    _set,
    _src,
    check_utf8,
    cli_layer,
    file_layer,
    merge,
    parse_override,
)
from launchers.config.resolve import Resolved, known_names, load_table, resolve, run_names
from launchers.config.schema import (
    ALIASES,
    FP8_GPU_TYPES,
    NEMO_RUN_WORD,
    POLICIES,
    SECTIONS,
    TIME_FIX,
    BenchmarkRow,
    BenchmarkTable,
    ClusterConfig,
    JobConfig,
    Key,
    LaunchConfig,
    Section,
    SweepConfig,
    check_name,
    format_time_limit,
    parse_time_limit,
    schema_type,
)
from launchers.config.yaml_io import (
    _Dumper,
    _Loader,
    dump,
    label,
    load_resolved,
    load_yaml_file,
    load_yaml_text,
)
from launchers.paths import CONFIGS, REPO_ROOT

__all__ = [
    "ALIASES",
    "CONFIGS",
    "FP8_GPU_TYPES",
    "NEMO_RUN_WORD",
    "POLICIES",
    "REPO_ROOT",
    "SECTIONS",
    "TIME_FIX",
    "BenchmarkRow",
    "BenchmarkTable",
    "ClusterConfig",
    "ConfigError",
    "JobConfig",
    "Key",
    "LaunchConfig",
    "Layer",
    "Resolved",
    "Section",
    "SweepConfig",
    "_Dumper",
    "_Loader",
    "_check",
    "_did_you_mean",
    "_get",
    "_leaves",
    "_set",
    "_src",
    "_translate",
    "check_name",
    "check_utf8",
    "cli_layer",
    "dump",
    "file_layer",
    "format_time_limit",
    "known_names",
    "label",
    "load_resolved",
    "load_table",
    "load_yaml_file",
    "load_yaml_text",
    "merge",
    "parse_override",
    "parse_time_limit",
    "resolve",
    "run_names",
    "schema_type",
]
