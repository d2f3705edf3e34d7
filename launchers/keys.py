"""`python -m launchers keys [SECTION]`: every configuration key with its type, default and
description, read from the schema (`Field(description=...)` in launchers/config/schema.py and
bionemo/config.py), so the reference cannot drift from the code. `--markdown` prints the table
that docs/launcher.md embeds (tests/test_keys.py checks the two agree).
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from pathlib import Path
from typing import Literal, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launchers.config import ConfigError, LaunchConfig, _did_you_mean


class Key(NamedTuple):
    key: str  # dotted, e.g. trainer.train.max_steps
    type: str
    default: str
    description: str
    schema: str  # the pydantic model that declares it, e.g. TrainConfig


def _is_union(ann) -> bool:
    return get_origin(ann) is Union or type(ann).__name__ == "UnionType"


def _models(ann) -> list[type[BaseModel]]:
    members = get_args(ann) if _is_union(ann) else (ann,)
    return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]


def type_name(ann) -> str:
    """A short, YAML-minded spelling: null, path, a|b for a Literal, list[str], ..."""
    if ann is type(None):
        return "null"
    if get_origin(ann) is Literal:
        return "|".join(str(a) for a in get_args(ann))
    if _is_union(ann):
        return " | ".join(type_name(a) for a in get_args(ann))
    if get_origin(ann) in (list, dict, tuple):
        return f"{get_origin(ann).__name__}[{', '.join(type_name(a) for a in get_args(ann))}]"
    if ann is Path:
        return "path"
    return getattr(ann, "__name__", str(ann))


def default_text(info) -> str:
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default is PydanticUndefined else info.default
    if value is None:
        return "null"
    if isinstance(value, (str, Path)):
        return str(value)
    return json.dumps(value, default=str)


def all_keys(model: type[BaseModel] = LaunchConfig, prefix: str = "") -> list[Key]:
    """Every leaf key under `model`, in declaration order. Where a section is a union of schemas
    (trainer.data: one per model family) each schema's keys are listed."""
    out: list[Key] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sections = _models(info.annotation)
        if sections:
            for section in sections:
                out += all_keys(section, key + ".")
        else:
            out.append(
                Key(
                    key,
                    type_name(info.annotation),
                    default_text(info),
                    " ".join((info.description or "").split()),
                    model.__name__,
                )
            )
    return out


def select(section: str | None) -> list[Key]:
    """The keys at or under a dotted section (all of them for None); ConfigError if none."""
    keys = all_keys()
    if not section:
        return keys
    chosen = [k for k in keys if k.key == section or k.key.startswith(section + ".")]
    if not chosen:
        known = sorted({k.key.rsplit(".", 1)[0] for k in keys})
        raise ConfigError(
            "command line",
            section,
            "no such section or key" + _did_you_mean(section, known + [k.key for k in keys]),
            "sections: " + ", ".join(known),
        )
    return chosen


def markdown(keys: list[Key]) -> str:
    """A Markdown table (the form docs/launcher.md embeds)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("<", "\\<")  # <run_dir> is not an HTML tag

    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [
        f"| `{k.key}` | {cell(k.type)} | `{cell(k.default)}` | {cell(k.description)} |"
        for k in keys
    ]
    return "\n".join(lines) + "\n"


def text(keys: list[Key], width: int = 100) -> str:
    """One line per key (key, type, default), its description indented below."""
    wk = max(len(k.key) for k in keys)
    wt = min(max(len(k.type) for k in keys), 40)
    out = []
    for k in keys:
        out.append(f"{k.key:<{wk}}  {k.type:<{wt}}  {k.default}")
        out += textwrap.wrap(
            k.description, width, initial_indent="    ", subsequent_indent="    "
        ) or ["    (no description)"]
    return "\n".join(out) + "\n"


def options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "section",
        nargs="?",
        metavar="SECTION",
        help="a section or key, e.g. cluster, trainer.train (default: every key)",
    )
    s.add_argument("--markdown", action="store_true", help="print a Markdown table")


def cmd_keys(args) -> int:
    keys = select(args.section)
    width = max(60, shutil.get_terminal_size((100, 24)).columns - 1)
    print(markdown(keys) if args.markdown else text(keys, width), end="")
    return 0
