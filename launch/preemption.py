"""Stop on request: SIGUSR1 or SIGTERM asks training to write a checkpoint and exit cleanly.

SLURM sends SIGUSR1 ahead of a time limit (`--signal`), schedulers and torchrun send SIGTERM.
The handler only records the signal; the training loop asks `agreed()` after every step, which
takes the maximum over all ranks, so every rank stops after the same step even if only one was
signalled. Repeated signals change nothing: under SLURM a worker gets SIGTERM from slurmstepd
and again from torchrun, and must still finish its checkpoint; a hung process is SIGKILLed by
them after their grace period (KillWait, torchrun's 30 s).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records a stop signal; use as a context manager around the training loop."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach only that one
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        """The signal number any rank received so far (0: none); a collective when distributed."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
