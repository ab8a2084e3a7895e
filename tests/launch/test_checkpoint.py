"""Checkpoint files survive a kill during a save, and distq train processes exit cleanly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distq.launch import checkpoint
from tests.launch.commands import QUIET, torchrun

WRITER = """
import sys, torch
from distq.launch import checkpoint
from tests.launch.commands import QUIET, torchrun
path = sys.argv[1]
big = torch.randn(25_000_000)  # 100 MB: each save takes long enough to be killed in the middle
step = 1
while True:
    checkpoint.save_atomic({"step": step, "data": big}, path)
    print(step, flush=True)
    step += 1
"""


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pt"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "1"  # one complete save exists
        time.sleep(0.15)  # now inside a later save
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    state = checkpoint.load(path)
    assert state["step"] >= 1 and state["data"].numel() == 25_000_000
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    # a torn temp file at most, besides the digest (of the save killed, or of the one before)
    assert all(name.endswith((".tmp", ".sha256")) for name in leftovers)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")


@pytest.mark.slow
def test_twenty_two_process_runs_all_exit_zero(tmp_path):
    """DDP on gloo can abort at exit ("terminate called without an active exception");
    distq's shutdown path must prevent it, not leave it to users."""
    codes = []
    for i in range(20):
        done = subprocess.run(
            torchrun(epochs=1, **QUIET, out_dir=tmp_path / str(i)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        codes.append(done.returncode)
        assert "terminate called" not in done.stderr, done.stderr[-2000:]
    assert codes == [0] * 20
    assert torch.load(tmp_path / "19" / "checkpoint.pt", weights_only=True)["epoch"] == 1
