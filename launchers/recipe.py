"""Recipes: a resolved configuration written out as an editable, commented config file.

    python -m launchers recipe --model esm2_650m [--cluster C --nodes N key=value ...] --out my.yaml
    python -m launchers submit --config my.yaml           (make submit CONFIG=my.yaml)

A recipe sets every key of the resolved configuration, each with a comment naming the layer that
set it: model preset, benchmark table row, cluster profile, --config file, command line, or
default (the schema's). It is an ordinary --config file, and that is how it records the model:
job.model and job.cluster name the preset and profile as in any config, `submit` reads them from
the highest layer that sets them (this file, unless the command line names others), loads them
underneath, and the recipe, which sets every key, wins over them. So `submit --config my.yaml`
needs nothing else, the file reads back exactly as written, and key=value on the submit command
line still overrides it like any other file.

Keys that submit derives (`_fill_defaults`) keep the value the layers gave them, commented with
what submit makes of them: job.run stays null, so every submit of one recipe names a new run;
job.experiment, job.time_limit, cluster.workdir and cluster.host_python stay null (derived from
the family, the profile's time limit, the submitting checkout, cluster.python); relative paths
(cluster.python, cluster.runs_root) stay relative to cluster.workdir. A recipe thus moves between
checkouts and users.
"""

from __future__ import annotations

import json

import yaml

from launchers.config import Key, Resolved, _Dumper, _leaves, _set, _src, load_yaml_text

COMMENT_COLUMN = 48  # where origin comments start (longer lines put theirs one space after)


def data(resolved: Resolved) -> dict:
    """The recipe's values: the resolved config, derived keys as the layers gave them."""
    out = resolved.config.model_dump(mode="json", exclude={"sweep"})
    for key, value in resolved.derived.items():
        _set(out, key, value)
    return out


def origin(resolved: Resolved, key: Key) -> str:
    """The comment of one key: the layer that set it, and what submit derives from it."""
    layers = resolved.layers
    kinds = (
        {layers[0]: "model preset", layers[1]: "benchmark table", layers[2]: "cluster profile"}
        if len(layers) >= 4
        else {}
    )
    source = _src(resolved.origins, key, default="")
    if not source:
        text = "default"
    elif source in kinds:
        text = f"{kinds[source]} {source}"
    elif source == "command line" or source.startswith("--") and source != "--config":
        text = "command line" + ("" if source == "command line" else f" ({source})")
    else:
        text = f"--config {source}"
    if key in resolved.derived:
        filled = getattr(getattr(resolved.config, key[0]), key[1])  # derived keys: job.*, cluster.*
        if key == ("job", "run"):
            text += f"; at submit: a new name each time (like {filled})"
        else:
            text += f"; at submit: {filled}"
    return text


def _value(value) -> str:
    """One value as flow YAML that reads back as itself (JSON, which is YAML, when it would not)."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=1 << 30)
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    if "\n" in text or load_yaml_text(f"k: {text}", "recipe") != {"k": value}:
        text = json.dumps(value)
    return text


def text(resolved: Resolved, command: str) -> str:
    """The recipe file's text."""
    values = data(resolved)
    head = [
        "# Recipe: a complete, editable configuration. Every key is here with its value and the",
        "# layer that set it (model preset < benchmark table < cluster profile < --config files <",
        "# command line; `default`: the schema's). Edit any value, then run it with",
        "#     python -m launchers submit --config THIS_FILE     (make submit CONFIG=THIS_FILE)",
        "# job.model and job.cluster name the preset and profile submit loads under this file;",
        "# this file sets every key, so its values win (key=value on the submit line win over it).",
        "# For another model or cluster make a new recipe: editing job.model or job.cluster here",
        "# changes only what loads underneath, and every value below still overrides it.",
        "# `at submit`: derived when you submit, not frozen here. job.run stays null so that each",
        "# submit is a new run; relative paths are relative to cluster.workdir (null: the",
        "# submitting checkout). Unknown keys, wrong types and keys given twice are refused,",
        "# naming this file and the key, before anything is written or submitted.",
        f"# Made by: {command}",
        f"# Layers: {' < '.join(resolved.layers)}",
    ]
    lines: list[str] = []
    _emit(values, (), resolved, lines)
    return "\n".join(head + lines) + "\n"


def _emit(mapping: dict, prefix: Key, resolved: Resolved, lines: list[str]) -> None:
    indent = "  " * len(prefix)
    for name, value in mapping.items():
        key = prefix + (str(name),)
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{name}:")
            _emit(value, key, resolved, lines)
            continue
        line = f"{indent}{name}: {_value(value)}"
        lines.append(f"{line.ljust(COMMENT_COLUMN - 1)} # {origin(resolved, key)}")


def warnings(resolved: Resolved) -> list[str]:
    if ("job", "run") in resolved.derived:
        return []
    return [
        f"job.run is fixed in this recipe ({resolved.config.job.run}): a second submit of it "
        "is refused (the run exists); set job.run: null in the file for a new run each time"
    ]


def keys(resolved: Resolved) -> list[Key]:
    """Every key a recipe of `resolved` holds (for tests and checks)."""
    return _leaves(data(resolved))
