"""The stop protocol: a signal only sets a flag; ranks agree at a step boundary, then all save.

Saving inside a signal handler can deadlock (collectives, file locks), and ranks that see the
signal at different steps would save different steps. So the handler records the request and the
loop calls `agreed()` once per step: an all-reduce(MAX) of the local flag, so every rank stops
after the same step as soon as any rank was signalled. (Megatron-LM does the same with an
all-gather; Lightning's save inside the handler hung in practice.)
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopFlag:
    def __init__(self, warning_signal: str):
        self.requested: str | None = None
        for name in {warning_signal, "TERM"}:
            signal.signal(getattr(signal, f"SIG{name}"), self._handle)
        # The flag travels over a CPU (gloo) group even when training uses NCCL: reading a GPU
        # all-reduce result would wait for every kernel queued so far, a stall in every step.
        self.group = None
        if dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def agreed(self) -> bool:
        local = self.requested is not None
        if self.group is None:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
