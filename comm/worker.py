"""One thread that runs submitted exchanges in submission order, each completing a Future: the
same order on every rank, so communication overlaps backward and no engine thread is ever
blocked inside a future callback."""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor


class ExchangeWorker:
    """One thread running submitted exchanges in submission order; each completes a Future.

    The thread is stopped and joined by `close()` or, at the latest, when the interpreter
    exits: a thread that has run asynchronous gloo collectives must not still be alive when
    C++ static destructors run (the process would abort with "terminate called without an
    active exception")."""

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
            try:
                future.set_result(job())
            except Exception as exc:
                future.set_exception(exc)

    def close(self) -> None:
        self._stop()


def _stop_thread(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    jobs.put((None, None))
    thread.join(timeout=10)
