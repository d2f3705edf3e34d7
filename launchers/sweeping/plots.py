"""PNG plots of a micro-batch sweep: throughput and peak memory against micro batch size.

One line per recompute policy over the sizes that fit; an x on the axis marks each size that ran
out of memory. Trials are the dicts of the sweep's results file; results.py imports this module
only once there is data to plot (matplotlib is slow to import and optional).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from launchers.sweeping.search import variant_label  # noqa: E402

COLORS = {"none": "tab:blue", "selective": "tab:orange", "full": "tab:green"}


def _plot(
    trials: list[dict],
    key: str,
    ylabel: str,
    path: Path,
    title: str,
    hline: float | None = None,
    hline_label: str = "",
) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def curve(t: dict) -> str:  # one line per strategy (when several) and recompute policy
        label = variant_label(t.get("data_parallel", "ddp"), t.get("fp8", "none"))
        return f"{label}, recompute {t['recompute']}" if several else f"recompute {t['recompute']}"

    several = len({(t.get("data_parallel"), t.get("fp8")) for t in trials}) > 1
    styles = ["o-", "s--", "^-.", "d:"]
    variants = list(dict.fromkeys((t.get("data_parallel"), t.get("fp8")) for t in trials))
    for name in dict.fromkeys(curve(t) for t in trials):
        mine = [t for t in trials if curve(t) == name]
        color = COLORS.get(mine[0]["recompute"])
        style = styles[variants.index((mine[0].get("data_parallel"), mine[0].get("fp8"))) % 4]
        fit = sorted((t for t in mine if t["fits"]), key=lambda t: t["micro_batch_size"])
        ax.plot(
            [t["micro_batch_size"] for t in fit],
            [t[key] for t in fit],
            style,
            color=color,
            label=name,
        )
        oom = [t["micro_batch_size"] for t in mine if not t["fits"]]
        if oom:  # on the x axis: out-of-memory trials have no value to plot
            ax.plot(
                oom,
                [0] * len(oom),
                "x",
                color=color,
                markersize=9,
                clip_on=False,
                label=f"{name}: out of memory",
            )
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", label=hline_label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 8, 16, 32 rather than 2^3, 2^4, 2^5
    ax.set_xlabel("micro batch size (sequences per GPU)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput(trials: list[dict], path: Path, title: str) -> Path:
    return _plot(trials, "tokens_per_s_per_gpu", "tokens/s per GPU (padded)", path, title)


def plot_memory(trials: list[dict], path: Path, title: str, cap_gib: float | None) -> Path:
    return _plot(
        trials,
        "peak_memory_gib",
        "peak memory per rank (GiB; CPU: resident set)",
        path,
        title,
        hline=cap_gib,
        hline_label=f"memory cap {cap_gib} GiB",
    )
