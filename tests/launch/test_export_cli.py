"""`distq export` on what is not a distq checkpoint, and over existing files: one line, exit 2,
nothing overwritten unless --force, never a checkpoint."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from distq.launch import config, train
from tests.launch.commands import QUIET


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.run(
        config.TrainConfig(
            epochs=1, hidden=16, depth=2, out_dir=str(out), **QUIET, checkpoint_every=None
        )
    )
    return out


def export(*args):
    return subprocess.run(
        [sys.executable, "-m", "distq.launch.cli", "export", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def refused(done, message):
    """Exit 2 and one error line (besides a warning that a file carries no digest)."""
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "no recorded SHA-256" not in line]
    assert len(errors) == 1 and errors[0].startswith("distq export: error: "), done.stderr
    assert message in errors[0]


def test_files_that_are_not_distq_checkpoints_get_one_line(run_dir, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:5000])
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    st = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(3)}, st)
    for path in (truncated, "README.md", tensor, st):
        refused(export(path, tmp_path / "out.safetensors"), f"not a distq checkpoint: {path} (")
    assert not (tmp_path / "out.safetensors").exists()


def test_an_existing_output_needs_force_and_a_checkpoint_is_never_overwritten(run_dir, tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    refused(export(run_dir / "checkpoint.pt", out), f"{out} exists; add --force to replace it")
    assert out.read_bytes() == b"keep me"
    assert export(run_dir / "checkpoint.pt", out, "--force").returncode == 0
    assert out.read_bytes() != b"keep me"
    checkpoint_bytes = (run_dir / "checkpoint.pt").read_bytes()
    [step] = (run_dir / "checkpoints").glob("step-*.pt")
    for target in (run_dir / "checkpoint.pt", step, step.with_name(step.name + ".sha256")):
        refused(
            export(run_dir / "checkpoint.pt", target, "--force"),
            f"{target} is a checkpoint; distq export never writes over one",
        )
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint_bytes
