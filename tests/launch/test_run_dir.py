"""An out_dir belongs to one run: a fresh run never prunes an earlier run's checkpoints, and a
second run into a busy out_dir is refused naming the holder, while a dead holder's lock is
taken over. Real `python -m distq.launch.train` processes."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distq.launch.checkpoint import CheckpointStore
from tests.launch.commands import QUIET, flags

pytestmark = pytest.mark.slow

TINY = flags(hidden=16, depth=1, **QUIET, checkpoint_every=5)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distq.launch.train", "--out-dir", str(out), *TINY, *extra],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in CheckpointStore(out, keep=3).paths()}


def test_a_fresh_run_into_an_earlier_runs_out_dir_is_refused_and_deletes_nothing(tmp_path):
    assert train(tmp_path, "--epochs", "2").returncode == 0
    before = snapshot(tmp_path)
    done = train(tmp_path, "--epochs", "1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "holds the checkpoints of an earlier run" in done.stderr and "--resume" in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before


def test_move_aside_keeps_the_earlier_run_whole_and_the_new_one_keeps_its_own(tmp_path):
    assert train(tmp_path, "--epochs", "2").returncode == 0
    before = snapshot(tmp_path)
    done = train(tmp_path, "--epochs", "1", "--move-aside")
    assert done.returncode == 0, done.stdout + done.stderr
    assert snapshot(tmp_path / "previous-1") == before
    assert torch.load(tmp_path / "previous-1" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    newest = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert newest["epoch"] == 1
    assert [p.name for p in CheckpointStore(tmp_path, keep=3).paths()][-1] == (
        f"step-{newest['step']:08d}.pt"
    )


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (40, 45):
        store.save({"step": step}, step)
    store.save({"step": 5}, 5)  # a lower step than those on disk
    assert store.latest.resolve().exists()
    assert store.load_newest()[0] == {"step": 45}  # the newest by step still wins on resume


def test_a_second_run_is_refused_naming_the_first_and_a_dead_runs_lock_is_taken_over(tmp_path):
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distq.launch.train",
            "--out-dir",
            str(tmp_path),
            *TINY,
            "--epochs",
            "200",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while not CheckpointStore(tmp_path, keep=3).paths():
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        second = train(tmp_path, "--epochs", "200", "--resume")
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by another run (host {socket.gethostname()} pid {first.pid})" in (
            second.stderr
        )
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
        os.kill(first.pid, signal.SIGKILL)  # its lock file stays, naming a dead pid
        first.wait(timeout=30)
    finally:
        first.kill()
    assert str(first.pid) in (tmp_path / ".distq.lock").read_text()
    after = train(tmp_path, "--epochs", "1", "--move-aside")
    assert after.returncode == 0, after.stdout + after.stderr
    assert f"pid {first.pid}" not in (tmp_path / ".distq.lock").read_text()


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path):
    assert train(tmp_path, "--epochs", "1").returncode == 0
    summary, before = (tmp_path / "summary.json").read_bytes(), snapshot(tmp_path)
    done = train(tmp_path, "--epochs", "1", "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"the run in {tmp_path} is finished (epoch 1, step 44)" in done.stdout
    assert (tmp_path / "summary.json").read_bytes() == summary
    assert snapshot(tmp_path) == before
