"""Start-up and exit of `python -m launchers` (launchers/__main__.py): the command's own work is
a few milliseconds; importing pydantic, jinja2 and yaml, building the models, and tearing all of it
down again are the rest. What is cut here, measured with `make bench-submit`
(benchmarks/results/submit_latency.json): the garbage collector's passes (~8 ms), pydantic's
plugin look-up (~20 ms), the interpreter's teardown (~30 ms). Stdlib only, imported first.
"""

import os
import sys

_LOADER = "pydantic.plugin._loader"


def skip_plugin_loader() -> None:
    """Even with plugins disabled (PYDANTIC_DISABLE_PLUGINS), building a model imports pydantic's
    plugin loader, whose first line imports importlib.metadata (with email, zipfile, csv: ~20 ms)
    for a look-up that the variable then skips. Register a stand-in that gives the loader's answer
    in that case, "no plugins"; asking it for any other name loads the real module."""
    if os.environ.get("PYDANTIC_DISABLE_PLUGINS") not in ("__all__", "1", "true") \
            or _LOADER in sys.modules:
        return
    import types

    stand_in = types.ModuleType(_LOADER)
    stand_in.get_plugins = lambda: ()

    def real(attr: str):
        if attr.startswith("__"):  # the import system asks for __path__ & co.: a plain module
            raise AttributeError(attr)
        import importlib

        if sys.modules.get(_LOADER) is stand_in:
            del sys.modules[_LOADER]
        return getattr(importlib.import_module(_LOADER), attr)

    stand_in.__getattr__ = real
    sys.modules[_LOADER] = stand_in


def exit_now(rc: int) -> None:
    """Leave without the interpreter's teardown: freeing pydantic's, jinja2's and yaml's ~10^5
    objects one by one takes ~30 ms, an eighth of `submit`. Exit handlers still run and the output
    is flushed; when another thread is alive, the interpreter's own exit joins it as usual."""
    threading = sys.modules.get("threading")
    run_exit_handlers = getattr(__import__("atexit"), "_run_exitfuncs", None)
    if (threading and threading.active_count() > 1) or run_exit_handlers is None:
        sys.exit(rc)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what the normal exit would meet too
            rc = rc or 1
    os._exit(rc)
