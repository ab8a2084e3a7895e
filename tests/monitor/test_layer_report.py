"""`distq report`'s per-layer plots of real `distq train` runs: the weight widths a
--weight-bits-budget allocation chose (bit_widths.png) and the channels --channel-sparsity kept
(channels.png), checked against the checkpoint, the rewritten model and the monitor's records;
a run with neither says so and draws neither."""

import json
import shutil
import subprocess

import pytest
import torch

from distq.channels import rewrite
from distq.launch import cli, config, recipes
from distq.launch.allocation import BIT_WIDTHS_NAME
from distq.monitor.report import channel_counts, layer_widths, read_log, write_layer_report
from tests.launch.commands import distq_train

pytestmark = pytest.mark.slow
TINY = {"hidden": 16, "depth": 3, "epochs": 1, "progress": False, "metrics_port": None}
BOTH = {
    "scheme": "linear", "bits": 3, "sparsity": 0.0, "weight_bits_budget": 2.5,
    "allocate_after": 5, "channel_sparsity": 0.5, "channel_every": 5,
}  # fmt: skip


def train(out, **options) -> str:
    """`distq train` with TINY and `options` into `out` (monitor on: its log is reported too);
    returns its stdout."""
    argv = [*distq_train(**TINY, **options, out_dir=out), "--keep-full-precision"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def report(out, capsys) -> list[str]:
    """`distq report out`; its stdout lines."""
    assert cli.main(["report", str(out)]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """A run that allocates widths (average 2.5 bits from 2-4 at step 5) and prunes half of
    each hidden layer's channels."""
    out = tmp_path_factory.mktemp("both")
    return out, train(out, **BOTH)


def test_widths_plotted_are_the_allocated_ones(both, capsys, tmp_path):
    out, _ = both
    assert str(out / "bit_widths.png") in report(out, capsys)
    assert (out / "bit_widths.png").stat().st_size > 10_000
    widths = layer_widths(out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert widths.bits == state["optimizer"]["tensor_bits"]  # what a resume keeps
    assert widths.bits == {n: s["bits"] for n, s in state["quantized"].items()}  # what is packed
    assert widths.numel == {n: state["model"][n].numel() for n in widths.bits}
    assert len(set(widths.bits.values())) > 1  # mixed widths, or the plot shows nothing
    assert (widths.budget, widths.method, widths.step) == (2.5, "sensitivity", 5)
    record = json.loads((out / BIT_WIDTHS_NAME).read_text())
    assert widths.average_bits == pytest.approx(record["average_bits"])
    assert widths.average_bits <= 2.5
    newest = [r["weights"] for r in read_log(out) if "weights" in r][-1]
    assert {n: w["bits"] for n, w in newest.items()} == widths.bits  # the monitor agrees

    copy = shutil.copytree(out, tmp_path / "copy", symlinks=True)
    (copy / BIT_WIDTHS_NAME).unlink()  # without the record: the checkpoint's widths
    fallback = layer_widths(copy)
    assert (fallback.bits, fallback.numel) == (widths.bits, widths.numel)
    assert fallback.budget is None


def test_channels_plotted_are_the_rewritten_models(both, capsys):
    out, stdout = both
    assert str(out / "channels.png") in report(out, capsys)
    assert (out / "channels.png").stat().st_size > 10_000
    counts = channel_counts(out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    run = config.flatten(state["config"])
    model = recipes.build_model("digits", run["hidden"], run["depth"], classes=10)
    model.load_state_dict(state["model"])
    smaller = rewrite(model, state["channels"]["keep"])  # what distq export writes
    layers, kept_layers = dict(model.named_modules()), dict(smaller.named_modules())
    assert list(counts) == ["0", "3", "6"]  # the hidden layers, in order, not the output layer
    for name, (kept, total) in counts.items():
        assert kept == kept_layers[name].out_features < total == layers[name].out_features
    kept, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    assert f"channel pruning: {kept} of {total} channels kept" in stdout


def test_a_run_without_either_says_so_and_draws_neither(tmp_path, capsys):
    train(tmp_path, scheme="ternary")
    lines = report(tmp_path, capsys)
    assert "no bit_widths.png: the run gave every quantized tensor one width" in lines
    assert "no channels.png: the run has no checkpoint of a --channel-sparsity run" in lines
    assert "no grad_bit_widths.png: the run had no --grad-bits-budget" in lines
    assert write_layer_report(tmp_path)[1] == []
    assert not (tmp_path / "bit_widths.png").exists() and not (tmp_path / "channels.png").exists()
