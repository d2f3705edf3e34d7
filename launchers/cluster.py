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

Stdlib only. The configuration it writes (slurm.conf, gres.conf, cgroup.conf) is rendered by
launchers/cluster_conf.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from launchers.cluster_conf import (
    CLUSTER_NAME,
    CTLD_PORT,
    NODE_COUNT,
    NODES,
    PARTITION,
    SLURMD_BASE_PORT,
    ClusterError,
    cluster_dir,
    conf_path,
    config_current,
    hostname_is_loopback,
    log_dir,
    log_files,
    munge_socket,
    node_gpus,
    render_config,
    render_files,
    slurm_env,
    write_config,
)

# up() on a running cluster resumes a DOWN/DRAINED node only once its Reason is this old (seconds).
RESUME_GRACE_S = 30.0
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin")
_DAEMONS = ("slurmctld", "slurmd", "munged")
_CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "munge", "unmunge")
_APT_PACKAGES = ("slurm-wlm", "munge")
_GOOD_BASE_STATES = {"IDLE", "ALLOCATED", "MIXED"}
_BAD_FLAGS = {
    "DRAIN",
    "NOT_RESPONDING",
    "FAIL",
    "POWERED_DOWN",
    "POWERING_DOWN",
    "INVALID_REG",
    "REBOOT_ISSUED",
}

__all__ = [  # the configuration's names, for `from launchers import cluster` users
    "CLUSTER_NAME",
    "CTLD_PORT",
    "NODE_COUNT",
    "NODES",
    "PARTITION",
    "SLURMD_BASE_PORT",
    "ClusterError",
    "cluster_dir",
    "hostname_is_loopback",
    "log_files",
    "node_gpus",
    "render_config",
    "render_files",
    "slurm_env",
    "down",
    "is_up",
    "main",
    "node_states",
    "node_usable",
    "reset_node",
    "status",
    "up",
]

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
        raise ClusterError(
            f"SLURM/munge binaries missing ({', '.join(missing)}) and apt-get is not available"
        )
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
    conf, sock = str(conf_path()), str(munge_socket())
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
    out_path = log_dir() / f"{name}.stdout"
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
        raise ClusterError(
            f"{name} exited with {rc} at start:\n{_tail(out_path)}\n{_tail(_log_for(name))}"
        )


def _log_for(name: str) -> Path:
    return log_files().get(name, log_dir() / f"{name}.log")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _munge_works() -> bool:
    sock = str(munge_socket())
    try:
        cred = subprocess.run(
            [_which("munge") or "munge", "-n", "-S", sock], capture_output=True, timeout=10
        )
        if cred.returncode != 0:
            return False
        check = subprocess.run(
            [_which("unmunge") or "unmunge", "-S", sock],
            input=cred.stdout,
            capture_output=True,
            timeout=10,
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
    sock = munge_socket()
    sock.unlink(missing_ok=True)
    _spawn(
        "munged",
        [
            _which("munged") or "munged",
            f"--socket={sock}",
            f"--key-file={d / 'munge' / 'munge.key'}",
            f"--pid-file={d / 'run' / 'munged.pid'}",
            f"--log-file={log_dir() / 'munged.log'}",
            f"--seed-file={d / 'munge' / 'munged.seed'}",
            "--force",  # tolerate running as root and a non-standard directory layout
        ],
    )
    while time.monotonic() < deadline:
        if _munge_works():
            return
        time.sleep(0.2)
    raise ClusterError(f"munged did not come up on {sock}:\n{_tail(log_dir() / 'munged.log')}")


def _ensure_slurmctld() -> None:
    if "slurmctld" not in _daemon_pids():
        if _port_taken(CTLD_PORT):
            raise ClusterError(
                f"port {CTLD_PORT} is in use by another program (another cluster?); "
                f"pick free ports with BIONEMO_CLUSTER_CTLD_PORT / BIONEMO_CLUSTER_SLURMD_PORT"
            )
        # -i: ignore unreadable state files (e.g. after a crash) instead of refusing to start.
        _spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-i", "-f", str(conf_path())])


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
        _spawn(f"slurmd-{node}", [_which("slurmd") or "slurmd", "-f", str(conf_path()), "-N", node])


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
    return subprocess.run(
        [exe, *args[1:]], capture_output=True, text=True, env=_daemon_env(), timeout=timeout
    )


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
    if not conf_path().exists() or _which("scontrol") is None:
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
                    if n in nodes
                    and _needs_resume(state)
                    and (since is None or now - since >= resume_grace)
                ]
                if stuck:
                    _client(["scontrol", "update", f"nodename={','.join(stuck)}", "state=resume"])
                    last_resume = time.monotonic()
        time.sleep(0.5)
    detail = ", ".join(f"{n}={table.get(n, ('?', None))[0]}" for n in nodes)
    raise ClusterError(
        f"cluster not ready before timeout ({detail}); slurmctld answers: {_ctld_answers()}.\n"
        f"--- slurmctld.log ---\n{_tail(log_dir() / 'slurmctld.log')}\n"
        f"Logs: {log_dir()}"
    )


def _needs_resume(state: str) -> bool:
    base, *flags = state.rstrip("*~#!%$@^-").split("+")
    # NOT_RESPONDING alone means the slurmd has not registered yet: waiting is enough.
    return base in ("DOWN", "DRAINED", "DRAINING", "FAIL", "FAILING") or bool(
        {"DRAIN", "FAIL"} & set(flags)
    )


# --------------------------------------------------------------------------------------------- API


def up(timeout: float = 60.0) -> None:
    """Start (or repair) the bundled cluster and wait until all nodes can run jobs. Idempotent."""
    deadline = time.monotonic() + timeout
    with _lock():  # also keeps parallel sessions from running apt-get at the same time
        _ensure_installed()
        if config_current() and is_up():
            return
        changed = write_config()
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
    _client(
        ["scontrol", "update", f"nodename={name}", "state=resume"]
    )  # errors if already usable: fine
    _wait_usable((name,), deadline)


def status() -> str:
    """Human-readable summary of the cluster."""
    lines = [f"cluster dir: {cluster_dir()}", f"SLURM_CONF={conf_path()}"]
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
    parser = argparse.ArgumentParser(
        prog="python -m launchers.cluster", description="Bundled local SLURM cluster"
    )
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            up(timeout=args.timeout)
            print(f"cluster up in {time.monotonic() - t0:.1f}s; export SLURM_CONF={conf_path()}")
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
