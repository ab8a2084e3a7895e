"""The main job end to end: real torchrun, 2 gloo workers, then `distq export` of its checkpoint."""

import subprocess
import sys

import pytest
import torch

from distq.export import load_packed
from tests.launch.commands import QUIET, torchrun

pytestmark = pytest.mark.slow


def run(*args, timeout=300):
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    stdout = run(*torchrun(epochs=3, out_dir=out, progress=False))
    return out, stdout


def test_torchrun_trains_ternary_digits_and_reports(trained):
    out, stdout = trained
    assert "2 worker(s) on gloo, weights ternary, 2-bit quantize gradients, scatter" in stdout
    assert "15.5x less" in stdout  # 2-bit codes + one fp32 scale per 512 elements
    assert "3.weight   256x256" in stdout and "ternary, 2 bit" in stdout
    accuracies = [
        float(line.rsplit(" ", 1)[1].rstrip("%"))
        for line in stdout.splitlines()
        if line.startswith("epoch ")
    ]
    assert len(accuracies) == 3
    assert accuracies[-1] > 85.0
    assert "KiB fp32 ->" in stdout and "KiB packed" in stdout
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["world_size"] == 2
    assert sorted(state["quantized"]) == ["3.weight", "6.weight"]
    assert len(state["model"]["3.weight"].unique()) <= 3


def test_export_rebuilds_the_checkpoint_exactly_and_prints_sizes(trained):
    out, _ = trained
    target = out / "model.safetensors"
    stdout = run(
        sys.executable, "-m", "distq.launch.cli", "export", str(out / "checkpoint.pt"), str(target)
    )
    assert "packed" in stdout and "x" in stdout
    model = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    rebuilt = load_packed(target)
    assert rebuilt.keys() == model.keys()
    for name, tensor in model.items():
        assert torch.equal(rebuilt[name], tensor), name
    assert target.stat().st_size < sum(t.numel() * t.element_size() for t in model.values()) / 4


def test_cli_lists_schemes():
    stdout = run(sys.executable, "-m", "distq.launch.cli", "schemes")
    for name in ("binary", "ternary", "ternary-approx", "ternary2", "linear", "log", "twn"):
        assert name in stdout
    rows = {line.split()[0]: line for line in stdout.splitlines() if line and line[0] != " "}
    assert rows["shared"].split()[1:6] == ["2-4", "bit", "loss-aware", "fitted:", "codebook"]
    assert " warm " in rows["shared"] and " cold " in rows["ternary"]
    assert rows["linear"].split()[4:7] == ["1,", "1/3,", "1/7,"]  # Δ_w at 2, 3, 4 bits
    methods = ("distq quantize CHECKPOINT", "--distill 0.5", "--estimator meta", "--sparsity 0.75")
    for command in methods:
        assert command in stdout
    usage = run(sys.executable, "-m", "distq.launch.cli", "--help")
    for name in ("train", "quantize", "export", "schemes", "report", "plan"):
        assert f"\n  {name} " in usage


def test_monitor_logs_every_step_and_report_plots_it(trained):
    out, _ = trained
    import json

    for rank in (0, 1):
        records = [json.loads(line) for line in (out / f"monitor-rank{rank}.jsonl").open()]
        assert [r["step"] for r in records] == list(range(1, len(records) + 1))
        assert len(records) == 3 * 22  # 3 epochs x 22 steps of 2 x 32 examples
        assert any("weights" in r for r in records) and any("grad_blowup" in r for r in records)
        assert all(r["grad_blowup"] < r["grad_blowup_bound"] for r in records if "grad_blowup" in r)
    stdout = run(sys.executable, "-m", "distq.launch.cli", "report", str(out))
    for name in ("loss.png", "weight_error.png", "grad_blowup.png", "bytes.png"):
        assert name in stdout and (out / name).stat().st_size > 10_000


def test_hierarchical_on_one_node_says_it_sends_full_precision(tmp_path):
    stdout = run(
        *torchrun(
            epochs=1, hidden=16, depth=2, collective="hierarchical", **QUIET, out_dir=tmp_path
        )
    )
    assert "fp32 gradients (hierarchical on one node: a full-precision all-reduce)" in stdout
    assert "full-precision all-reduce, nothing quantized on one node" in stdout
    assert "2-bit" not in stdout and "nan" not in stdout.lower()
