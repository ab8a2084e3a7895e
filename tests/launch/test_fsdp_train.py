"""`distq train --parallel fsdp` under a real 2-worker torchrun: the gpt recipe trains with
FSDP2 (ternary weights gathered packed, 2-bit gradients reduce-scattered); its checkpoints are
sharded (torch.distributed.checkpoint, each rank its rows) or one file of whole tensors as a DDP
run's; a resume from a mid-run checkpoint, or a restart after a SIGKILLed worker, ends
bit-identical to the uninterrupted run, and both formats export the same packed file."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distq.export import load_packed
from distq.launch import checkpoint, config
from distq.launch.recipes import charlm
from tests.launch.commands import QUIET, torchrun

SETTINGS = {
    "recipe": "gpt", "hidden": 32, "depth": 2, "bptt": 32, "batch_size": 16, "lr": 0.003,
    "epochs": 2, "checkpoint_every": 10, "keep_checkpoints": 20, "parallel": "fsdp", **QUIET,
}  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "stdlib.py"
    path.write_text(charlm.default_corpus(30_000))
    return path


def _train(out, corpus, *extra: str) -> str:
    """Run `distq train` under torchrun with SETTINGS and `extra`; its stdout."""
    cmd = [*torchrun(data_dir=corpus, out_dir=out, **SETTINGS), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus) -> tuple[Path, str]:
    """The uninterrupted run, sharded checkpoints (the default under FSDP): out_dir, stdout."""
    out = tmp_path_factory.mktemp("straight")
    return out, _train(out, corpus)


def _resume_from_step_20(straight, split, corpus, *extra: str) -> tuple[dict, dict]:
    """Copy `straight`'s step-20 checkpoint into `split`, resume there; both final checkpoints
    (whole tensors, whichever format)."""
    (split / "checkpoints").mkdir(parents=True)
    for path in (straight / "checkpoints").glob("step-00000020.*"):
        copy = shutil.copytree if path.is_dir() else shutil.copy
        copy(path, split / "checkpoints" / path.name)
    resumed = _train(split, corpus, "--resume", *extra)
    assert "resumed from" in resumed and "at step 20" in resumed
    return tuple(checkpoint.load(d / "checkpoint.pt") for d in (straight, split))


def _assert_same_base_state(a: dict, b: dict) -> None:
    """The wrapped optimizer's state (Adam's moments) equal slot by slot."""
    assert a.keys() == b.keys()
    for index, slots in a["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, b["state"][index][slot]), (index, slot)


def _same_weights_and_state(a: dict, b: dict) -> None:
    """ŵ, latent weights, α and the wrapped optimizer's state equal, tensor by tensor."""
    for part in ("model", "latent", "alpha"):
        mine = a["model"] if part == "model" else a["optimizer"][part]
        theirs = b["model"] if part == "model" else b["optimizer"][part]
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(t, theirs[n]) for n, t in mine.items()), part
    _assert_same_base_state(a["optimizer"]["base"], b["optimizer"]["base"])


def _export(source: Path, packed: Path) -> Path:
    """`distq export source packed`; the packed file."""
    export = [sys.executable, "-m", "distq.launch.cli", "export", str(source), str(packed)]
    subprocess.run(export, check=True, capture_output=True, timeout=120)
    return packed


@pytest.mark.slow
def test_fsdp_run_resumes_bit_exact_and_exports(tmp_path, corpus, straight):
    (straight, output), split = straight, tmp_path / "split"
    banner = "gpt, 2 worker(s) on gloo, weights ternary, FSDP2: packed weight all-gather, 2-bit"
    assert banner in output  # it said "fp32 gradients" at 4ed828d
    traffic = output.split("FSDP traffic (rank 0): gradients ")[1]
    sent, fp32 = (float(traffic.split(" MB")[i].split()[-1]) for i in (0, 1))
    assert fp32 / sent > 8  # 2-bit gradients against FSDP's fp32 reduce-scatter
    assert (straight / "checkpoints" / "step-00000020.dcp" / ".metadata").is_file()
    a, b = _resume_from_step_20(straight, split, corpus)
    assert a["step"] == b["step"] == 46
    width = SETTINGS["hidden"]
    assert a["model"]["blocks.0.fc.weight"].shape == (4 * width, width)  # whole, not a shard
    _same_weights_and_state(a, b)
    loaded = load_packed(_export(straight / "checkpoint.pt", tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[n], t) for n, t in a["model"].items())


