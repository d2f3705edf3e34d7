"""The stop protocol: a signal only sets a flag; ranks agree at a step boundary, then all save.

Saving inside a signal handler can deadlock (collectives, file locks), and ranks that see the
signal at different steps would save different steps. So the handler records the request and the
loop calls `agreed()` once per step: an all-reduce(MAX) of the local flag, so every rank stops
after the same step as soon as any rank was signalled. (Megatron-LM does the same with an
all-gather; Lightning's save inside the handler hung in practice.)

The handlers are installed first thing in `python -m bionemo.train`, before torch is imported, so
a warning signal that arrives during start-up is kept, not fatal (SIGUSR2's default action kills).
"""

from __future__ import annotations

import signal


class StopFlag:
    def __init__(self, warning_signal: str):
        self.requested: str | None = None
        self.group = None
        for name in {warning_signal, "TERM"}:
            signal.signal(getattr(signal, f"SIG{name}"), self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def join_process_group(self) -> None:
        """Agree over a CPU (gloo) group even when training uses NCCL: reading a GPU all-reduce
        result would wait for every kernel queued so far, a stall in every step."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.group = (
                dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            )

    def agreed(self) -> bool:
        local = self.requested is not None
        if self.group is None:
            return local
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
