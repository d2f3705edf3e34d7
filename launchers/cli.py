"""`python -m launchers COMMAND ...`: the front door (the Makefile's targets call it).

    submit  resolve + validate the config, write the run directory, submit it
    render  dry run: print the batch script and the resolved config; write and submit nothing
    sweep   submit a micro-batch sweep that runs inside ONE allocation (--dry-run: print it)
    debug   run the trainer here, in the foreground: one process, sample data, ~50 steps
    recipe  write the resolved config as an editable, commented file (submit --config FILE runs it)
    status  backend, job ids, scheduler state, latest checkpoint, last requeue decision
    logs    print (or follow, -f) the run's newest logs
    cancel  cancel the run's jobs
    resume  submit an existing run directory again; it continues from its checkpoints
    list    every run under a runs root: backend, state, latest checkpoint, last decision
    plot    the run's loss and throughput plots (<run>/plots/*.png)
    keys    every configuration key with its type, default and description (launchers/keys.py)
    cluster up|down|status: the bundled local SLURM cluster

Configuration errors exit 2 with one line per problem (`<file>: <key>: <problem>; <fix>`) and no
traceback; scheduler errors exit 1. Nothing here imports torch. The commands live in
launchers/commands/ (submit.py: render, submit, recipe, sweep, debug, resume; status.py: status,
logs, cancel, list, plot); this module parses the command line and dispatches.
"""

from __future__ import annotations

import argparse
import os
import sys

from launchers import cluster, keys
from launchers.backends.base import BackendError
from launchers.commands import error
from launchers.commands.status import cmd_cancel, cmd_list, cmd_logs, cmd_plot, cmd_status
from launchers.commands.submit import (
    SWEEP_OPTIONS,
    STARTED,
    cmd_debug,
    cmd_recipe,
    cmd_render,
    cmd_resume,
    cmd_submit,
    cmd_sweep,
)
from launchers.config import ALIASES, ConfigError, check_utf8


CONSOLE_COMMAND = "bionemo-hpc"  # [project.scripts] in pyproject.toml


def cmd_cluster(args) -> int:
    return cluster.main([args.action])


# ------------------------------------------------------------------------------------ parser


def _job_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument("--model", help="model preset: configs/models/<MODEL>.yaml (or a path)")
    p.add_argument(
        "--cluster",
        help="cluster profile: configs/clusters/<CLUSTER>.yaml (or a path); default local",
    )
    p.add_argument("--nodes", type=int, help="number of nodes (job.nodes)")
    if backend:
        p.add_argument(
            "--backend", help="sbatch (default), submitit, nemo_run or local (job.backend)"
        )
    p.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="a config file with job/cluster/trainer sections (repeatable)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. trainer.train.max_steps=100 job.time_limit=01:00:00",
    )


def _sweep_options(s: argparse.ArgumentParser) -> None:
    _job_options(s)
    for flag, _, text in SWEEP_OPTIONS:
        s.add_argument(flag, help=text)
    s.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trainer.train.compile in the trials (default: the config's)",
    )
    s.add_argument(
        "--write-table", action="store_true", help="update the model's row in <tables>/<gpu>.yaml"
    )
    s.add_argument(
        "--set",
        metavar="KEY=VALUE",
        nargs="+",
        help="trainer overrides: KEY=VALUE is trainer.KEY=VALUE",
    )
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print the batch script and the resolved config; submit nothing",
    )


def _debug_options(s: argparse.ArgumentParser) -> None:
    _job_options(s, backend=False)
    s.add_argument("--nproc", type=int, help="processes (one per rank, started here); default 1")
    s.set_defaults(model=None)


def _recipe_options(s: argparse.ArgumentParser) -> None:
    _job_options(s)
    s.add_argument("--out", metavar="FILE", help="the recipe file to write (default: stdout)")
    s.add_argument("--force", action="store_true", help="replace --out when it exists")


def _list_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "root", nargs="?", metavar="ROOT", help="runs root (default: --cluster's cluster.runs_root)"
    )
    s.add_argument("--cluster", help="cluster profile whose runs_root to list; default local")


def _run_options(name: str):
    def add(s: argparse.ArgumentParser) -> None:
        s.add_argument(
            "run", nargs="?", metavar="RUN", help="run directory (default: the newest under runs/)"
        )
        if name == "logs":
            s.add_argument("-n", "--lines", type=int, default=40)
            s.add_argument("-f", "--follow", action="store_true")
        if name == "resume":
            s.add_argument(
                "overrides",
                nargs="*",
                metavar="key=value",
                help="changes to the saved config (e.g. trainer.train.max_steps=2000)",
            )

    return add


