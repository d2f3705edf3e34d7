"""Where the launcher finds its data and where it keeps runs, in a checkout and when installed.

configs/ and templates/ live at the repository root (the paths the docs and the users' commands
name) and are reached through `launchers/configs` and `launchers/templates`, symbolic links to
them; a wheel follows the links and ships real folders in the package (pyproject.toml,
package-data). So the launcher reads both from inside its package either way.

REPO_ROOT is the folder that relative paths of a run start from: the default `cluster.workdir`
(data paths, `cluster.python`, `runs_root`), `runs/` of `status`, the bundled cluster's
`.cluster/`. In a checkout (its pyproject.toml beside the package) it is the checkout; an
installed launcher (`pip install .`, the `bionemo-hpc` command) uses the directory it is started
in. Stdlib only: launchers/cluster.py imports it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CONFIGS = PACKAGE / "configs"
TEMPLATES = PACKAGE / "templates"
# A checkout holds the project's pyproject.toml beside the package; site-packages does not.
_CHECKOUT = PACKAGE.parent
INSTALLED = not (_CHECKOUT / "pyproject.toml").is_file()
REPO_ROOT = Path.cwd() if INSTALLED else _CHECKOUT

# A copy of the project without its own git history, or with a stale one (a container image, a
# tree copied to a GPU machine, whose .git can be an old snapshot; a checkout vendored into another
# repository) records the commit it came from here: `make stamp` writes it before the copy.
COMMIT_STAMP = "COMMIT_STAMP"


def project_commit() -> str | None:
    """The project's own commit, "-dirty" with uncommitted changes to tracked files.

    git answers only where this checkout is the top level of its repository (inside another
    repository it would answer with that one's HEAD), and only if no COMMIT_STAMP was written
    after its HEAD commit: a copy's .git may be a snapshot older than the code it holds (seen on
    the GPU machines). Otherwise the stamp; otherwise None."""
    import subprocess  # only here: this module is imported by every launcher command

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(_CHECKOUT), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    path = _CHECKOUT / COMMIT_STAMP
    stamp = None
    if not INSTALLED and path.is_file():
        words = path.read_text(errors="replace").split()
        stamp = words[0] if words else None
    top = None if INSTALLED else git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == _CHECKOUT.resolve():
        head, when = git("rev-parse", "HEAD"), git("log", "-1", "--format=%ct")
        if head and not (stamp and when and path.stat().st_mtime >= int(when)):
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return head + ("-dirty" if dirty else "")
    return stamp
