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
