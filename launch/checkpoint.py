"""Checkpoint files that survive crashes: atomic writes, the newest K kept, a link to the latest.

A payload is written to a temporary file in the same directory, flushed and fsynced, then
renamed over the target (rename is atomic on POSIX), and the directory is fsynced. So a kill at
any moment leaves either the previous checkpoint or the new one, never a torn file.

Each checkpoint's SHA-256 is written beside it (`step-<step>.pt.sha256`) before the checkpoint
takes its name, and checked on every load: flipped bits are found, not trained on. A checkpoint
that fails the check or does not load is moved to `checkpoints/corrupt/`, never deleted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distq.launch import sharded_checkpoint
from distq.launch.durable import fsync_directory, sha256_of, write_small_atomic

log = logging.getLogger(__name__)

LATEST_NAME = "checkpoint.pt"
DIRECTORY_NAME = "checkpoints"
CORRUPT_NAME = "corrupt"
DIGEST_SUFFIX = ".sha256"
_STEP_FILE = re.compile(r"step-(\d+)\.(?:pt|dcp)")  # a file, or a sharded checkpoint's directory


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
        digest, recorded = sha256_of(Path(tmp)), digest_path(path)
        before = recorded.read_text().split() if recorded.is_file() and path.exists() else []
        write_small_atomic(recorded, "\n".join([*before, digest]) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_small_atomic(recorded, digest + "\n")
    fsync_directory(path.parent)


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of checkpoint `path` is kept."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_atomic` (tensors and plain Python values only), after
    checking its SHA-256; CheckpointError if it does not match. A file with no recorded digest
    (written before distq kept them, or copied without it) loads with a warning. A sharded
    checkpoint (a directory) loads with whole tensors, as the file of a DDP run holds them."""
    path = Path(path)
    if sharded_checkpoint.is_sharded(path):
        return sharded_checkpoint.fill(load_verified(path), path.resolve(), mesh=None)
    return load_verified(path)


def load_verified(path: str | Path) -> dict[str, Any]:
    """`load`, except that a sharded checkpoint's model and optimizer tensors stay specs
    (`sharded_checkpoint.fill` reads them, each rank its rows): what rank 0 sends to the others."""
    path = Path(path)
    if sharded_checkpoint.is_sharded(path):
        try:
            return sharded_checkpoint.read(path.resolve())
        except sharded_checkpoint.ShardedCheckpointError as exc:
            raise CheckpointError(str(exc)) from None
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    real = path.resolve()
    recorded = digest_path(real)
    if recorded.is_file():
        if sha256_of(real) not in recorded.read_text().split():
            raise CheckpointError(
                f"checkpoint {str(real)!r} is corrupt: its SHA-256 differs from the one recorded "
                f"when it was written ({recorded.name})"
            )
    else:
        log.warning("checkpoint %s has no recorded SHA-256; loading it unverified", path)
    return torch.load(real, map_location="cpu", weights_only=True)


class CheckpointStore:
    """`out_dir/checkpoints/step-<step>.pt` (or `.dcp/`, sharded), the newest `keep` of them, and
    `out_dir/checkpoint.pt`, a symbolic link to the newest (what `distq export` and users open)."""

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
        self._written(path)
        return path

    def save_sharded(
        self, payload: dict[str, Any] | None, parts: dict[str, Any], step: int
    ) -> Path | None:
        """`save` for an FSDP run, a collective: every rank writes its rows of `parts` (the
        model and optimizer state dicts) into `step-<step>.dcp/`; `payload`, the rest, is rank
        0's (None elsewhere). Every rank returns once the store is settled (link, pruning);
        rank 0 with the path, the others with None."""
        path = self.directory / f"step-{step:08d}{sharded_checkpoint.SUFFIX}"
        sharded_checkpoint.save(payload, parts, path)
        main = dist.get_rank() == 0
        if main:
            self._written(path)
        dist.barrier()
        return path if main else None

    def _written(self, path: Path) -> None:
        """After `path` took its name: point the latest link at it, drop the oldest beyond
        `keep` among earlier steps (never the one just written) and what killed saves left."""
        self._link_latest(path)
        earlier = [p for p in self.paths() if _step_of(p) < _step_of(path)]
        for old in earlier[: max(len(earlier) - (self.keep - 1), 0)]:
            _remove(old)
            digest_path(old).unlink(missing_ok=True)
        for torn in self.directory.glob(".step-*.tmp"):  # left by a kill during an earlier save
            _remove(torn)
        for digest in self.directory.glob(f"step-*.pt{DIGEST_SUFFIX}"):  # its save was killed
            if not digest.with_suffix("").exists():
                digest.unlink(missing_ok=True)

    def load_newest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, with its path; None if there is none (a sharded
        one's model and optimizer tensors as specs: `load_verified`).

        One that fails its checksum or does not load (flipped bits, a file cut short by a full
        disk) is moved to `checkpoints/corrupt/` with a warning naming it, and the one before it
        is tried; `set_aside` lists what was moved.
        """
        for path in reversed(self.paths()):
            try:
                return load_verified(path), path
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
        fsync_directory(self.directory)
        return target

    def _link_latest(self, target: Path) -> None:
        tmp = self.out_dir / f".{LATEST_NAME}.link.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.relative_to(self.out_dir))
        os.replace(tmp, self.latest)
        fsync_directory(self.out_dir)


def _remove(path: Path) -> None:
    """Delete a checkpoint file or a sharded checkpoint's directory."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _step_of(path: Path) -> int:
    return int(_STEP_FILE.fullmatch(path.name).group(1))
