"""The stop protocol: a signal only sets a flag; ranks agree at a step boundary, then all save.

Saving inside a signal handler can deadlock (collectives, file locks), and ranks that see the
signal at different steps would save different steps. So the handler records the request and the
loop calls `agreed()` once per step: an all-reduce(MAX) of the local flag, so every rank stops
after the same step as soon as any rank was signalled.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopFlag:
    def __init__(self, warning_signal: str, device: torch.device):
        self.requested: str | None = None
        self.device = device
        for name in {warning_signal, "TERM"}:
            signal.signal(getattr(signal, f"SIG{name}"), self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def agreed(self) -> bool:
        local = self.requested is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
