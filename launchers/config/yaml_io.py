"""Reading and writing configuration YAML: duplicate keys refused, SLURM times kept as text."""

from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml

from bionemo.config import DuplicateKeyError, refuse_duplicate_keys
from launchers.config.errors import ConfigError
from launchers.paths import REPO_ROOT

if TYPE_CHECKING:
    from launchers.config.schema import LaunchConfig

# --------------------------------------------------------------------------------------------
# YAML: YAML 1.1 reads 1:30:00 as the base-60 integer 5400; a time limit must stay a string.
# --------------------------------------------------------------------------------------------


# libyaml's parser when present (several times faster; the resolvers below still apply)
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]  # C or pure-Python SafeLoader
    def construct_document(self, node):
        refuse_duplicate_keys(node)  # a key given twice is an error, not "the last one wins"
        return super().construct_document(node)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
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
        raise ConfigError(
            source,
            e.key,
            f"given twice (lines {e.lines[0]} and {e.lines[1]}), and "
            "YAML would keep the last silently",
            "keep one of them",
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        position = getattr(e, "position", None)  # ReaderError: a character YAML refuses
        where = (
            f"line {mark.line + 1}"
            if mark
            else f"character {position}"
            if position is not None
            else "(file)"
        )
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, where, f"not valid YAML ({problem})", "fix the syntax") from None


def load_yaml_file(path: Path, key: str = "(file)") -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            label(path), key, f"cannot read ({e.strerror})", "check the path"
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            label(path),
            key,
            f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): not a YAML file",
            "check the path",
        ) from None
    return load_yaml_text(text, label(path))


def label(path: Path | str) -> str:
    """How a file is named in messages: relative to the repository when it lives there."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def dump(cfg: LaunchConfig, layers: Sequence[str] = ()) -> str:
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
