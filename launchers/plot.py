"""Loss and throughput plots of a run, on demand (`make plot RUN=...`, `python -m launchers plot`).

    <run>/plots/loss.png        training loss per logged step, validation loss where measured
    <run>/plots/throughput.png  tokens/s per GPU (padded and useful) and steps/s

Read from metrics.jsonl only (the trainer's one timeline, rewound on resume), so a plot can be
made on a login node while the run trains. matplotlib (the `plots` extra), no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from bionemo import rundir

PLOTS = rundir.PLOTS  # <run>/plots/


class PlotError(RuntimeError):
    """Nothing to plot, or no matplotlib; the message says which and what to do."""


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / rundir.METRICS
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise PlotError(f"{path}: cannot read ({e.strerror}); has the run logged a step yet?")
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def series(recs: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [
        (r["step"], r[key])
        for r in recs
        if r.get("kind") == kind and isinstance(r.get(key), (int, float))
    ]
    return [s for s, _ in pts], [v for _, v in pts]


def plot(run_dir: Path) -> list[Path]:
    """Write the run's plots; return their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a login node
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(
            "matplotlib is not installed; pip install 'bionemo-hpc[plots]' "
            "(or pip install matplotlib)"
        ) from None
    run_dir = Path(run_dir)
    recs = records(run_dir)
    steps, loss = series(recs, "train", "loss")
    if not steps:
        raise PlotError(f"{run_dir / rundir.METRICS}: no training step logged yet")
    out = run_dir / PLOTS
    out.mkdir(exist_ok=True)
    title = f"{run_dir.parent.name}/{run_dir.name}"

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, loss, label="train", linewidth=1)
    v_steps, v_loss = series(recs, "valid", "loss")
    if v_steps:
        ax.plot(v_steps, v_loss, "o-", label="validation", markersize=4)
    ax.set(xlabel="step", ylabel="loss", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = [_save(fig, out / "loss.png")]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, name in (
        ("tokens_per_s_per_gpu", "tokens/s/GPU (padded)"),
        ("useful_tokens_per_s_per_gpu", "tokens/s/GPU (useful)"),
    ):
        s, v = series(recs, "train", key)
        if s:
            ax.plot(s, v, label=name, linewidth=1)
    ax.set(xlabel="step", ylabel="tokens/s per GPU", title=f"{title}: throughput")
    ax.grid(alpha=0.3)
    s, v = series(recs, "train", "steps_per_s")
    if s:
        right = ax.twinx()
        right.plot(s, v, color="tab:gray", linestyle=":", label="steps/s")
        right.set_ylabel("steps/s")
        right.legend(loc="lower right")
    ax.legend(loc="upper left")
    paths.append(_save(fig, out / "throughput.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")  # whole or absent for a viewer reloading it
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
