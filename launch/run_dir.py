"""One run's out_dir: a lock so that two runs never share it, and the rule that a fresh run never
writes into (and prunes) an earlier run's checkpoints.

The lock is an advisory `flock` on `out_dir/.distq.lock`, whose text names the holder's host and
pid for the error message. The kernel drops it when the holder dies, however it dies, so a lock
left by a killed run is taken over by the next one with no clean-up.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from distq.launch.checkpoint import DIRECTORY_NAME, LATEST_NAME

log = logging.getLogger(__name__)

LOCK_NAME = ".distq.lock"
PREVIOUS_PREFIX = "previous-"


class RunDirError(RuntimeError):
    """The out_dir cannot take this run: in use, not writable, or holding another run."""


class RunDirLock:
    """An exclusive advisory lock on an out_dir for the life of one run (a context manager)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; RunDirError naming the holder's host and pid if another run has it."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(
                f"out_dir {str(self.out_dir)!r} cannot hold a run: {exc.strerror or exc} "
                "(allowed: a writable directory, or a path where one can be made)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"out_dir {str(self.out_dir)!r} is in use by another run ({holder}); "
                "wait for it to end, stop it, or choose another --out-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: unlinking it would race with the next run's open)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def earlier_run(out_dir: str | Path) -> bool:
    """True when out_dir holds checkpoints (good, corrupt or a dangling link) of a run."""
    out_dir = Path(out_dir)
    directory = out_dir / DIRECTORY_NAME
    return os.path.lexists(out_dir / LATEST_NAME) or (
        directory.is_dir() and any(directory.iterdir())
    )


def claim(out_dir: str | Path, resume: bool, move_aside: bool) -> Path | None:
    """Make out_dir ready for this run, holding its lock: a fresh run (not `resume`) into an
    out_dir with an earlier run's checkpoints is refused, or with `move_aside` moves that run's
    files to `out_dir/previous-<n>/`; returns that folder (None when nothing moved)."""
    out_dir = Path(out_dir)
    if resume or not earlier_run(out_dir):
        return None
    if not move_aside:
        raise RunDirError(
            f"out_dir {str(out_dir)!r} holds the checkpoints of an earlier run: continue it with "
            "--resume, move it aside with --move-aside (to out_dir/previous-<n>/, nothing is "
            "deleted), or choose another --out-dir"
        )
    n = 1
    while (out_dir / f"{PREVIOUS_PREFIX}{n}").exists():
        n += 1
    previous = out_dir / f"{PREVIOUS_PREFIX}{n}"
    previous.mkdir()
    for entry in sorted(out_dir.iterdir()):
        if entry.name != LOCK_NAME and not entry.name.startswith(PREVIOUS_PREFIX):
            os.replace(entry, previous / entry.name)
    log.warning("the earlier run in %s was moved to %s", out_dir, previous)
    return previous
