"""The bundled local SLURM cluster: one slurmctld and four slurmd's on 127.0.0.1.

Everything lives in a project-local directory (``<repo>/.cluster`` unless ``BIONEMO_CLUSTER_DIR`` is
set): the generated ``slurm.conf``, a private munge key and munged socket, controller state, node
spool directories, pid files and logs.  Nothing under ``/etc`` is touched, so the cluster coexists
with a system SLURM installation as long as the ports below are free.

Clients (``sbatch``, ``squeue``, ``scontrol``, ``scancel``, ``srun``) find the cluster through
``SLURM_CONF``; merge :func:`slurm_env` into a copy of ``os.environ`` before running them.

Usage::

    from launchers import cluster
    cluster.up()                      # idempotent; installs slurm-wlm/munge when missing (root only)
    env = {**os.environ, **cluster.slurm_env()}
    subprocess.run(["sbatch", "job.sh"], env=env)
    cluster.down()                    # stops the daemons, keeps config and state

or ``python -m launchers.cluster up|down|status``.

This module is deliberately stdlib-only so the launcher CLI stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLUSTER_NAME = "bionemo-local"
PARTITION = "debug"
NODE_COUNT = 4
NODES: tuple[str, ...] = tuple(f"node{i}" for i in range(1, NODE_COUNT + 1))
NODE_CPUS = 4  # claimed per fake node (SlurmdParameters=config_overrides), whatever the host has
NODE_MEMORY_MB = 8000
# Ports away from the SLURM defaults (6817/6818) so a system installation does not clash.
CTLD_PORT = int(os.environ.get("BIONEMO_CLUSTER_CTLD_PORT", "16817"))
SLURMD_BASE_PORT = int(os.environ.get("BIONEMO_CLUSTER_SLURMD_PORT", "17001"))  # node K: base + K - 1
KILL_WAIT_S = 10
# 1, not 2: with 2, a node an admin (or a test) sets DOWN "returns to service" within milliseconds
# because its slurmd still answers, so a requeued job may land on it again.  With 1 it stays DOWN
# until `scontrol update nodename=X state=resume` (reset_node()); non-responding nodes still come
# back by themselves when their slurmd registers again.
RETURN_TO_SERVICE = 1
# up() on a running cluster resumes a DOWN/DRAINED node only once its Reason is this old (seconds).
RESUME_GRACE_S = 30.0
MIN_JOB_AGE_S = 3600
# GPUs become gres when the host has /dev/nvidiaK device files (gres.conf names them, so that srun
# sets CUDA_VISIBLE_DEVICES); BIONEMO_CLUSTER_GPUS=N overrides the count, 0 turns them off. Without
# GPUs slurm.conf is exactly the CPU cluster's. Each GPU belongs to one node (render_gres()).
GPUS_ENV = "BIONEMO_CLUSTER_GPUS"
# A SLURM unpacked into a private prefix (benchmarks/slurm_gpu/prepare.sh) keeps its plugins away
# from the compiled-in folder: PluginDir= in slurm.conf. Where the cgroup/v2 plugin cannot start
# (gVisor), cgroup.conf must name another one (cgroup/v1). Unset: neither line nor file.
PLUGIN_DIR_ENV = "BIONEMO_SLURM_PLUGIN_DIR"
CGROUP_PLUGIN_ENV = "BIONEMO_CLUSTER_CGROUP_PLUGIN"
_CGROUP_PLUGINS = ("autodetect", "cgroup/v1", "cgroup/v2")

REPO_ROOT = Path(__file__).resolve().parents[1]
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin")
_DAEMONS = ("slurmctld", "slurmd", "munged")
_CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "munge", "unmunge")
_APT_PACKAGES = ("slurm-wlm", "munge")
_GOOD_BASE_STATES = {"IDLE", "ALLOCATED", "MIXED"}
_BAD_FLAGS = {"DRAIN", "NOT_RESPONDING", "FAIL", "POWERED_DOWN", "POWERING_DOWN", "INVALID_REG", "REBOOT_ISSUED"}


class ClusterError(RuntimeError):
    """The bundled cluster could not be installed, started or queried."""


# --------------------------------------------------------------------------------------------- paths


def cluster_dir() -> Path:
    """Directory holding config, keys, state and logs of the bundled cluster."""
    override = os.environ.get("BIONEMO_CLUSTER_DIR")
    return Path(override).expanduser().resolve() if override else REPO_ROOT / ".cluster"


def _conf_path() -> Path:
    return cluster_dir() / "etc" / "slurm.conf"


def _log_dir() -> Path:
    return cluster_dir() / "log"


def _munge_socket() -> Path:
    sock = cluster_dir() / "munge" / "munge.socket"
    if len(str(sock)) < 100:  # AF_UNIX paths are limited to 108 bytes
        return sock
    digest = hashlib.sha1(str(cluster_dir()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"bionemo-munge-{digest}" / "munge.socket"


def slurm_env() -> dict[str, str]:
    """Environment variables a SLURM client needs to talk to the bundled cluster."""
    return {"SLURM_CONF": str(_conf_path())}


def log_files() -> dict[str, Path]:
    """Daemon log files, for debugging (they may not exist yet)."""
    logs = {"slurmctld": _log_dir() / "slurmctld.log", "munged": _log_dir() / "munged.log"}
    logs.update({f"slurmd-{n}": _log_dir() / f"slurmd-{n}.log" for n in NODES})
    return logs


# --------------------------------------------------------------------------------------------- binaries


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which(name, path=path)


def _missing_binaries() -> list[str]:
    return [b for b in (*_DAEMONS, *_CLIENTS) if _which(b) is None]


def _ensure_installed() -> None:
    missing = _missing_binaries()
    if not missing:
        return
    hint = f"apt-get install -y {' '.join(_APT_PACKAGES)}"
    if os.geteuid() != 0:
        raise ClusterError(
            f"SLURM/munge binaries missing ({', '.join(missing)}) and not running as root, so they cannot be "
            f"installed automatically. Install them first, e.g. `sudo {hint}` (Debian/Ubuntu), then retry."
        )
    if _which("apt-get") is None:
        raise ClusterError(f"SLURM/munge binaries missing ({', '.join(missing)}) and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", *_APT_PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # stale package lists are the usual cause
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    missing = _missing_binaries()
    if result.returncode != 0 or missing:
        raise ClusterError(
            f"`{' '.join(install)}` failed (rc={result.returncode}, still missing: {missing}):\n"
            f"{result.stderr[-2000:]}"
        )


# --------------------------------------------------------------------------------------------- config


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _hostname_is_loopback() -> bool:
    """True when this host's name resolves to 127.0.0.1. SLURM binds either every address or, with
    NoCtldInAddrAny/NoInAddrAny, the one the host name resolves to; only then is that 127.0.0.1."""
    try:
        return socket.gethostbyname(socket.gethostname()) == "127.0.0.1"
    except OSError:
        return False


def _slurm_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _gpu_devices() -> list[int]:
    """Indices K of the host's GPUs, /dev/nvidiaK (or 0..N-1 with BIONEMO_CLUSTER_GPUS=N)."""
    told = os.environ.get(GPUS_ENV)
    if told is not None:
        if not told.isdigit():
            raise ClusterError(f"{GPUS_ENV}={told!r} is not a number of GPUs; give N >= 0, or unset it to detect")
        return list(range(int(told)))
    found = (re.fullmatch(r"nvidia(\d+)", p.name) for p in Path("/dev").glob("nvidia*"))
    return sorted(int(m.group(1)) for m in found if m)


