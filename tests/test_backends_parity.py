"""The three SLURM backends launch the same job: the native script, submitit's generated script and
NeMo-Run's generated script for one resolved JobSpec agree on nodes, tasks, GPUs, CPUs, time,
signal, requeue flag and policy, environment, setup lines, srun flags and the trainer command.

Nothing is submitted: submitit and NeMo-Run generate their scripts as they would for `submit`
(NeMo-Run through a dry run of its Experiment in a throw-away NEMORUN_HOME).
"""

from __future__ import annotations

import pickle
import re
import shlex
from datetime import datetime, timezone

import pytest

from launchers import config, record, slurm
from launchers import spec as specs
from launchers.backends import nemo_run_backend, sbatch, submitit_backend

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
JOBS = {
    # 8 GPU nodes with pyxis, account/partition/qos, exclusive, extra sbatch and srun flags
    "h100": dict(
        model="esm2_650m",
        cluster="h100_example",
        nodes=8,
        overrides=[
            "cluster.setup=[module load nccl/2.21, echo ready]",
            "cluster.srun_args=[--mpi=pmix]",
            "cluster.sbatch_args=[--mem=0]",
            "job.constraint=h100",
            "job.max_restarts=7",
        ],
    ),
    # the bundled CPU cluster: 2 nodes x 1 rank, a short limit and a custom warning lead
    "local": dict(
        model="esm2_8m",
        cluster="local",
        nodes=2,
        overrides=["job.time_limit=00:02:30", "cluster.signal_lead_s=45", "cluster.env.FOO=a b"],
    ),
}


def _spec(name: str) -> specs.JobSpec:
    j = JOBS[name]
    resolved = config.resolve(
        model=j["model"], cluster=j["cluster"], nodes=j["nodes"], overrides=j["overrides"], now=NOW
    )
    return specs.build(resolved, strict=False)


@pytest.fixture(scope="module", params=sorted(JOBS))
def scripts(request):
    spec = _spec(request.param)
    return spec, {
        "sbatch": sbatch.render(spec),
        "submitit": submitit_backend.script(spec),
        "nemo_run": nemo_run_backend.script(spec),
    }


def header(text: str) -> dict[str, str | bool]:
    """The #SBATCH flags of a script (values unquoted the way sbatch reads them)."""
    out: dict[str, str | bool] = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            for word in shlex.split(line[len("#SBATCH ") :]):
                key, eq, value = word.partition("=")
                out[key] = value if eq else True
    return out


def exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^export ([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line.strip())
        if m:
            words = shlex.split(m.group(2)) if m.group(2) else [""]
            out[m.group(1)] = words[0] if words else ""
    return out


def srun_words(text: str) -> list[str]:
    """The words of the (last) srun command that starts the trainer(s)."""
    joined = text.replace("\\\n", " ")
    lines = [
        line
        for line in joined.splitlines()
        if line.strip().startswith("srun ") and "hostname" not in line
    ]
    return shlex.split(lines[-1].split(" & ")[0].rstrip(" &"))


def srun_flags(words: list[str]) -> list[str]:
    """Flags only, as --key=value (NeMo-Run and submitit write some as `--key value`)."""
    out, i = [], 1
    while i < len(words) and words[i].startswith("--"):
        if (
            "=" not in words[i]
            and i + 1 < len(words)
            and not words[i + 1].startswith("-")
            and words[i] in ("--output", "--error", "--chdir")
        ):
            out.append(f"{words[i]}={words[i + 1]}")
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


def last_value(flags: list[str], key: str) -> str | None:
    values = [f.partition("=")[2] for f in flags if f.partition("=")[0] == key]
    return values[-1] if values else None


def test_same_resources_time_signal_and_requeue_flag(scripts):
    spec, texts = scripts
    heads = {name: header(text) for name, text in texts.items()}
    expected = {
        "--nodes": str(spec.job.nodes),
        "--ntasks-per-node": str(spec.tasks_per_node),
        "--cpus-per-task": str(spec.cluster.cpus_per_task),
        "--time": spec.time_limit,
        "--signal": f"{spec.trainer.train.stop_signal}@{spec.cluster.signal_lead_s}",
        "--requeue": True,
        "--open-mode": "append",
    }
    if spec.cluster.gpus_per_node:
        expected["--gpus-per-node"] = str(spec.cluster.gpus_per_node)
    for key in ("partition", "account", "qos"):
        if getattr(spec.cluster, key):
            expected[f"--{key}"] = getattr(spec.cluster, key)
    if spec.cluster.exclusive:
        expected["--exclusive"] = True
    if spec.job.constraint:
        expected["--constraint"] = spec.job.constraint
    for flag in spec.cluster.sbatch_args:
        key, eq, value = flag.partition("=")
        expected[key] = value if eq else True
    for name, head in heads.items():
        got = {k: head.get(k) for k in expected}
        assert got == expected, (name, got)
        assert head["--job-name"] == slurm.job_name(spec), name
        # the signal goes to the ranks (no B:), and no GPU line without GPUs
        assert not str(head["--signal"]).startswith("B:")
        if not spec.cluster.gpus_per_node:
            assert "--gpus-per-node" not in head and "--gres" not in head, name


def test_same_environment_setup_and_rendezvous(scripts):
    spec, texts = scripts
    native = exports(texts["sbatch"])
    assert native["PYTHONUNBUFFERED"] == "1" and "MASTER_ADDR" in native
    assert "\nexport MASTER_PORT\n" in texts["sbatch"]  # picked free at job start
    for name in ("submitit", "nemo_run"):
        theirs = exports(texts[name])
        for key, value in native.items():
            assert theirs.get(key) == value, (name, key, theirs.get(key), value)
        for line in spec.cluster.setup:
            assert line in texts[name].splitlines(), (name, line)
        # the same rendezvous lines (rank 0 on the first node, a port free there at job start)
        for line in texts["sbatch"].splitlines():
            if line.startswith(
                ("MASTER_NODE=", "MASTER_ADDR=", "MASTER_PORT=", "export MASTER_PORT")
            ):
                assert line in texts[name].splitlines(), (name, line)
        # and the same working directory
        assert f"cd {shlex.quote(spec.cluster.workdir)} || exit 1" in texts[name]
    for key, value in spec.cluster.env.items():
        assert native[key] == value


def test_same_srun_flags_and_trainer_command(scripts):
    spec, texts = scripts
    trainer = [spec.cluster.python, "-m", "bionemo.train"]
    native = srun_words(texts["sbatch"])
    expected_flags = slurm.srun_flags(spec, kill_on_bad_exit=True)
    assert srun_flags(native)[1:] == expected_flags  # after --output
    assert native[-4:] == [*trainer, "$RUN_DIR"]
    assert f"RUN_DIR={shlex.quote(str(spec.run_dir))}" in texts["sbatch"]

    # NeMo-Run: srun runs the trainer itself, one task per GPU (no torchrun)
    words = srun_words(texts["nemo_run"])
    flags = srun_flags(words)
    assert words[-4:] == [*trainer, str(spec.run_dir)]
    it = iter(flags)
    assert all(f in it for f in expected_flags), flags  # in order
    assert last_value(flags, "--kill-on-bad-exit") == "1"  # a dead rank ends the step
    if not spec.cluster.container_image:
        assert last_value(flags, "--chdir") == spec.cluster.workdir
    assert "torchrun" not in texts["nemo_run"] and "torch.distributed.run" not in texts["nemo_run"]

    # submitit: srun runs submitit's task runner, which starts the same trainer command
    words = srun_words(texts["submitit"])
    it = iter(srun_flags(words))
    assert all(f in it for f in expected_flags)
    assert words[-5:] == [
        spec.cluster.python,
        "-u",
        "-m",
        "submitit.core._submit",
        str(spec.run_dir / "submitit"),
    ]
    job = submitit_backend.TrainerJob.of(spec)
    assert job.command() == [*trainer, str(spec.run_dir)]


def test_same_requeue_policy(scripts):
    spec, texts = scripts
    decision = '-m launchers.requeue "$RUN_DIR"'
    # native: the batch script hands srun's exit code to launchers.requeue
    assert decision in texts["sbatch"]
    # NeMo-Run: its own retry rule is off, the same decision runs at exit with srun's exit code
    nemo = texts["nemo_run"]
    assert "export TORCHX_MAX_RETRIES=0" in nemo
    assert decision in nemo and "trap bionemo_requeue EXIT" in nemo
    assert "trap 'terminated=1' TERM" in nemo and "rc=$exitcode" in nemo
    assert f"PY={shlex.quote(spec.cluster.host_python)}" in nemo
    # submitit: the job is a Checkpointable whose checkpoint() asks launchers.requeue.decide;
    # submitit's own timeout budget is the restart limit
    params = submitit_backend.parameters(spec)
    assert params["slurm_additional_parameters"]["requeue"] is True
    assert "SUBMITIT_PREEMPT_SIGNAL" in exports(texts["submitit"])
    assert exports(texts["submitit"])["SUBMITIT_PREEMPT_SIGNAL"] == spec.trainer.train.stop_signal


# ------------------------------------------------------------------------------------ sweep jobs


@pytest.fixture(scope="module", params=sorted(JOBS))
def sweep_scripts(request):
    j = JOBS[request.param]
    resolved = config.resolve(
        model=j["model"],
        cluster=j["cluster"],
        nodes=j["nodes"],
        overrides=j["overrides"],
        kind="sweep",
        now=NOW,
        options=[
            ("--max", "sweep.max", "48"),
            ("--recompute", "sweep.recompute", "none,selective"),
        ],
    )
    spec = specs.build(resolved, strict=False)
    return spec, {
        "sbatch": sbatch.render(spec),
        "submitit": submitit_backend.script(spec),
        "nemo_run": nemo_run_backend.script(spec),
    }


def test_sweep_runs_one_orchestrator_in_the_same_allocation(sweep_scripts):
    """A sweep job: the profile's allocation, no requeue, the same environment, and the same
    orchestrator command -- in the batch shell (sbatch) or in a one-task step on the first node,
    outside any container, whose trials then overlap it (submitit, NeMo-Run)."""
    from launchers import sweep

    spec, texts = sweep_scripts
    for name, text in texts.items():
        head = header(text)
        assert head["--nodes"] == str(spec.job.nodes), name
        assert head["--ntasks-per-node"] == str(spec.tasks_per_node), name
        assert head.get("--gpus-per-node") == (
            str(spec.cluster.gpus_per_node) if spec.cluster.gpus_per_node else None
        ), name
        assert "--requeue" not in head, name
        assert "bionemo.train" not in text and "launchers.requeue" not in text, name
    assert "--signal" not in header(texts["sbatch"]) and "--signal" not in header(texts["nemo_run"])
    native_env = exports(texts["sbatch"])
    for name in ("submitit", "nemo_run"):
        assert {k: exports(texts[name]).get(k) for k in native_env} == native_env, name

    in_shell = sweep.command(spec, in_step=False)
    in_step = sweep.command(spec, in_step=True)
    assert in_step == in_shell + ["--srun-arg=--overlap"]
    assert in_shell[:4] == [
        sweep.orchestrator_python(spec),
        "-m",
        "launchers.sweeping",
        "--inside-allocation",
    ]
    joined = texts["sbatch"].replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if "-m launchers.sweeping" in ln]
    assert shlex.split(line) == in_shell

    one_task = ["--nodes=1", "--ntasks=1", "--ntasks-per-node=1"]
    words = srun_words(texts["nemo_run"])
    flags = srun_flags(words)
    it = iter(flags)
    assert all(f in it for f in one_task), flags
    assert not [f for f in flags if f.startswith("--container")]
    assert words[words.index(in_step[0]) :] == in_step

    words = srun_words(texts["submitit"])
    flags = srun_flags(words)
    assert all(f in flags for f in one_task) and not [f for f in flags if "container" in f]
    assert words[-5:-3] == [sweep.orchestrator_python(spec), "-u"]
    assert submitit_backend.SweepJob.of(spec).command == in_step


