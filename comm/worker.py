"""Where exchanges run: on one worker thread in submission order (the same order on every rank,
so communication overlaps backward and no engine thread blocks inside a future callback), or
inline."""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

Job = Callable[[], Tensor]


class ExchangeWorker:
    """One thread running submitted exchanges in order, each completing a Future. It is joined
    by `close()` or at interpreter exit: alive when C++ static destructors run after async gloo
    collectives, it would abort the process ("terminate called without an active exception")."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="distq-comm", daemon=True)
        self._thread.start()
        self.close = weakref.finalize(self, _stop, self._jobs, self._thread)  # once, or at exit

    def submit(self, job: Job) -> torch.futures.Future:
        future: torch.futures.Future = torch.futures.Future()
        self._jobs.put((job, future))
        return future

    def _loop(self) -> None:
        for job, future in iter(self._jobs.get, None):
            completed(job, future)


def completed(job: Job, future: torch.futures.Future | None = None) -> torch.futures.Future:
    """`future` (a new one by default) completed here and now with job's result or exception."""
    future = torch.futures.Future() if future is None else future
    try:
        future.set_result(job())
    except Exception as exc:
        future.set_exception(exc)
    return future


def _stop(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    jobs.put(None)
    thread.join(timeout=10)