def node_gpus() -> dict[str, list[int]]:
    """Node -> the GPU indices it owns: an equal share (at least one) for each of the first nodes.

    Every GPU is on one node only, so two jobs never get the same device; 1 GPU: node1, 2: node1
    and node2, 8: two on each node. GPUs beyond NODE_COUNT * share stay unused.
    """
    devices = _gpu_devices()
    share = max(1, len(devices) // NODE_COUNT)
    owned = {node: devices[i * share:(i + 1) * share] for i, node in enumerate(NODES)}
    return {node: gpus for node, gpus in owned.items() if gpus}


def _plugin_dir() -> str | None:
    path = os.environ.get(PLUGIN_DIR_ENV)
    if path and (re.search(r"[\s#]", path) or not Path(path).is_dir()):
        raise ClusterError(f"{PLUGIN_DIR_ENV}={path!r} is not a folder (or has spaces or '#'); "
                           "point it at the folder holding SLURM's *.so plugins")
    return path or None


def render_gres() -> str | None:
    """gres.conf: one line per GPU naming its device file; None without GPUs."""
    lines = [f"NodeName={node} Name=gpu File=/dev/nvidia{k}"
             for node, gpus in node_gpus().items() for k in gpus]
    return "# Generated by launchers/cluster.py, with slurm.conf.\n" + "\n".join(lines) + "\n" if lines else None


def render_cgroup() -> str | None:
    """cgroup.conf naming BIONEMO_CLUSTER_CGROUP_PLUGIN; None (SLURM's autodetect) when unset."""
    plugin = os.environ.get(CGROUP_PLUGIN_ENV)
    if not plugin:
        return None
    if plugin not in _CGROUP_PLUGINS:
        raise ClusterError(f"{CGROUP_PLUGIN_ENV}={plugin!r} is not a cgroup plugin; use one of "
                           f"{', '.join(_CGROUP_PLUGINS)}")
    return f"# Generated by launchers/cluster.py, with slurm.conf.\nCgroupPlugin={plugin}\n"


def render_files() -> dict[str, str | None]:
    """File name in etc/ -> its text; None: the file must not exist."""
    return {"slurm.conf": render_config(), "gres.conf": render_gres(), "cgroup.conf": render_cgroup()}


def _config_current() -> bool:
    etc = _conf_path().parent
    for name, text in render_files().items():
        path = etc / name
        if (path.read_text() if path.exists() else None) != text:
            return False
    return True


def render_config() -> str:
    """The slurm.conf text for the bundled cluster (function of cluster_dir(), the constants and the
    GPU and plugin-folder variables above)."""
    d = cluster_dir()
    host = _short_hostname()
    user = _slurm_user()
    lines = [
        "# Generated by launchers/cluster.py -- do not edit, it is rewritten by `cluster up`.",
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={CTLD_PORT}",
        f"SlurmdPort={SLURMD_BASE_PORT}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={_munge_socket()}",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmdSpoolDir={d / 'spool'}/%n",
        f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={d / 'run'}/slurmd-%n.pid",
        f"SlurmctldLogFile={_log_dir() / 'slurmctld.log'}",
        f"SlurmdLogFile={_log_dir()}/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "MailProg=/bin/true",
        # No cgroups: fake nodes share one kernel, and containers often lack a writable hierarchy.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2,bf_interval=2,batch_sched_delay=1",
        "SlurmdParameters=config_overrides",
        f"ReturnToService={RETURN_TO_SERVICE}",
        "JobRequeue=1",
        f"MinJobAge={MIN_JOB_AGE_S}",
        f"KillWait={KILL_WAIT_S}",
        "InactiveLimit=0",
        "Waittime=0",
        "OverTimeLimit=0",
        "SlurmdTimeout=30",
        "SlurmctldTimeout=30",
    ]
    # Daemons (and srun's listeners) on 127.0.0.1 only: a single-host cluster (docs/local-cluster.md).
    lines += ["CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"] if _hostname_is_loopback() else []
    gpus = node_gpus()
    lines += ["GresTypes=gpu"] if gpus else []
    lines += [f"PluginDir={_plugin_dir()}"] if _plugin_dir() else []
    for i, node in enumerate(NODES):
        gres = f" Gres=gpu:{len(gpus[node])}" if node in gpus else ""
        lines.append(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={SLURMD_BASE_PORT + i} "
            f"CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB}{gres} State=UNKNOWN"
        )
    lines.append(f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _write_config() -> bool:
    """Create the directory tree, slurm.conf, gres.conf and cgroup.conf; True when one changed."""
    d = cluster_dir()
    for sub in ("etc", "state", "spool", "run", "log", "munge"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for node in NODES:
        (d / "spool" / node).mkdir(exist_ok=True)
    sock_dir = _munge_socket().parent
    sock_dir.mkdir(parents=True, exist_ok=True)
    for p in (d / "munge", sock_dir):
        p.chmod(0o755)  # munged refuses group/world-writable dirs; clients need +x to reach the socket
    changed = False
    for name, text in render_files().items():
        path = d / "etc" / name
        if text is None:  # e.g. gres.conf of a GPU run in the same directory earlier
            changed |= path.exists()
            path.unlink(missing_ok=True)
        elif not path.exists() or path.read_text() != text:
            changed = True
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    key = d / "munge" / "munge.key"
    if not key.exists():
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
    key.chmod(0o400)
    return changed


# --------------------------------------------------------------------------------------------- processes


def _proc_cmdlines() -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if not raw or stat.rsplit(")", 1)[-1].split()[0] == "Z":  # skip kernel threads and zombies
            continue
        out[int(entry)] = raw.rstrip(b"\0").decode(errors="replace").split("\0")
    return out


def _daemon_pids() -> dict[str, int]:
    """Running daemons of *this* cluster, keyed 'munged', 'slurmctld', 'slurmd-nodeK'.

    Our daemons are recognised by their command line (it names our slurm.conf or munge socket), which
    survives stale pid files and daemons started by another process.
    """
    conf, sock = str(_conf_path()), str(_munge_socket())
    found: dict[str, int] = {}
    for pid, argv in _proc_cmdlines().items():
        exe = os.path.basename(argv[0])
        if exe == "munged" and any(sock in a for a in argv):
            found["munged"] = pid
        elif exe in ("slurmctld", "slurmd") and conf in argv:
            if exe == "slurmctld":
                found["slurmctld"] = pid
            elif "-N" in argv and argv.index("-N") + 1 < len(argv):
                found[f"slurmd-{argv[argv.index('-N') + 1]}"] = pid
    return found


def _expected_daemons() -> list[str]:
    return ["munged", "slurmctld", *(f"slurmd-{n}" for n in NODES)]


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _daemon_env() -> dict[str, str]:
    # Drop SLURM_* job variables (up() may be called from inside a job) but keep the rest.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, **slurm_env()}


def _spawn(name: str, argv: list[str]) -> None:
    """Start a self-daemonising program detached from us (own session, no inherited stdio)."""
    out_path = _log_dir() / f"{name}.stdout"
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cluster_dir(),
            env=_daemon_env(),
            start_new_session=True,
            close_fds=True,
        )
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return  # did not fork into the background, but it runs detached anyway
    if rc != 0:
        raise ClusterError(f"{name} exited with {rc} at start:\n{_tail(out_path)}\n{_tail(_log_for(name))}")


def _log_for(name: str) -> Path:
    return log_files().get(name, _log_dir() / f"{name}.log")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _munge_works() -> bool:
    sock = str(_munge_socket())
    try:
        cred = subprocess.run([_which("munge") or "munge", "-n", "-S", sock], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        check = subprocess.run(
            [_which("unmunge") or "unmunge", "-S", sock], input=cred.stdout, capture_output=True, timeout=10
        )
        return check.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ensure_munge(deadline: float) -> None:
    running = _daemon_pids().get("munged")
    if running and _munge_works():
        return
    if running:  # alive but not answering: replace it
        _stop_pids({"munged": running})
    d = cluster_dir()
    sock = _munge_socket()
    sock.unlink(missing_ok=True)
    _spawn(
        "munged",
        [
            _which("munged") or "munged",
            f"--socket={sock}",
            f"--key-file={d / 'munge' / 'munge.key'}",
            f"--pid-file={d / 'run' / 'munged.pid'}",
            f"--log-file={_log_dir() / 'munged.log'}",
            f"--seed-file={d / 'munge' / 'munged.seed'}",
            "--force",  # tolerate running as root and a non-standard directory layout
        ],
    )
    while time.monotonic() < deadline:
        if _munge_works():
            return
        time.sleep(0.2)
    raise ClusterError(f"munged did not come up on {sock}:\n{_tail(_log_dir() / 'munged.log')}")


def _ensure_slurmctld() -> None:
    if "slurmctld" not in _daemon_pids():
        if _port_taken(CTLD_PORT):
            raise ClusterError(
                f"port {CTLD_PORT} is in use by another program (another cluster?); "
                f"pick free ports with BIONEMO_CLUSTER_CTLD_PORT / BIONEMO_CLUSTER_SLURMD_PORT"
            )
        # -i: ignore unreadable state files (e.g. after a crash) instead of refusing to start.
        _spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-i", "-f", str(_conf_path())])


def _ensure_slurmd(node: str) -> None:
    if node not in NODES:
        raise ClusterError(f"unknown node {node!r}; nodes are {', '.join(NODES)}")
    if f"slurmd-{node}" not in _daemon_pids():
        port = SLURMD_BASE_PORT + NODES.index(node)
        if _port_taken(port):
            raise ClusterError(
                f"port {port} (slurmd of {node}) is in use by another program; "
                f"pick free ports with BIONEMO_CLUSTER_SLURMD_PORT"
            )
        _spawn(f"slurmd-{node}", [_which("slurmd") or "slurmd", "-f", str(_conf_path()), "-N", node])


def _stop_pids(pids: dict[str, int], timeout: float = 20.0) -> None:
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = dict(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        current = _proc_cmdlines()
        alive = {k: p for k, p in alive.items() if p in current}
    for pid in alive.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _lock():
    """Serialise up()/down() between processes (parallel test sessions share one cluster)."""
    d = cluster_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- queries


def _client(args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    exe = _which(args[0]) or args[0]
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, env=_daemon_env(), timeout=timeout)


def _ctld_answers() -> bool:
    try:
        out = _client(["scontrol", "ping"], timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "is UP" in out.stdout


def _node_table() -> dict[str, tuple[str, float | None]]:
    """Node name -> (state, epoch seconds when its Reason was set, or None)."""
    out = _client(["scontrol", "show", "node", "-o"], timeout=15)
    if out.returncode != 0:
        raise ClusterError(f"scontrol show node failed: {out.stderr.strip()}")
    table: dict[str, tuple[str, float | None]] = {}
    for line in out.stdout.splitlines():
        name, state = re.search(r"NodeName=(\S+)", line), re.search(r"\bState=(\S+)", line)
        if not (name and state):
            continue
        since = None
        stamp = re.search(r"\bReason=.*\[[^@\]]*@(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\]", line)
        if stamp:
            with contextlib.suppress(ValueError, OverflowError):
                since = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S"))
        table[name.group(1)] = (state.group(1), since)
    return table


def node_states() -> dict[str, str]:
    """Node name -> SLURM state string as `scontrol show node` prints it, e.g. 'IDLE', 'DOWN+NOT_RESPONDING'."""
    return {name: state for name, (state, _) in _node_table().items()}


def node_usable(state: str) -> bool:
    """True for a node state in which the node can run jobs (IDLE/ALLOCATED/MIXED, not drained or down)."""
    base, *flags = state.rstrip("*~#!%$@^-").split("+")
    return base in _GOOD_BASE_STATES and not (set(flags) & _BAD_FLAGS)


def is_up() -> bool:
    """All daemons run here, the controller answers and every node is usable."""
    if not _conf_path().exists() or _which("scontrol") is None:
        return False
    if set(_expected_daemons()) - set(_daemon_pids()) or not _ctld_answers():
        return False
    try:
        states = node_states()
    except (ClusterError, OSError, subprocess.TimeoutExpired):
        return False
    return set(NODES) <= set(states) and all(node_usable(states[n]) for n in NODES)


def _wait_usable(nodes: tuple[str, ...], deadline: float, resume_grace: float = 0.0) -> None:
    """Wait until `nodes` are usable, resuming DOWN/DRAINED ones whose Reason is older than resume_grace s.

    The grace keeps one session's up() from resuming a node another session's test has just set
    DOWN on purpose (that test brings it back itself with reset_node()).
    """
    last_resume = 0.0
    table: dict[str, tuple[str, float | None]] = {}
    while time.monotonic() < deadline:
        if _ctld_answers():
            with contextlib.suppress(ClusterError, OSError, subprocess.TimeoutExpired):
                table = _node_table()
            if all(node_usable(table.get(n, ("UNKNOWN", None))[0]) for n in nodes):
                return
            if time.monotonic() - last_resume > 3:
                now = time.time()
                stuck = [
                    n
                    for n, (state, since) in table.items()
                    if n in nodes and _needs_resume(state) and (since is None or now - since >= resume_grace)
                ]
                if stuck:
                    _client(["scontrol", "update", f"nodename={','.join(stuck)}", "state=resume"])
                    last_resume = time.monotonic()
        time.sleep(0.5)
    detail = ", ".join(f"{n}={table.get(n, ('?', None))[0]}" for n in nodes)
    raise ClusterError(
        f"cluster not ready before timeout ({detail}); slurmctld answers: {_ctld_answers()}.\n"
        f"--- slurmctld.log ---\n{_tail(_log_dir() / 'slurmctld.log')}\n"
        f"Logs: {_log_dir()}"
    )


def _needs_resume(state: str) -> bool:
    base, *flags = state.rstrip("*~#!%$@^-").split("+")
    # NOT_RESPONDING alone means the slurmd has not registered yet: waiting is enough.
    return base in ("DOWN", "DRAINED", "DRAINING", "FAIL", "FAILING") or bool({"DRAIN", "FAIL"} & set(flags))


# --------------------------------------------------------------------------------------------- API


def up(timeout: float = 60.0) -> None:
    """Start (or repair) the bundled cluster and wait until all nodes can run jobs. Idempotent."""
    deadline = time.monotonic() + timeout
    with _lock():  # also keeps parallel sessions from running apt-get at the same time
        _ensure_installed()
        if _config_current() and is_up():
            return
        changed = _write_config()
        if changed and _daemon_pids():
            _stop_pids(_daemon_pids())  # daemons run an outdated slurm.conf: restart them
        # A controller that was already running may have a node DOWN because a test (possibly in a
        # parallel session) is exercising node failure right now: leave fresh DOWN nodes alone for a
        # while. After a (re)start, anything DOWN/DRAINED is left over from a previous run.
        grace = RESUME_GRACE_S if "slurmctld" in _daemon_pids() else 0.0
        _ensure_munge(deadline)
        _ensure_slurmctld()
        for node in NODES:
            _ensure_slurmd(node)
        _wait_usable(NODES, deadline, resume_grace=grace)


def down() -> None:
    """Stop all daemons of the bundled cluster. Idempotent; config, state and logs stay."""
    with _lock():
        pids = _daemon_pids()
        slurm = {k: p for k, p in pids.items() if k != "munged"}
        _stop_pids(slurm)
        if "munged" in pids:
            _stop_pids({"munged": pids["munged"]})


def reset_node(name: str, timeout: float = 60.0) -> None:
    """Bring a node back after a failure test: restart its slurmd if needed and resume it."""
    deadline = time.monotonic() + timeout
    with _lock():
        _ensure_slurmd(name)
    _client(["scontrol", "update", f"nodename={name}", "state=resume"])  # errors if already usable: fine
    _wait_usable((name,), deadline)


def status() -> str:
    """Human-readable summary of the cluster."""
    lines = [f"cluster dir: {cluster_dir()}", f"SLURM_CONF={_conf_path()}"]
    pids = _daemon_pids()
    for name in _expected_daemons():
        lines.append(f"  {name:<14} {'pid ' + str(pids[name]) if name in pids else 'not running'}")
    if _ctld_answers():
        with contextlib.suppress(ClusterError, OSError, subprocess.TimeoutExpired):
            for node, state in node_states().items():
                lines.append(f"  {node:<14} {state}")
    lines.append(f"up: {is_up()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.cluster", description="Bundled local SLURM cluster")
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            up(timeout=args.timeout)
            print(f"cluster up in {time.monotonic() - t0:.1f}s; export SLURM_CONF={_conf_path()}")
        elif args.action == "down":
            down()
            print("cluster down")
        elif args.action == "env":
            for k, v in slurm_env().items():
                print(f"export {k}={v}")
        else:
            print(status())
            return 0 if is_up() else 1
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