# ------------------------------------------------------------------------------------ submitit job


def test_submitit_job_pickles_its_settings_only_and_checkpoint_requeues(tmp_path, monkeypatch):
    """checkpoint() waits for the trainer, applies launchers.requeue.decide, records the attempt,
    and returns a fresh DelayedSubmission (submitit then requeues); a finished run unwinds into
    __call__ instead, and a stop decision raises with the policy's reason."""
    from submitit.helpers import DelayedSubmission

    from launchers import requeue

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000010" / "COMPLETE").write_text("")
    record.create(
        run_dir,
        backend="submitit",
        cluster="local",
        policy=dict(max_restarts=3, requeue_exit_code=75, oom_exit_code=12),
    )
    calls = []
    real = requeue.decide
    monkeypatch.setattr(requeue, "decide", lambda **kw: calls.append(kw) or real(**kw))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")

    job = submitit_backend.TrainerJob(str(run_dir), "/bin/python", str(tmp_path), "USR2")
    job._proc, job._rc = object(), 75  # the trainer saved on the warning signal and exited 75
    out = job.checkpoint()
    assert isinstance(out, DelayedSubmission) and isinstance(
        out.function, submitit_backend.TrainerJob
    )
    assert out.function is not job and out.function._proc is None
    assert calls and calls[-1]["exit_code"] == 75
    (attempt,) = record.load(run_dir)["attempts"]
    assert (attempt["outcome"], attempt["decision"], attempt["job_id"]) == (
        "stopped",
        "requeue",
        "42",
    )

    # no progress since that requeue: stop, with the policy's reason
    again = submitit_backend.TrainerJob(str(run_dir), "/bin/python", str(tmp_path), "USR2")
    again._proc, again._rc = object(), 75
    with pytest.raises(submitit_backend.RunStopped, match="no progress"):
        again.checkpoint()

    # finished: unwinds (into __call__, which returns 0)
    (run_dir / "finished").write_text("10\n")
    done = submitit_backend.TrainerJob(str(run_dir), "/bin/python", str(tmp_path), "USR2")
    done._proc, done._rc = object(), 0
    with pytest.raises(submitit_backend._Finished):
        done.checkpoint()

    # what submitit pickles: the settings, none of a task's runtime state
    clone = pickle.loads(pickle.dumps(job))
    assert clone.__dict__.keys() >= {"run_dir", "python", "workdir", "stop_signal"}
    assert clone._proc is None and clone._rc is None and not clone._decided