@pytest.mark.slow
def test_one_file_checkpoints_train_alike_and_export_the_same_bytes(tmp_path, corpus, straight):
    """checkpoint_format 'file' (rank 0 writes whole tensors, a DDP run's layout) changes no
    weight, and both checkpoints pack to the same bytes."""
    (sharded, _), one_file = straight, tmp_path / "file"
    _train(one_file, corpus, "--checkpoint-format", "file")
    assert (one_file / "checkpoints" / "step-00000046.pt").is_file()
    _same_weights_and_state(*(checkpoint.load(d / "checkpoint.pt") for d in (sharded, one_file)))
    packed = [_export(d / "checkpoint.pt", tmp_path / f"{d.name}.safetensors")
              for d in (sharded, one_file)]  # fmt: skip
    assert packed[0].read_bytes() == packed[1].read_bytes()


@pytest.mark.slow
def test_killed_worker_restarts_from_its_sharded_checkpoint_bit_exact(tmp_path, corpus, straight):
    """torchrun --max-restarts=1: a worker SIGKILLed after the step-20 checkpoint makes the group
    restart, resume from the newest sharded checkpoint, and end with the uninterrupted weights."""
    cmd = torchrun(data_dir=corpus, out_dir=tmp_path, **SETTINGS, resume=True)
    cmd.insert(cmd.index("--standalone") + 1, "--max-restarts=1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "checkpoints" / "step-00000020.dcp").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "no step-20 checkpoint"
            time.sleep(0.05)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGKILL)
        output = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "resumed from" in output
    a, b = (checkpoint.load(d / "checkpoint.pt") for d in (straight[0], tmp_path))
    assert a["step"] == b["step"] == 46
    _same_weights_and_state(a, b)


@pytest.mark.slow
def test_fsdp_full_precision_run_resumes_bit_exact(tmp_path, corpus):
    """Without distq's optimizer a one-file checkpoint holds plain Adam's whole state, which a
    resume cuts to this rank's rows too (it failed with "aten.lerp_.Scalar got mixed
    torch.Tensor and DTensor" at e571499)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    plain = ("--scheme", "none", "--grad-bits", "none", "--checkpoint-format", "file")
    assert "FSDP2" in _train(straight, corpus, *plain)
    a, b = _resume_from_step_20(straight, split, corpus, *plain)
    assert a["step"] == b["step"] == 46
    assert all(torch.equal(t, b["model"][n]) for n, t in a["model"].items())
    _assert_same_base_state(a["optimizer"], b["optimizer"])


@pytest.mark.slow
def test_sharded_checkpoint_of_other_settings_is_refused_naming_the_field(
    tmp_path, corpus, straight
):
    """A resume reads the sharded checkpoint's config (rank 0's distq.pt) before any shard and
    refuses another quantization in one line; nothing in the out_dir changes."""
    out = tmp_path / "copy"
    shutil.copytree(straight[0] / "checkpoints", out / "checkpoints")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    cmd = [*torchrun(data_dir=corpus, out_dir=out, **SETTINGS), "--resume"]
    cmd += ["--scheme", "ternary-approx"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "the run's settings differ: scheme: checkpoint 'ternary' vs now 'ternary-approx'" in (
        done.stderr
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_fsdp_refuses_what_reads_a_replicated_model():
    with pytest.raises(config.ConfigError, match=r"parallel='fsdp' does not run with distill=0.5"):
        config.TrainConfig(parallel="fsdp", distill=0.5)
