"""Checkpoint files that survive crashes: atomic writes, the newest K kept, a link to the latest.

A payload is written to a temporary file in the same directory, flushed and fsynced, then
renamed over the target (rename is atomic on POSIX), and the directory is fsynced. So a kill at
any moment leaves either the previous checkpoint or the new one, never a torn file.

Each checkpoint's SHA-256 is written beside it (`step-<step>.pt.sha256`) before the checkpoint
takes its name, and checked on every load: flipped bits are found, not trained on. A checkpoint
that fails the check or does not load is moved to `checkpoints/corrupt/`, never deleted.
"""

from __future__ import annotations

import hashlib
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
CORRUPT_NAME = "corrupt"
DIGEST_SUFFIX = ".sha256"
_STEP_FILE = re.compile(r"step-(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that fails its checksum, or a resume that finds only such checkpoints."""


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
        # Until the rename, the digest file lists the old file's digest and the new one's, so a
        # kill between the two steps leaves a file that matches what is recorded.
        digest, recorded = _sha256(Path(tmp)), digest_path(path)
        before = recorded.read_text().split() if recorded.is_file() and path.exists() else []
        _write_small_atomic(recorded, "\n".join([*before, digest]) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _write_small_atomic(recorded, digest + "\n")
    _fsync_directory(path.parent)


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of checkpoint `path` is kept."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_atomic` (tensors and plain Python values only), after
    checking its SHA-256; CheckpointError if it does not match. A file with no recorded digest
    (written before distq kept them, or copied without it) loads with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    real = path.resolve()
    recorded = digest_path(real)
    if recorded.is_file():
        if _sha256(real) not in recorded.read_text().split():
            raise CheckpointError(
                f"checkpoint {str(real)!r} is corrupt: its SHA-256 differs from the one recorded "
                f"when it was written ({recorded.name})"
            )
    else:
        log.warning("checkpoint %s has no recorded SHA-256; loading it unverified", path)
    return torch.load(real, map_location="cpu", weights_only=True)


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
        """Write the checkpoint of `step`, point the latest link at it, and drop the oldest
        beyond `keep` among those of earlier steps (never the one just written)."""
        path = self.directory / f"step-{step:08d}.pt"
        save_atomic(payload, path)
        self._link_latest(path)
        earlier = [p for p in self.paths() if _step_of(p) < step]
        for old in earlier[: max(len(earlier) - (self.keep - 1), 0)]:
            old.unlink(missing_ok=True)
            digest_path(old).unlink(missing_ok=True)
        for torn in self.directory.glob(".step-*.tmp"):  # left by a kill during an earlier save
            torn.unlink(missing_ok=True)
        for digest in self.directory.glob(f"step-*.pt{DIGEST_SUFFIX}"):  # its save was killed
            if not digest.with_suffix("").exists():
                digest.unlink(missing_ok=True)
        return path

    def load_newest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, with its path; None if there is none.

        One that fails its checksum or does not load (flipped bits, a file cut short by a full
        disk) is moved to `checkpoints/corrupt/` with a warning naming it, and the one before it
        is tried; `set_aside` lists what was moved.
        """
        for path in reversed(self.paths()):
            try:
                return load(path), path
            except Exception as exc:  # any unreadable file: fall back to an older one
                moved = self._set_aside(path)
                log.warning(
                    "checkpoint %s does not load (%s); moved to %s, trying the one before",
                    path,
                    exc,
                    moved,
                )
        return None

    def corrupt(self) -> list[Path]:
        """The checkpoints moved aside as corrupt, by this or an earlier run."""
        folder = self.directory / CORRUPT_NAME
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if not p.name.endswith(DIGEST_SUFFIX))

    def _set_aside(self, path: Path) -> Path:
        folder = self.directory / CORRUPT_NAME
        folder.mkdir(exist_ok=True)
        target, n = folder / path.name, 1
        while target.exists():  # the same step turned out corrupt before: keep both
            target, n = folder / f"{path.name}.{n}", n + 1
        if digest_path(path).exists():
            os.replace(digest_path(path), digest_path(target))
        os.replace(path, target)
        _fsync_directory(self.directory)
        return target

    def _link_latest(self, target: Path) -> None:
        tmp = self.out_dir / f".{LATEST_NAME}.link.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.relative_to(self.out_dir))
        os.replace(tmp, self.latest)
        _fsync_directory(self.out_dir)


def _step_of(path: Path) -> int:
    return int(_STEP_FILE.fullmatch(path.name).group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_small_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
