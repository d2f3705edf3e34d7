"""Layers (config files and the command line) and how they merge, remembering which layer set
each key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from launchers.config.errors import ConfigError, _did_you_mean
from launchers.config.schema import ALIASES, SECTIONS, Key, _is_text, _unwrap_optional, schema_type
from launchers.config.yaml_io import label, load_yaml_file, load_yaml_text


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
        raise ConfigError(
            src,
            "(top level)",
            "must be a mapping of sections",
            "write `job:`, `cluster:` and/or `trainer:` sections",
        )
    for k, v in raw.items():
        if k not in SECTIONS:
            raise ConfigError(
                src,
                str(k),
                "unknown section" + _did_you_mean(str(k), SECTIONS),
                "a config file has only the sections job, cluster, trainer "
                "(and sweep, for `python -m launchers sweep`)",
            )
        if not isinstance(v, dict):
            raise ConfigError(src, str(k), "must be a mapping", f"write `{k}:` followed by keys")
    return Layer(src, raw)


_SURROGATE = re.compile(r"[\ud800-\udfff]")  # how Python keeps argv bytes that are not UTF-8


def check_utf8(text: str, source: str, key: str) -> None:
    """Refuse text decoded from bytes that are not UTF-8: it cannot be written to config.yaml,
    the batch script or a file name that other tools read back."""

    def shown(t: str) -> str:
        return repr(t.encode("utf-8", "surrogateescape"))[2:-1]

    if _SURROGATE.search(text) or _SURROGATE.search(key):
        raise ConfigError(
            source,
            shown(key),
            f"'{shown(text)}' is not UTF-8 text",
            "pass it in UTF-8 (a UTF-8 locale, or rename the file)",
        )


def parse_override(item: str) -> tuple[Key, Any]:
    name, _, raw = item.partition("=")
    check_utf8(raw, "command line", ALIASES.get(name.strip(), name.strip()))
    if "=" not in item:
        raise ConfigError(
            "command line",
            item,
            "not a key=value override",
            "write e.g. trainer.train.max_steps=100 (see docs/launcher.md)",
        )
    name = ALIASES.get(name.strip(), name.strip())
    key = tuple(name.split("."))
    if not name or any(not p for p in key):
        raise ConfigError(
            "command line", name or "(empty)", "empty key", "write e.g. trainer.train.max_steps=100"
        )
    if key[0] not in SECTIONS:
        raise ConfigError(
            "command line",
            name,
            "unknown key" + _did_you_mean(key[0], SECTIONS),
            "keys start with job., cluster., trainer. or sweep. (aliases: "
            + ", ".join(ALIASES)
            + ")",
        )
    if len(key) == 1:
        raise ConfigError(
            "command line",
            name,
            "a whole section cannot be set",
            f"set one key, e.g. {name}.KEY=VALUE",
        )
    ann = schema_type(key)
    _, optional = _unwrap_optional(ann)
    if _is_text(ann) and not (optional and raw.strip() in ("null", "~")):
        return key, raw  # a run name like 0100 or a time like 1:00:00 stays text
    return key, load_yaml_text(raw, "command line") if raw.strip() else None


def cli_layer(
    flags: dict[str, Any], overrides: list[str], options: Sequence[tuple[str, str, Any]] = ()
) -> Layer:
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


def _src(origins: dict[Key, str], key: Key, default: str = "resolved config") -> str:
    """The label of the layer that set `key` (or the closest key above or below it)."""
    for k in (key, *(key[:i] for i in range(len(key) - 1, 0, -1))):
        if k in origins:
            return origins[k]
    below = [v for k, v in origins.items() if k[: len(key)] == key]
    return below[-1] if below else default
