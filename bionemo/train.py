"""Entry point: `python -m bionemo.train <run_dir>`.

Exit codes (the launcher's contract): 0 finished, 75 stopped and saved (requeue me), other crash.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import MutableMapping

from bionemo.rundir import COMPILE_CACHE, CONFIG  # torch-free; kept with the run (docs/design.md)


def use_compile_cache(run_dir: Path, environ: MutableMapping[str, str] = os.environ) -> None:
    """Point inductor's caches at <run_dir>/compile_cache unless the user chose a folder: a
    restart then loads the compiled kernels instead of compiling again. Read when torch first
    compiles, so it must be set before that. Inductor keeps Triton's kernels under it too
    (triton/<device>/) unless TRITON_CACHE_DIR is set; the FX graph and AOTAutograd caches that
    use the folder are on by default (torch 2.11 and 2.13)."""
    environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str((Path(run_dir) / COMPILE_CACHE).resolve()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(
            "usage: python -m bionemo.train <run_dir>   (the folder holding config.yaml)",
            file=sys.stderr,
        )
        return 2
    run_dir = Path(args[0])
    if not (run_dir / CONFIG).is_file():
        print(
            f"error: {run_dir}/{CONFIG} does not exist; create the run with "
            f"`python -m launchers render|submit|debug`",
            file=sys.stderr,
        )
        return 2
    from bionemo.config import load_trainer_config
    from bionemo.stop import StopFlag

    # Near the memory limit the default CUDA allocator fragments and retries: +8% at 650M micro
    # batch 48 on an H100 with expandable segments (benchmarks/results/h100_80gb/speed-*.md).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    # Handlers first (before torch's multi-second import): a warning signal during start-up is
    # then a request to stop, not the default action of SIGUSR2 (terminate).
    cfg = load_trainer_config(run_dir / CONFIG)
    stop = StopFlag(cfg.train.stop_signal)
    if cfg.train.compile:
        use_compile_cache(run_dir)
    from bionemo.trainer import train

    return train(run_dir, stop)


if __name__ == "__main__":
    sys.exit(main())