# name: (function, help, options)
COMMANDS = {
    "submit": (cmd_submit, "validate, write the run directory and submit", _job_options),
    "render": (cmd_render, "dry run: print the script and the resolved config", _job_options),
    "sweep": (
        cmd_sweep,
        "submit a micro-batch sweep: one allocation, every trial an srun step "
        "of it (docs/sweep.md)",
        _sweep_options,
    ),
    "debug": (cmd_debug, "run ~50 steps here, in the foreground (local backend)", _debug_options),
    "recipe": (
        cmd_recipe,
        "write the resolved config as an editable, commented file; `submit --config FILE` runs it",
        _recipe_options,
    ),
    "status": (cmd_status, "what the run is doing, and why it stopped", _run_options("status")),
    "logs": (cmd_logs, "the run's newest logs", _run_options("logs")),
    "cancel": (cmd_cancel, "cancel the run's jobs", _run_options("cancel")),
    "resume": (cmd_resume, "submit an existing run again", _run_options("resume")),
    "list": (cmd_list, "every run under a runs root, one table", _list_options),
    "plot": (cmd_plot, "loss and throughput plots of a run (<run>/plots/)", _run_options("plot")),
    "keys": (keys.cmd_keys, "every config key: type, default, description", keys.options),
    "cluster": (
        cmd_cluster,
        "the bundled local SLURM cluster",
        lambda s: s.add_argument("action", choices=["up", "down", "status"]),
    ),
}


def parser() -> argparse.ArgumentParser:
    """The command line (`python -m launchers`, or the `bionemo-hpc` command: pyproject.toml)."""
    command = os.path.basename(sys.argv[0]) if sys.argv else ""
    p = argparse.ArgumentParser(
        prog=command if command == CONSOLE_COMMAND else "python -m launchers",
        description="Render, submit and manage training runs (docs/launcher.md).",
        epilog="Resolution order: model preset < benchmark table (cluster GPU type) < cluster "
        "profile < --config files < command line.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, text, options) in COMMANDS.items():
        s = sub.add_parser(name, help=text)
        options(s)
        s.set_defaults(func=func)
    return p


_VALUE_OPTIONS = {
    "--model",
    "--cluster",
    "--nodes",
    "--backend",
    "--config",
    "--nproc",
    "-n",
    "--lines",
    *(flag for flag, _, _ in SWEEP_OPTIONS),
}


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """key=value words may come anywhere (argparse alone would refuse them after an option).
    For `sweep`, the words after --set are trainer overrides (without the `trainer.` prefix)."""
    rest, overrides = [], []
    in_set = False
    for i, word in enumerate(argv):
        previous = argv[i - 1] if i else ""
        if word == "--set" and argv[:1] == ["sweep"]:
            in_set = True
            continue
        if word.startswith("-"):
            in_set = False
        if "=" in word and not word.startswith("-") and previous not in _VALUE_OPTIONS:
            if in_set and word.split(".")[0] not in ("job", "cluster", "sweep", "trainer"):
                word = "trainer." + word
            overrides.append(word)
        else:
            rest.append(word)
    return rest, overrides


def _refuse_undecodable(words: list[str]) -> None:
    """Python hands over argument bytes that are not UTF-8 as surrogates, which no file can
    hold: refuse them up front, naming the key or option they were given for."""
    for i, word in enumerate(words):
        previous = words[i - 1] if i else ""
        key, value = "(argument)", word
        if "=" in word and (word.startswith("--") or previous not in _VALUE_OPTIONS):
            key, value = word.split("=", 1)  # key=value, or --option=value
            key = ALIASES.get(key, key)
        elif previous.startswith("-"):
            key = previous
        check_utf8(value, "command line", key)


def main(argv: list[str] | None = None, t0: float | None = None) -> int:
    if t0 is not None:
        STARTED[0] = t0
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        _refuse_undecodable(words)
    except ConfigError as e:
        error(str(e))
        return 2
    rest, overrides = _split_overrides(words)
    p = parser()
    args = p.parse_args(rest)
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + overrides
    elif overrides:
        p.error(f"{args.command} takes no key=value overrides: {' '.join(overrides)}")
    if args.command == "debug" and not args.model:
        args.model = "esm2_8m"
    try:
        return args.func(args)
    except ConfigError as e:
        error(str(e))
        return 2
    except BackendError as e:
        error(str(e))
        return 1
    except KeyboardInterrupt:
        return 130
