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


class ExchangeWorker:
    """One thread running submitted exchanges in order, each completing a Future. It is joined
    by `close()` or at interpreter exit: alive when C++ static destructors run after async gloo
    collectives, it would abort the process ("terminate called without an active exception")."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="distq-comm", daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, _stop_thread, self._jobs, self._thread)

    def submit(self, job: Callable[[], Tensor]) -> torch.futures.Future:
        future: torch.futures.Future = torch.futures.Future()
        self._jobs.put((job, future))
        return future

    def _loop(self) -> None:
        while True:
            job, future = self._jobs.get()
            if job is None:
                return
            _settle(future, job)

    def close(self) -> None:
        self._stop()


def completed(job: Callable[[], Tensor]) -> torch.futures.Future:
    """A Future settled by running `job` here and now (inline, without a worker)."""
    return _settle(torch.futures.Future(), job)


def _settle(future: torch.futures.Future, job: Callable[[], Tensor]) -> torch.futures.Future:
    """Complete `future` with job's result, or with the exception it raises."""
    try:
        future.set_result(job())
    except Exception as exc:
        future.set_exception(exc)
    return future


def _stop_thread(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    jobs.put((None, None))
    thread.join(timeout=10)
