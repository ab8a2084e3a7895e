"""`distq train --parallel fsdp` under a real 2-worker torchrun: the gpt recipe trains with
FSDP2 (ternary weights gathered packed, 2-bit gradients reduce-scattered), its checkpoints hold
whole tensors as a DDP run's do, a resume from a mid-run checkpoint ends bit-identical to the
uninterrupted run, and the checkpoint exports exactly."""

import shutil
import subprocess
import sys

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


def _resume_from_step_20(straight, split, corpus, *extra: str) -> tuple[dict, dict]:
    """Copy `straight`'s step-20 checkpoint into `split`, resume there; both final checkpoints."""
    mid = straight / "checkpoints" / "step-00000020.pt"
    (split / "checkpoints").mkdir(parents=True)
    for path in (mid, mid.with_name(mid.name + ".sha256")):
        shutil.copy(path, split / "checkpoints" / path.name)
    resumed = _train(split, corpus, "--resume", *extra)
    assert "resumed from" in resumed and "at step 20" in resumed
    return tuple(checkpoint.load(d / "checkpoint.pt") for d in (straight, split))


def _assert_same_base_state(a: dict, b: dict) -> None:
    """The wrapped optimizer's state (Adam's moments) equal slot by slot."""
    assert a.keys() == b.keys()
    for index, slots in a["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, b["state"][index][slot]), (index, slot)


@pytest.mark.slow
def test_fsdp_run_resumes_bit_exact_and_exports(tmp_path, corpus):
    straight, split = tmp_path / "straight", tmp_path / "split"
    output = _train(straight, corpus)
    banner = "gpt, 2 worker(s) on gloo, weights ternary, FSDP2: packed weight all-gather, 2-bit"
    assert banner in output  # it said "fp32 gradients" at 4ed828d
    traffic = output.split("FSDP traffic (rank 0): gradients ")[1]
    sent, fp32 = (float(traffic.split(" MB")[i].split()[-1]) for i in (0, 1))
    assert fp32 / sent > 8  # 2-bit gradients against FSDP's fp32 reduce-scatter
    a, b = _resume_from_step_20(straight, split, corpus)
    assert a["step"] == b["step"] == 46
    width = SETTINGS["hidden"]
    assert a["model"]["blocks.0.fc.weight"].shape == (4 * width, width)  # whole, not a shard
    for part in ("model", "latent", "alpha"):
        mine = a["model"] if part == "model" else a["optimizer"][part]
        theirs = b["model"] if part == "model" else b["optimizer"][part]
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(t, theirs[n]) for n, t in mine.items()), part
    _assert_same_base_state(a["optimizer"]["base"], b["optimizer"]["base"])
    packed = tmp_path / "model.safetensors"
    export = [sys.executable, "-m", "distq.launch.cli", "export", straight / "checkpoint.pt"]
    subprocess.run([*map(str, export), str(packed)], check=True, capture_output=True, timeout=120)
    loaded = load_packed(packed)
    assert all(torch.equal(loaded[n], t) for n, t in a["model"].items())


@pytest.mark.slow
def test_fsdp_full_precision_run_resumes_bit_exact(tmp_path, corpus):
    """Without distq's optimizer the checkpoint holds plain Adam's whole state, which a resume
    cuts to this rank's rows too (it failed with "aten.lerp_.Scalar got mixed torch.Tensor and
    DTensor" at e571499)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    plain = ("--scheme", "none", "--grad-bits", "none")
    assert "FSDP2" in _train(straight, corpus, *plain)
    a, b = _resume_from_step_20(straight, split, corpus, *plain)
    assert a["step"] == b["step"] == 46
    assert all(torch.equal(t, b["model"][n]) for n, t in a["model"].items())
    _assert_same_base_state(a["optimizer"], b["optimizer"])


def test_fsdp_refuses_what_reads_a_replicated_model():
    with pytest.raises(config.ConfigError, match=r"parallel='fsdp' does not run with distill=0.5"):
        config.TrainConfig(parallel="fsdp", distill=0.5)
