"""The bundled cluster's configuration: its constants, folders and the files `cluster up` writes
(slurm.conf, gres.conf, cgroup.conf, the munge key). launchers/cluster.py starts and queries the
daemons that read them. Stdlib only, like cluster.py.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import socket
from pathlib import Path

from launchers.paths import REPO_ROOT

CLUSTER_NAME = "bionemo-local"
PARTITION = "debug"
NODE_COUNT = 4
NODES: tuple[str, ...] = tuple(f"node{i}" for i in range(1, NODE_COUNT + 1))
NODE_CPUS = 4  # claimed per fake node (SlurmdParameters=config_overrides), whatever the host has
NODE_MEMORY_MB = 8000
# Ports away from the SLURM defaults (6817/6818) so a system installation does not clash.
CTLD_PORT = int(os.environ.get("BIONEMO_CLUSTER_CTLD_PORT", "16817"))
SLURMD_BASE_PORT = int(
    os.environ.get("BIONEMO_CLUSTER_SLURMD_PORT", "17001")
)  # node K: base + K - 1
KILL_WAIT_S = 10
# 1, not 2: with 2, a node an admin (or a test) sets DOWN "returns to service" within milliseconds
# because its slurmd still answers, so a requeued job may land on it again.  With 1 it stays DOWN
# until `scontrol update nodename=X state=resume` (reset_node()); non-responding nodes still come
# back by themselves when their slurmd registers again.
RETURN_TO_SERVICE = 1
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


class ClusterError(RuntimeError):
    """The bundled cluster could not be installed, started or queried."""


# --------------------------------------------------------------------------------------------- paths


def cluster_dir() -> Path:
    """Directory holding config, keys, state and logs of the bundled cluster."""
    override = os.environ.get("BIONEMO_CLUSTER_DIR")
    return Path(override).expanduser().resolve() if override else REPO_ROOT / ".cluster"


def conf_path() -> Path:
    return cluster_dir() / "etc" / "slurm.conf"


def log_dir() -> Path:
    return cluster_dir() / "log"


def munge_socket() -> Path:
    sock = cluster_dir() / "munge" / "munge.socket"
    if len(str(sock)) < 100:  # AF_UNIX paths are limited to 108 bytes
        return sock
    digest = hashlib.sha1(str(cluster_dir()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"bionemo-munge-{digest}" / "munge.socket"


def slurm_env() -> dict[str, str]:
    """Environment variables a SLURM client needs to talk to the bundled cluster."""
    return {"SLURM_CONF": str(conf_path())}


def log_files() -> dict[str, Path]:
    """Daemon log files, for debugging (they may not exist yet)."""
    logs = {"slurmctld": log_dir() / "slurmctld.log", "munged": log_dir() / "munged.log"}
    logs.update({f"slurmd-{n}": log_dir() / f"slurmd-{n}.log" for n in NODES})
    return logs


# --------------------------------------------------------------------------------------------- config


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def hostname_is_loopback() -> bool:
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
            raise ClusterError(
                f"{GPUS_ENV}={told!r} is not a number of GPUs; give N >= 0, or unset it to detect"
            )
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
    owned = {node: devices[i * share : (i + 1) * share] for i, node in enumerate(NODES)}
    return {node: gpus for node, gpus in owned.items() if gpus}


def _plugin_dir() -> str | None:
    path = os.environ.get(PLUGIN_DIR_ENV)
    if path and (re.search(r"[\s#]", path) or not Path(path).is_dir()):
        raise ClusterError(
            f"{PLUGIN_DIR_ENV}={path!r} is not a folder (or has spaces or '#'); "
            "point it at the folder holding SLURM's *.so plugins"
        )
    return path or None


def render_gres() -> str | None:
    """gres.conf: one line per GPU naming its device file; None without GPUs."""
    lines = [
        f"NodeName={node} Name=gpu File=/dev/nvidia{k}"
        for node, gpus in node_gpus().items()
        for k in gpus
    ]
    return (
        "# Generated by launchers/cluster.py, with slurm.conf.\n" + "\n".join(lines) + "\n"
        if lines
        else None
    )


def render_cgroup() -> str | None:
    """cgroup.conf naming BIONEMO_CLUSTER_CGROUP_PLUGIN; None (SLURM's autodetect) when unset."""
    plugin = os.environ.get(CGROUP_PLUGIN_ENV)
    if not plugin:
        return None
    if plugin not in _CGROUP_PLUGINS:
        raise ClusterError(
            f"{CGROUP_PLUGIN_ENV}={plugin!r} is not a cgroup plugin; use one of "
            f"{', '.join(_CGROUP_PLUGINS)}"
        )
    return f"# Generated by launchers/cluster.py, with slurm.conf.\nCgroupPlugin={plugin}\n"


def render_files() -> dict[str, str | None]:
    """File name in etc/ -> its text; None: the file must not exist."""
    return {
        "slurm.conf": render_config(),
        "gres.conf": render_gres(),
        "cgroup.conf": render_cgroup(),
    }


def config_current() -> bool:
    etc = conf_path().parent
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
        f"AuthInfo=socket={munge_socket()}",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmdSpoolDir={d / 'spool'}/%n",
        f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={d / 'run'}/slurmd-%n.pid",
        f"SlurmctldLogFile={log_dir() / 'slurmctld.log'}",
        f"SlurmdLogFile={log_dir()}/slurmd-%n.log",
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
    lines += (
        ["CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"] if hostname_is_loopback() else []
    )
    gpus = node_gpus()
    lines += ["GresTypes=gpu"] if gpus else []
    lines += [f"PluginDir={_plugin_dir()}"] if _plugin_dir() else []
    for i, node in enumerate(NODES):
        gres = f" Gres=gpu:{len(gpus[node])}" if node in gpus else ""
        lines.append(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={SLURMD_BASE_PORT + i} "
            f"CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB}{gres} State=UNKNOWN"
        )
    lines.append(
        f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP"
    )
    return "\n".join(lines) + "\n"


def write_config() -> bool:
    """Create the directory tree, slurm.conf, gres.conf and cgroup.conf; True when one changed."""
    d = cluster_dir()
    for sub in ("etc", "state", "spool", "run", "log", "munge"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for node in NODES:
        (d / "spool" / node).mkdir(exist_ok=True)
    sock_dir = munge_socket().parent
    sock_dir.mkdir(parents=True, exist_ok=True)
    for p in (d / "munge", sock_dir):
        p.chmod(
            0o755
        )  # munged refuses group/world-writable dirs; clients need +x to reach the socket
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
