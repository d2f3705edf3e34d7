"""The sweep's search and its summary: pure functions over trials (no processes, no files)."""

from __future__ import annotations

from dataclasses import dataclass

from launchers.config.schema import POLICIES  # activation_checkpointing policies, most memory first

__all__ = [
    "POLICIES",
    "SweepError",
    "Trial",
    "describe",
    "search",
    "summarize",
    "variant_label",
]


class SweepError(RuntimeError):
    """A trial failed for a reason other than running out of memory: the sweep stops."""


@dataclass
class Trial:
    recompute: str
    micro_batch_size: int
    fits: bool
    tokens_per_s_per_gpu: float | None = None  # padded tokens, median over the timed steps
    useful_tokens_per_s_per_gpu: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None  # None on CPU (no peak FLOP/s to divide by)
    peak_memory_gib: float | None = None  # GPU: max allocated; CPU: peak resident set
    seconds: float = 0.0  # wall time of the whole trial, start-up included
    run_dir: str = ""
    data_parallel: str = "ddp"  # trainer.parallel.data_parallel of the trial
    fp8: str = "none"  # trainer.train.fp8 of the trial


def variant_label(data_parallel: str, fp8: str) -> str:
    """A strategy and FP8 recipe in one word ("ddp", "fsdp+fp8:tensorwise"): results and plots."""
    return data_parallel if fp8 == "none" else f"{data_parallel}+fp8:{fp8}"


def describe(t: Trial) -> str:
    parts = [f"{t.tokens_per_s_per_gpu:,.0f} tokens/s/GPU"]
    if t.tflops_per_gpu is not None:
        parts.append(f"{t.tflops_per_gpu:.3g} TFLOP/s")
    if t.mfu is not None:
        parts.append(f"MFU {100 * t.mfu:.1f}%")
    parts.append(f"peak {t.peak_memory_gib:.2f} GiB ({t.seconds:.0f} s)")
    return ", ".join(parts)


def search(fits, lo: int, hi: int, start: int | None = None) -> int | None:
    """Largest m in [lo, hi] with fits(m), assuming fitting is monotone; None if lo does not fit.

    Doubles from `start` (default lo) until a size does not fit or hi fits, then bisects between
    the last size that fit and the first that did not.
    """
    m = min(max(start or lo, lo), hi)
    last_fit = first_oom = None
    while True:
        if fits(m):
            last_fit = m
            if m >= hi:
                break
            m = min(2 * m, hi)
        else:
            first_oom = m
            break
    if last_fit is None and first_oom > lo:  # started above the floor and that did not fit
        last_fit = lo if fits(lo) else None
    if last_fit is None:
        return None
    while first_oom is not None and first_oom - last_fit > 1:
        mid = (last_fit + first_oom) // 2
        if fits(mid):
            last_fit = mid
        else:
            first_oom = mid
    return last_fit


def summarize(
    trials: list[Trial], policy: str, search_max: int, variant: tuple[str, str] | None = None
) -> dict:
    """One policy's result (of one strategy and FP8 variant, when given)."""
    fit = [
        t
        for t in trials
        if t.recompute == policy
        and t.fits
        and (variant is None or (t.data_parallel, t.fp8) == variant)
    ]
    if not fit:
        return {"max_micro_batch_size": None, "micro_batch_size": None}
    largest = max(fit, key=lambda t: t.micro_batch_size)
    fastest = max(fit, key=lambda t: t.tokens_per_s_per_gpu)
    return {
        "max_micro_batch_size": largest.micro_batch_size,
        # True: --max itself fit, so the real limit is higher (the maximum is a lower bound).
        "max_is_search_limit": largest.micro_batch_size == search_max,
        "micro_batch_size": fastest.micro_batch_size,  # the fastest size that fits
        "tokens_per_s_per_gpu": fastest.tokens_per_s_per_gpu,
        "tflops_per_gpu": fastest.tflops_per_gpu,
        "mfu": fastest.mfu,
        "tokens_per_s_per_gpu_at_max": largest.tokens_per_s_per_gpu,
        "peak_memory_gib_at_max": largest.peak_memory_gib,
    }
