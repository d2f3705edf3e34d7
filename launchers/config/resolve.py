"""Resolution: the layers of a fresh submit (preset, benchmark row, profile, files, command
line) or of a resume (the saved config.yaml, files, command line) into one checked LaunchConfig."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from bionemo import rundir
from launchers.config.checks import _check, _translate
from launchers.config.errors import ConfigError, _did_you_mean
from launchers.config.layers import (
    Layer,
    _get,
    _leaves,
    _src,
    check_utf8,
    cli_layer,
    file_layer,
    merge,
)
from launchers.config.schema import (
    FP8_RECIPES,
    STRATEGIES,
    BenchmarkTable,
    Key,
    LaunchConfig,
    comma_list,
)
from launchers.config.yaml_io import label, load_yaml_file
from launchers.paths import CONFIGS, REPO_ROOT


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
        raise ConfigError(
            source,
            key,
            f"unknown {kind[:-1]} {name!r}" + _did_you_mean(name, known),
            "known: " + ", ".join(known),
        )
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
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    extra_layers: Sequence[Path] = (),
    options: Sequence[tuple[str, str, Any]] = (),
    kind: str = "train",
    base: dict | None = None,
    now: datetime | None = None,
) -> Resolved:
    """Resolve the layers into one validated LaunchConfig (nothing is written).

    `base` replaces the preset/table/profile layers with an already resolved config (resume).
    `kind` "sweep" adds the sweep section (its defaults); "train" refuses one.
    """
    upper = _upper_layers(
        config_files,
        extra_layers,
        overrides,
        options,
        kind,
        {"model": model, "cluster": cluster, "nodes": nodes, "backend": backend},
    )
    if base is None:
        return _resolve_fresh(upper, now or datetime.now(timezone.utc))
    if kind == "sweep":
        upper = upper[1:]  # the saved config has its sweep section
    return _resolve_resume(base, upper)


def _upper_layers(
    config_files, extra_layers, overrides, options, kind: str, flags: dict[str, Any]
) -> list[Layer]:
    """The layers above the preset (or the saved config): files, then the command line."""
    user = [file_layer(Path(f), "--config") for f in config_files]
    user += [file_layer(Path(f), "(defaults)") for f in extra_layers]
    upper = user + [cli_layer(flags, list(overrides), list(options))]
    if kind == "sweep":
        upper.insert(0, Layer("(sweep defaults)", _sweep_defaults(options)))
    else:
        _, sweep_src = _highest(upper, ("sweep",))
        if sweep_src is not None:
            raise ConfigError(
                sweep_src,
                "sweep",
                "sweep settings belong to a sweep job",
                "run `python -m launchers sweep` (make sweep BACKEND=...), or remove them",
            )
    return upper


def _sweep_defaults(options) -> dict:
    """The sweep's own layer, above the preset, table and profile, below --config files and the
    command line. Where --strategy/--fp8 are searched, the config the trials start from holds
    their first value, so a setting that needs it (parallel.fp8_all_gather needs FSDP and
    tensorwise FP8) is judged with it, not with the table row's; every other combination is
    checked by checks._check_sweep_variants."""
    data: dict = {"sweep": {}, "job": {"experiment": "sweep"}}
    searched = {key: value for _, key, value in options if value is not None}
    for key, section, name, known in (
        ("sweep.strategies", "parallel", "data_parallel", STRATEGIES),
        ("sweep.fp8", "train", "fp8", FP8_RECIPES),
    ):
        names = comma_list(searched.get(key))
        first = names[0] if isinstance(names, list) and names else None
        if first in known:  # an unknown name is the sweep key's error, with its own message
            data.setdefault("trainer", {}).setdefault(section, {})[name] = first
    return data


def _resolve_fresh(upper: list[Layer], now: datetime) -> Resolved:
    """A new run: model preset < benchmark table row < cluster profile < files < command line;
    then every implicit choice made explicit (_fill_defaults)."""
    model_name, model_src = _highest(upper, ("job", "model"))
    if not model_name:
        raise ConfigError(
            "command line",
            "job.model",
            "no model given",
            "pass --model NAME; known: " + ", ".join(known_names("models")),
        )
    cluster_name, cluster_src = _highest(upper, ("job", "cluster"))
    cluster_name = cluster_name or "local"
    if not isinstance(model_name, str) or not isinstance(cluster_name, str):
        raise ConfigError(
            model_src or cluster_src or "command line",
            "job.model",
            "must be a name",
            "pass --model NAME --cluster NAME",
        )
    preset = file_layer(_preset_path("models", model_name, "job.model", model_src), "job.model")
    profile_path = _preset_path("clusters", cluster_name, "job.cluster", cluster_src or "(default)")
    profile = file_layer(profile_path, "job.cluster")
    # the profile's name is its file name unless it says otherwise
    profile.data.setdefault("cluster", {}).setdefault("name", profile_path.stem)

    gpu_type, gpu_src = _highest([profile] + upper, ("cluster", "gpu_type"))
    if not gpu_type:
        raise ConfigError(
            label(profile_path),
            "cluster.gpu_type",
            "missing",
            "set the GPU type (known: " + ", ".join(known_names("benchmarks")) + ")",
        )
    found = load_table(str(gpu_type))
    if found is None:
        known = known_names("benchmarks")
        raise ConfigError(
            gpu_src,
            "cluster.gpu_type",
            f"unknown GPU type {gpu_type!r}" + _did_you_mean(str(gpu_type), known),
            f"known: {', '.join(known)} (a new type needs configs/benchmarks/{gpu_type}.yaml)",
        )
    table_path, table = found
    model_key = Path(model_name).stem
    row = table.rows.get(model_key)
    table_layer = Layer(
        f"{label(table_path)} (row {model_key})", {"trainer": row.trainer_layer()} if row else {}
    )
    layers = [preset, table_layer, profile] + upper
    cfg, origins = _validate(layers)

    default_run = cfg.job.run is None
    before = {s: dict(getattr(cfg, s).__dict__) for s in ("job", "cluster")}
    _fill_defaults(cfg, now)
    derived: dict[tuple[str, ...], Any] = {
        (s, k): v
        for s, old in before.items()
        for k, v in old.items()
        if getattr(getattr(cfg, s), k) != v
    }
    warnings: list[str] = []
    _check(cfg, origins, table, row, table_layer.source, warnings)
    return Resolved(
        cfg, origins, [layer.source for layer in layers], warnings, table, default_run, derived
    )


def _resolve_resume(base: dict, upper: list[Layer]) -> Resolved:
    """An existing run: its saved config.yaml < files < command line. Nothing is re-derived; the
    benchmark table only feeds the checks."""
    layers = [Layer(rundir.CONFIG, base)] + upper
    cfg, origins = _validate(layers)
    found = load_table(cfg.cluster.gpu_type)
    if found is None:
        raise ConfigError(
            _src(origins, ("cluster", "gpu_type")),
            "cluster.gpu_type",
            f"unknown GPU type {cfg.cluster.gpu_type!r}",
            "known: " + ", ".join(known_names("benchmarks")),
        )
    table_path, table = found
    row = table.rows.get(cfg.trainer.model.name)
    warnings: list[str] = []
    _check(cfg, origins, table, row, label(table_path), warnings)
    return Resolved(cfg, origins, [layer.source for layer in layers], warnings, table)


def _validate(layers: list[Layer]) -> tuple[LaunchConfig, dict[Key, str]]:
    """Merge the layers and validate the result against the schema."""
    merged, origins = merge(layers)
    # Text no file can hold: YAML's "\udcff" escape (the pure-Python parser, used without libyaml,
    # accepts it) or a caller's undecoded bytes (main() refuses argv's before this).
    for key in _leaves(merged):
        value = _get(merged, key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                check_utf8(item, _src(origins, key), ".".join(key))
    try:
        return LaunchConfig.model_validate(merged), origins
    except ValidationError as e:
        raise _translate(e, origins) from None


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
