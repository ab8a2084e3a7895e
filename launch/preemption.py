"""Stop on request: SIGUSR1 or SIGTERM asks training to write a checkpoint and exit cleanly.

SLURM sends SIGUSR1 ahead of a time limit (`--signal`), schedulers and torchrun send SIGTERM.
The handler only records the signal; the training loop asks `agreed()` after every step, which
takes the maximum over all ranks, so every rank stops after the same step even if only one was
signalled. Repeated signals change nothing: under SLURM a worker gets SIGTERM from slurmstepd
and again from torchrun, and must still finish its checkpoint; a hung process is SIGKILLed by
them after their grace period (KillWait, torchrun's 30 s).

A worker whose torchrun agent dies (SIGKILLed by a scheduler or the OOM killer) would train on
unsupervised: torchrun starts workers in sessions of their own, so nothing reaches them.
`stop_when_launcher_dies` watches the parent and sends this process SIGTERM when it goes: the
run checkpoints and exits as on any stop request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

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


def stop_when_launcher_dies(interval: float = 0.5) -> threading.Thread | None:
    """Under torchrun, SIGTERM this process once its parent (the agent) is gone; returns the
    watching daemon thread (None when not started by torchrun: a shell that exits is not a
    reason to stop a `nohup` run)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("torchrun agent (pid %d) is gone: stopping after this step", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="distq-launcher-watch", daemon=True)
    thread.start()
    return thread
