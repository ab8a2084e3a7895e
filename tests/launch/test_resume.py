"""Runs that are stopped and resumed end with exactly the weights of runs that were not.

Real torchrun, 2 gloo workers: a SIGUSR1 to one worker makes both write a checkpoint mid-epoch
and exit 0, and `--resume` finishes the run; a SIGKILLed worker under `--max-restarts=1` makes
torchrun restart the group, which resumes from the newest checkpoint by itself.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distq.launch.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

# Every run shares these settings, so their final weights must agree bit for bit.
TRAIN = [
    "-m",
    "distq.launch.train",
    "--epochs",
    "2",
    "--no-progress",
    "--metrics-port",
    "none",
    "--grad-bits",
    "2",
    "--error-feedback",
    "--checkpoint-every",
    "5",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(out: Path, *extra: str, torchrun: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*TORCHRUN, *torchrun, *TRAIN, "--out-dir", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )


def finish(proc: subprocess.Popen) -> str:
    try:
        output = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    return output


def steps_logged(out: Path) -> int:
    """The last step rank 0's monitor has recorded (0 before the first)."""
    log = out / "monitor-rank0.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while steps_logged(out) < step:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"no step {step} within 240 s"
        time.sleep(0.05)


def workers(launcher: subprocess.Popen) -> list[int]:
    """The worker processes torchrun started (its children)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def final_state(out: Path) -> dict:
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    return {
        "model": state["model"],
        "latent": state["optimizer"]["latent"],
        "optimizer": state["optimizer"]["base"]["state"],
        "step": state["step"],
        "loss": json.loads((out / "summary.json").read_text())["final_loss"],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["loss"] == b["loss"]
    for part in ("model", "latent"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    for index, slots in a["optimizer"].items():
        for slot, value in slots.items():
            assert torch.equal(value, b["optimizer"][index][slot]), (index, slot)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    finish(train(out))
    return final_state(out)


def test_sigusr1_checkpoints_mid_epoch_and_resume_is_bit_exact(tmp_path, uninterrupted):
    proc = train(tmp_path)
    wait_for_step(tmp_path, 8, proc)
    os.kill(workers(proc)[1], signal.SIGUSR1)  # one rank only: the ranks must agree to stop
    output = finish(proc)
    assert "SIGUSR1 received: stopped after step" in output
    stopped_at = int(output.split("stopped after step ")[1].split(",")[0])
    assert 8 <= stopped_at < uninterrupted["step"]
    assert not (tmp_path / "summary.json").exists()  # not finished
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == stopped_at and len(state["ranks"]) == 2
    assert state["ranks"][0]["comm"]["residuals"]  # error feedback travels with the checkpoint

    output = finish(train(tmp_path, "--resume"))
    assert f"resumed from {tmp_path / 'checkpoints'}/step-{stopped_at:08d}.pt" in output
    assert_same(final_state(tmp_path), uninterrupted)


def test_torchrun_restarts_a_killed_worker_and_ends_with_the_same_weights(tmp_path, uninterrupted):
    proc = train(tmp_path, "--resume", torchrun=("--max-restarts=1",))
    wait_for_step(tmp_path, 12, proc)
    os.kill(workers(proc)[0], signal.SIGKILL)
    output = finish(proc)
    assert "no checkpoint in" in output  # the first start
    assert "resumed from" in output  # the restart
    assert_same(final_state(tmp_path), uninterrupted)
    kept = CheckpointStore(tmp_path, keep=3).paths()
    assert len(kept) == 3 and kept[-1].name == f"step-{uninterrupted['step']:08d}.pt"


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_workers_checkpoint_and_stop_when_torchrun_is_killed(tmp_path):
    proc = train(tmp_path, "--epochs", "100")
    wait_for_step(tmp_path, 8, proc)
    pids = workers(proc)
    os.kill(proc.pid, signal.SIGKILL)  # what a scheduler or the OOM killer does to the agent
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    try:
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, pids)), "the workers outlived their torchrun agent"
    finally:
        for pid in filter(alive, pids):
            os.kill(pid, signal.SIGKILL)
    output = proc.communicate(timeout=30)[0]
    assert "SIGTERM received: stopped after step" in output
    state, _ = CheckpointStore(tmp_path, keep=3).load_newest()
    assert state["step"] == steps_logged(tmp_path) > 8  # the last step trained is saved
