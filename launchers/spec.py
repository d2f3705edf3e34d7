"""JobSpec: a resolved configuration plus everything decided from it, ready for a backend.

`config.resolve()` checks the schema and the arithmetic; `build()` adds the checks that look at
the submitting host's filesystem (run directory free, data present, interpreter present). Submit
makes them errors; render, which touches nothing, reports them as warnings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bionemo import rundir
from bionemo.config import input_problem
from bionemo.config_data import read_vocab_tokens
from launchers.config import (
    ConfigError,
    LaunchConfig,
    Resolved,
    _src,
    dump,
    format_time_limit,
)


@dataclass(frozen=True)
class JobSpec:
    config: LaunchConfig
    run_dir: Path
    layers: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def job(self):
        return self.config.job

    @property
    def cluster(self):
        return self.config.cluster

    @property
    def trainer(self):
        return self.config.trainer

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def tasks_per_node(self) -> int:
        return self.config.tasks_per_node

    @property
    def time_limit(self) -> str:
        return format_time_limit(self.config.time_limit_s)

    def config_text(self) -> str:
        return dump(self.config, list(self.layers))

    def trainer_command(self, python: str | None = None) -> list[str]:
        return [python or self.cluster.python, "-m", "bionemo.train", str(self.run_dir)]


def run_dir_of(cfg: LaunchConfig) -> Path:
    return Path(cfg.cluster.runs_root) / cfg.job.experiment / cfg.job.run


def build(resolved: Resolved, *, strict: bool = True, existing: bool = False) -> JobSpec:
    """Check the host side and return the spec. strict: problems are errors (submit), else
    warnings (render). existing: the run directory is expected to exist (resume)."""
    cfg, origins = resolved.config, resolved.origins
    warnings = list(resolved.warnings)
    problems: list[ConfigError] = []
    run_dir = run_dir_of(cfg)

    def problem(key: str, text: str, fix: str):
        problems.append(ConfigError(_src(origins, tuple(key.split("."))), key, text, fix))

    # A default name that exists gives way to the next free one when submit creates the directory.
    if not existing and run_dir.exists() and not resolved.default_run:
        problem(
            "job.run",
            f"the run directory {run_dir} exists already",
            f"continue it with `python -m launchers resume {run_dir}` (make resume "
            f"RUN={run_dir}), or pick another job.run",
        )
    if existing and rundir.is_finished(run_dir):
        problem(
            "job.run",
            f"{run_dir} is finished (it has the `finished` marker)",
            "a finished run is never restarted; submit a new run instead",
        )
    if not existing:  # the run directory's nearest existing ancestor must take a new folder
        above = next((p for p in run_dir.parents if p.exists()), None)
        key = "job.experiment" if above == run_dir.parent else "cluster.runs_root"
        if above is not None and not above.is_dir():
            problem(
                key,
                f"{above} is a file, not a directory",
                "point cluster.runs_root at a directory (missing ones are created)",
            )
        elif above is not None and not os.access(above, os.W_OK | os.X_OK):
            problem(
                key,
                f"{above} is not writable",
                "point cluster.runs_root at a directory you can write",
            )

    workdir = Path(cfg.cluster.workdir)
    if not workdir.is_dir():
        problem(
            "cluster.workdir",
            f"{workdir} is not a directory on this host",
            "point cluster.workdir at the repository checkout the nodes use",
        )
    elif not cfg.cluster.container_image:
        py = cfg.cluster.python
        if "/" in py and not Path(py).exists():
            problem(
                "cluster.python",
                f"{py} does not exist",
                "run `make install` to create the virtual environment, or point "
                "cluster.python at an interpreter",
            )

    # The checks of files the job will read, where this machine sees the workdir.
    check_files = cfg.job.check_data and workdir.is_dir()
    fine_tuning = cfg.trainer.task.fine_tuning
    if check_files:
        kinds = cfg.trainer.data.file_kinds()  # what each data key must be: type, magic bytes
        for key, path in _input_paths(cfg):
            full = path if path.is_absolute() else workdir / path
            kind = kinds.get(key.removeprefix("trainer.data."))
            bad = (
                input_problem(full, kind)
                if kind
                else None
                if full.exists()
                else f"{full} does not exist"
            )
            if bad:
                problem(
                    key,
                    bad,
                    f"run `make data` for the sample set, point {key} at your "
                    "data, or set job.check_data=false when only the nodes can see it",
                )

    vocab = getattr(cfg.trainer.data, "vocab", None)  # Geneformer: one embedding row a token
    if check_files and vocab is not None and not fine_tuning:
        full = vocab if vocab.is_absolute() else workdir / vocab
        if full.is_file():
            try:
                tokens = len(read_vocab_tokens(full, "trainer.data.vocab"))
            except (OSError, ValueError) as e:
                problem(
                    "trainer.data.vocab",
                    str(e).removeprefix("trainer.data.vocab: ").split("; ")[0],
                    "fix the file, or point trainer.data.vocab at the data set's vocabulary",
                )
            else:
                if tokens != cfg.trainer.model.vocab_size:
                    problem(
                        "trainer.model.vocab_size",
                        f"{cfg.trainer.model.vocab_size}, but {full} has {tokens} tokens",
                        f"set trainer.model.vocab_size={tokens}, or point trainer.data.vocab at "
                        "the vocabulary the model was built for",
                    )

    init = cfg.trainer.checkpoint.init_from
    if check_files and init is not None:
        from bionemo import hf  # torch-free; imported only when a run starts from weights

        full = init if init.is_absolute() else workdir / init
        bad = hf.weights_problem(full, cfg.trainer.model) if full.exists() else None
        if bad:
            problem("trainer.checkpoint.init_from", *bad)

    data_problems = getattr(cfg.trainer.data, "problems", None)  # e.g. a column the loader needs
    if check_files and data_problems and not fine_tuning:
        for key, text, fix in data_problems(workdir):
            problem(f"trainer.data.{key}", text, fix)

    if check_files and fine_tuning:
        for key, text, fix in cfg.trainer.task.problems(workdir):  # the labelled table (pyarrow)
            problem(f"trainer.task.{key}", text, fix)

    if problems and strict:
        raise ConfigError.many(problems)
    warnings += [str(p) for p in problems]
    return JobSpec(cfg, run_dir, tuple(resolved.layers), tuple(warnings))


def _input_paths(cfg: LaunchConfig) -> list[tuple[str, Path]]:
    """Every file the trainer reads: the path-valued keys of trainer.data, and the weights of
    trainer.checkpoint.init_from. Generic over the data schema, so any model family works."""
    out = []
    data = cfg.trainer.data
    for name in type(data).model_fields if not cfg.trainer.task.fine_tuning else ():  # task.data
        value = getattr(data, name)
        if isinstance(value, Path):
            out.append((f"trainer.data.{name}", value))
    if cfg.trainer.checkpoint.init_from is not None:
        out.append(("trainer.checkpoint.init_from", Path(cfg.trainer.checkpoint.init_from)))
    return out
