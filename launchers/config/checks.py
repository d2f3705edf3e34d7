"""Checks across sections of a resolved config, and pydantic's errors as ConfigErrors."""

from __future__ import annotations

import re

from pydantic import ValidationError

from bionemo.config import TrainerConfig
from launchers.config.errors import ConfigError, _did_you_mean
from launchers.config.layers import _src
from launchers.config.schema import (
    FA4_GPU_TYPES,
    FP8_GPU_TYPES,
    NEMO_RUN_WORD,
    TIME_FIX,
    BenchmarkRow,
    BenchmarkTable,
    Key,
    LaunchConfig,
    _fields_at,
    _fields_of,
    _models_at,
)


def _check(
    cfg: LaunchConfig,
    origins,
    table: BenchmarkTable,
    row: BenchmarkRow | None,
    table_source: str,
    warnings: list[str],
) -> None:
    """Checks across sections (the schema has checked each value already)."""
    errors: list[ConfigError] = []
    job, cl, tr = cfg.job, cfg.cluster, cfg.trainer

    def err(key: str, problem: str, fix: str):
        errors.append(ConfigError(_src(origins, tuple(key.split("."))), key, problem, fix))

    # GPU type and GPU count agree
    if table.kind == "cpu" and cl.gpus_per_node:
        err(
            "cluster.gpus_per_node",
            f"{cl.gpus_per_node} GPUs on a CPU gpu_type ({cl.gpu_type})",
            "set cluster.gpus_per_node=0 or a GPU type such as h100_80gb",
        )
    if table.kind == "gpu" and not cl.gpus_per_node:
        err(
            "cluster.gpus_per_node",
            f"0 GPUs per node with gpu_type {cl.gpu_type}",
            "set cluster.gpus_per_node to the GPUs of one node (one rank per GPU)",
        )
    if cl.gpus_per_node and cl.tasks_per_node not in (None, cl.gpus_per_node):
        err(
            "cluster.tasks_per_node",
            f"{cl.tasks_per_node} tasks but {cl.gpus_per_node} GPUs per node",
            "remove tasks_per_node: with GPUs the launcher runs one rank per GPU",
        )
    # A SLURM job gets the GPUs it asks for (--gpus-per-node): none without cluster.gpus_per_node.
    # The local backend runs on this machine, whose GPUs it sees whatever the profile says.
    if not cl.gpus_per_node and job.backend != "local":
        if tr.train.device == "cuda":
            err(
                "trainer.train.device",
                f"cuda, but cluster {cl.name} gives the job no GPUs (cluster.gpus_per_node 0)",
                "set cluster.gpus_per_node (and a GPU gpu_type), or trainer.train.device=cpu",
            )
        elif tr.train.engine == "megatron":
            err(
                "trainer.train.engine",
                f"megatron needs CUDA, but cluster {cl.name} gives the "
                "job no GPUs (cluster.gpus_per_node 0)",
                "use a GPU profile, or trainer.train.engine=torch",
            )

    # Strategy and FP8 against the hardware (the schema checked them against engine and device);
    # a sweep that searches --fp8 has its own check, naming sweep.fp8 (_check_sweep_variants)
    searched_fp8 = cfg.sweep is not None and cfg.sweep.fp8
    fp8_gpu = cl.gpu_type.lower().startswith(FP8_GPU_TYPES)
    if tr.train.fp8 != "none" and not fp8_gpu and not searched_fp8:
        err(
            "trainer.train.fp8",
            f"{tr.train.fp8} needs FP8 tensor cores, which gpu_type {cl.gpu_type} lacks",
            "set trainer.train.fp8=none, or use an H100/H200-class cluster profile",
        )
    fa = tr.train.flash_attention
    if fa != "torch" and not cl.gpu_type.lower().startswith(FA4_GPU_TYPES):
        err(
            "trainer.train.flash_attention",
            f"{fa} runs FlashAttention-4, built for Hopper and Blackwell GPUs, which gpu_type "
            f"{cl.gpu_type} is not",
            "set trainer.train.flash_attention=torch, or use an H100/H200/B200-class cluster "
            "profile",
        )
    if tr.parallel.fsdp_cpu_offload and not cl.gpus_per_node:
        err(
            "trainer.parallel.fsdp_cpu_offload",
            f"offloads GPU state, but cluster {cl.name} gives the job no GPUs",
            "remove the offload, or use a GPU cluster profile",
        )
    if tr.parallel.data_parallel == "hsdp" and job.nodes < 2 and cfg.sweep is None:
        err(
            "trainer.parallel.data_parallel",
            "hsdp replicates across nodes and this job has one node",
            "use trainer.parallel.data_parallel=fsdp, or --nodes 2 or more",
        )

    # Time limit and warning lead
    limit = cfg.time_limit_s
    if cl.signal_lead_s >= limit:
        err(
            "cluster.signal_lead_s",
            f"the warning lead {cl.signal_lead_s} s is not shorter than the time limit "
            f"{job.time_limit} ({limit} s)",
            f"lower cluster.signal_lead_s below {limit} or raise job.time_limit",
        )
    elif cl.signal_lead_s + 60 >= limit:
        warnings.append(
            f"the warning signal may come as the job starts: SLURM sends it up to 60 s before "
            f"the lead ({cl.signal_lead_s} s) and the limit is {limit} s"
        )

    # Backend
    if job.backend == "local" and job.nodes != 1:  # a local sweep too: its trials run here
        err(
            "job.nodes",
            f"the local backend runs on this machine only, not on {job.nodes} nodes",
            "use job.nodes=1 (--nodes 1) or --backend sbatch",
        )
    elif job.backend == "nemo_run":
        for key, value in (
            ("cluster.runs_root", cl.runs_root),
            ("job.experiment", job.experiment),
            ("job.run", job.run),
        ):
            if not NEMO_RUN_WORD.match(value or ""):
                err(
                    key,
                    f"{value!r} has characters NeMo-Run would pass to a shell unquoted "
                    "(it builds its mkdir/sbatch/srun command lines from the run directory)",
                    "use only letters, digits and _.,:+=@/- with --backend nemo_run, or use "
                    "--backend sbatch or submitit, which quote every value",
                )

    if cfg.sweep is not None:  # a sweep job: its trials, not the job, have a parallel layout
        _check_sweep(cfg, err)
        if errors:
            raise ConfigError.many(errors)
        return

    # Parallel layout and batch arithmetic
    world = cfg.world_size
    tp, pp = tr.parallel.tensor, tr.parallel.pipeline
    if world % (tp * pp):
        err(
            "trainer.parallel.tensor",
            f"tensor x pipeline = {tp} x {pp} does not divide the world size {world} "
            f"({job.nodes} nodes x {cfg.tasks_per_node} ranks)",
            "choose parallel sizes whose product divides the world size, or change the nodes",
        )
    elif tr.model.num_attention_heads % tp:
        err(
            "trainer.parallel.tensor",
            f"{tp} does not divide trainer.model.num_attention_heads "
            f"{tr.model.num_attention_heads}",
            "choose a tensor-parallel size that divides the head count",
        )
    else:
        dp = world // (tp * pp)
        mbs, gbs = tr.train.micro_batch_size, tr.train.global_batch_size
        if gbs is not None and gbs % (mbs * dp):
            per = mbs * dp
            nodes_ok = [
                n
                for n in range(1, 4 * job.nodes + 9)
                if (n * cfg.tasks_per_node) % (tp * pp) == 0
                and gbs % (mbs * n * cfg.tasks_per_node // (tp * pp)) == 0
            ]
            near = sorted(nodes_ok, key=lambda n: abs(n - job.nodes))[:3]
            fix = (
                f"set trainer.train.global_batch_size to a multiple of {per} "
                f"(e.g. {max(per, round(gbs / per) * per)}), or null for {per}"
            )
            if near:
                fix += f"; or use --nodes {' / '.join(map(str, sorted(near)))}"
            err(
                "trainer.train.global_batch_size",
                f"{gbs} is not a multiple of micro batch x data-parallel size = "
                f"{mbs} x {dp} = {per}",
                fix,
            )
        if row and row.max_micro_batch_size and mbs > row.max_micro_batch_size:
            warnings.append(
                f"trainer.train.micro_batch_size {mbs} exceeds the largest that fit in "
                f"{table_source}: {row.max_micro_batch_size}"
            )
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
    assert sw is not None and sw.gpus_per_trial is not None  # a sweep job, defaults filled
    if sw.min > sw.max:
        err("sweep.min", f"{sw.min} is above sweep.max {sw.max}", "choose 1 <= --min <= --max")
    if sw.gpus_per_trial > cfg.tasks_per_node:
        err(
            "sweep.gpus_per_trial",
            f"{sw.gpus_per_trial} ranks per node, but the allocation has {cfg.tasks_per_node} "
            f"per node (cluster {cl.name})",
            f"use --gpus-per-trial {cfg.tasks_per_node} or less",
        )
    if sw.cpu_memory_limit_gib is not None and cl.gpus_per_node:
        err(
            "sweep.cpu_memory_limit_gib",
            "is for CPU trials: CUDA reserves far more address space than any limit allows",
            "cap GPU memory with --memory-cap-gib instead",
        )
    if sw.write_table and "none" not in sw.recompute:
        err(
            "sweep.write_table",
            "tables describe the recompute policy 'none', which this sweep leaves out",
            "add none to --recompute, or drop --write-table",
        )
    _check_sweep_variants(cfg, err)
    world = sw.gpus_per_trial * cfg.job.nodes
    tp, pp = tr.parallel.tensor, tr.parallel.pipeline
    if world % (tp * pp) or tr.model.num_attention_heads % tp:
        err(
            "trainer.parallel.tensor",
            f"tensor x pipeline = {tp} x {pp} must divide a trial's world size {world} "
            f"({cfg.job.nodes} nodes x {sw.gpus_per_trial} ranks) and tensor the head count "
            f"{tr.model.num_attention_heads}",
            "choose --tp (and --gpus-per-trial) to fit",
        )


def _check_sweep_variants(cfg: LaunchConfig, err) -> None:
    """Each strategy and FP8 recipe the sweep searches, as the trainer and the hardware would
    judge them in a trial: every pair the trials run (the trials set both; the resolved config
    holds the first of each, resolve._sweep_defaults)."""
    sw, cl, tr = cfg.sweep, cfg.cluster, cfg.trainer
    assert sw is not None
    refused: set[str] = set()
    strategies: list[str] = list(sw.strategies or [tr.parallel.data_parallel])
    recipes: list[str] = list(sw.fp8 or [tr.train.fp8])
    for strategy in strategies:
        for recipe in recipes:
            data = tr.model_dump(mode="json")
            data["parallel"]["data_parallel"], data["train"]["fp8"] = strategy, recipe
            try:
                TrainerConfig.model_validate(data)
            except ValidationError as e:
                problem = e.errors()[0]["msg"].removeprefix("Value error, ")
                # name the searched value(s) to leave out: the one list searched, else the pair
                if sw.strategies and not sw.fp8:
                    key, what, fix = (
                        "sweep.strategies",
                        strategy,
                        f"leave {strategy} out of --strategy",
                    )
                elif sw.fp8 and not sw.strategies:
                    key, what, fix = "sweep.fp8", recipe, f"leave {recipe} out of --fp8"
                    refused.add(recipe)  # its hardware check below would only repeat the error
                else:
                    key, what = "sweep.strategies", f"{strategy} with fp8 {recipe}"
                    fix = "search only the strategies and recipes that combine (--strategy, --fp8)"
                err(key, f"{what}: {problem}", fix)
    fp8 = [x for x in sw.fp8 or () if x != "none" and x not in refused]
    if fp8 and not cl.gpu_type.lower().startswith(FP8_GPU_TYPES):
        err(
            "sweep.fp8",
            f"{','.join(fp8)} needs FP8 tensor cores, which gpu_type {cl.gpu_type} lacks",
            "search --fp8 none only, or use an H100/H200-class cluster profile",
        )
    if "hsdp" in (sw.strategies or ()) and cfg.job.nodes < 2:
        err(
            "sweep.strategies",
            "hsdp replicates across nodes and each trial has one node",
            "search ddp,fsdp, or --nodes 2 or more",
        )


# --------------------------------------------------------------------------------------------
# pydantic errors -> ConfigError
# --------------------------------------------------------------------------------------------


_KEY_FIRST = re.compile(r"^([a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*)\b")
_NESTED = re.compile(r"(?:^|; |Value error, )(data\.[\w.]+): (.+?)(?= \(model\.family|; data\.|$)")


def _nested_error(
    origins, loc: Key, msg: str, default_source: str, family: str | None
) -> ConfigError:
    source = _src(origins, loc, default_source)
    if msg.startswith("Extra inputs"):
        models = _models_at(loc[:-1])
        ours = [m for m in models if loc[-1] not in m.model_fields]  # the schema that refused it
        if len(ours) < len(models) and len(ours) == 1:  # another family's key
            return ConfigError(
                source,
                ".".join(loc),
                "belongs to another model family's data section, not to "
                + (family or ours[0].__name__)
                + "'s",
                "set data keys for the model you run: " + ", ".join(ours[0].model_fields),
            )
        options = _fields_of(ours or models)
        return ConfigError(
            source,
            ".".join(loc),
            "unknown key" + _did_you_mean(loc[-1], options),
            "keys here: " + ", ".join(options) if options else "remove it",
        )
    return ConfigError(
        source, ".".join(loc), msg[0].lower() + msg[1:], _fix_for(source, ".".join(loc))
    )


def _fix_for(source: str, key: str) -> str:
    if source == "command line":
        return f"pass a valid {key}=VALUE"
    if source.startswith("--"):
        return f"pass a valid {source} value"
    return f"fix the value in {source} or override it with {key}=VALUE"


def _translate(
    exc: ValidationError,
    origins,
    default_source: str = "resolved config",
    prefix: Key | None = None,
) -> ConfigError:
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
                fix = (
                    "add a row for the model to the cluster's benchmark table "
                    f"(configs/benchmarks/) or pass {key}=N"
                )
        elif kind == "value_error" and _NESTED.search(msg):
            # the trainer validates its data section itself and names the keys in the message
            family = re.search(r"model\.family '(\w+)'", msg)
            for m in _NESTED.finditer(msg.removeprefix("Value error, ")):
                sub = loc + tuple(m.group(1).split("."))
                errors.append(
                    _nested_error(
                        origins,
                        sub,
                        m.group(2),
                        default_source,
                        family.group(1) if family else None,
                    )
                )
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
