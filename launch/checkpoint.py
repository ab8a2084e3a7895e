"""Checkpoint files that survive crashes: atomic writes, the newest K kept, a link to the latest.

A payload is written to a temporary file in the same directory, flushed and fsynced, then
renamed over the target (rename is atomic on POSIX), and the directory is fsynced. So a kill at
any moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LATEST_NAME = "checkpoint.pt"
DIRECTORY_NAME = "checkpoints"
_STEP_FILE = re.compile(r"step-(\d+)\.pt")


def save_atomic(payload: dict[str, Any], path: str | Path) -> None:
    """Write `payload` with torch.save to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_atomic` (tensors and plain Python values only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointStore:
    """`out_dir/checkpoints/step-<step>.pt`, the newest `keep` of them, and `out_dir/checkpoint.pt`,
    a symbolic link to the newest (what `distq export` and users open)."""

    def __init__(self, out_dir: str | Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}; allowed: at least 1 checkpoint")
        self.out_dir = Path(out_dir)
        self.directory = self.out_dir / DIRECTORY_NAME
        self.latest = self.out_dir / LATEST_NAME
        self.keep = keep

    def paths(self) -> list[Path]:
        """The step checkpoints on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.directory.iterdir()
            if (m := _STEP_FILE.fullmatch(p.name))
        ]
        return [p for _, p in sorted(found)]

    def save(self, payload: dict[str, Any], step: int) -> Path:
        """Write the checkpoint of `step`, point the latest link at it, drop the oldest extras."""
        path = self.directory / f"step-{step:08d}.pt"
        save_atomic(payload, path)
        self._link_latest(path)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        for torn in self.directory.glob(".step-*.tmp"):  # left by a kill during an earlier save
            torn.unlink(missing_ok=True)
        return path

    def load_newest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, with its path; None if there is none.

        One that fails to load (a disk error, a file cut short by a full disk) is skipped with a
        warning and the one before it is tried.
        """
        for path in reversed(self.paths()):
            try:
                return load(path), path
            except Exception as exc:  # any unreadable file: fall back to an older one
                log.warning("checkpoint %s does not load (%s); trying the one before", path, exc)
        return None

    def _link_latest(self, target: Path) -> None:
        tmp = self.out_dir / f".{LATEST_NAME}.link.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.relative_to(self.out_dir))
        os.replace(tmp, self.latest)
        _fsync_directory(self.out_dir)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