def test_submitit_executor_maps_the_profile(monkeypatch):
    spec = _spec("h100")
    params = submitit_backend.parameters(spec)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (8, 8, 8)
    assert params["cpus_per_task"] == 16 and params["timeout_min"] == 240
    assert (params["slurm_partition"], params["slurm_account"], params["slurm_qos"]) == (
        "batch",
        "bionemo",
        "normal",
    )
    assert params["slurm_signal_delay_s"] == 300 and params["slurm_exclusive"] is True
    assert (
        "--container-image=/lustre/fsw/bionemo/images/bionemo-hpc.sqsh" in params["slurm_srun_args"]
    )
    with submitit_backend._without_srun_check():
        ex = submitit_backend.make_executor(spec)
    assert ex._executor.max_num_timeout == 7  # job.max_restarts
    assert ex._executor.python == "python"


def test_nemo_run_executor_maps_the_profile(monkeypatch, tmp_path):
    spec = _spec("h100")
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "home"))  # restored after the test
    run = nemo_run_backend.nemo_run(tmp_path / "home")
    ex = nemo_run_backend.make_executor(spec, run)
    assert isinstance(ex, run.SlurmExecutor) and isinstance(ex.tunnel, run.LocalTunnel)
    assert type(ex.packager) is run.Packager  # no git archive: the shared checkout runs
    assert (ex.nodes, ex.ntasks_per_node, ex.gpus_per_node, ex.cpus_per_task) == (8, 8, 8, 16)
    assert ex.retries == 0 and ex.launcher is None
    assert ex.signal == "USR2@300" and ex.additional_parameters["requeue"] is True
    # a remote login node: SSHTunnel (nothing connects until submit)
    monkeypatch.setenv(nemo_run_backend.SSH_ENV, "alice@login.example.org")
    ssh = nemo_run_backend.make_executor(spec, run).tunnel
    assert isinstance(ssh, run.SSHTunnel) and (ssh.user, ssh.host) == ("alice", "login.example.org")


def test_nemo_run_refuses_paths_it_would_rewrite(tmp_path):
    spec = _spec("local")
    bad = specs.JobSpec(spec.config, tmp_path / "nemo_run" / "x", (), ())
    with pytest.raises(nemo_run_backend.BackendError, match="nemo_run"):
        nemo_run_backend._check_paths(bad, nemo_run_backend.home_of(bad.run_dir))


@pytest.fixture
def restore_signals():
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_submitit_task_requeues_a_crash_once_then_stops(tmp_path, monkeypatch, restore_signals):
    """Without a warning signal, rank 0's task decides after the trainer exits: a crash is
    requeued once through submitit's JobEnvironment, a second crash at the same step stops."""
    import sys

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record.create(
        run_dir,
        backend="submitit",
        cluster="local",
        policy=dict(max_restarts=3, requeue_exit_code=75, oom_exit_code=12),
    )
    requeued = []

    class FakeEnvironment:  # what submitit.JobEnvironment() is inside a SLURM task
        global_rank = 0

        def _requeue(self, countdown):
            requeued.append(countdown)

    monkeypatch.setattr(submitit_backend.submitit, "JobEnvironment", FakeEnvironment)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    # the real trainer entry point; without config.yaml it exits 2 at once (a "crash")
    job = submitit_backend.TrainerJob(str(run_dir), sys.executable, str(config.REPO_ROOT))
    with pytest.raises(SystemExit):  # requeued: the task exits as submitit's handler does
        job()
    assert requeued == [0]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(submitit_backend.RunStopped, match="crash loop"):
        submitit_backend.TrainerJob(str(run_dir), sys.executable, str(config.REPO_ROOT))()
    assert requeued == [0]
    first, second = record.load(run_dir)["attempts"]
    assert (first["outcome"], first["decision"], first["exit_code"]) == ("crashed", "requeue", 2)
    assert (second["outcome"], second["decision"]) == ("crashed", "stop")
