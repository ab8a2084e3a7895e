"""`distq report` on a sparsified checkpoint: power-law fits of the pruned layers' degrees."""

import subprocess
import sys

import numpy as np
import torch

from distq.monitor.report import write_degree_report


def checkpoint_with(tmp_path, weights, quantized):
    torch.save({"model": weights, "quantized": {n: {} for n in quantized}},
               tmp_path / "checkpoint.pt")


def test_degree_report_fits_the_sparse_quantized_layers_only(tmp_path):
    rng = np.random.default_rng(0)
    # Row degrees drawn from a power law: the fit must find it.
    degrees = np.minimum((rng.pareto(1.2, 300) + 1).astype(int), 200)
    sparse = torch.zeros(300, 200)
    for row, k in enumerate(degrees):
        sparse[row, rng.choice(200, k, replace=False)] = 0.5
    dense = torch.ones(10, 10)
    checkpoint_with(tmp_path, {"a.weight": sparse, "b.weight": dense, "fp": torch.zeros(4, 4)},
                    ["a.weight", "b.weight"])
    table, plots = write_degree_report(tmp_path)
    assert "a.weight" in table and "b.weight" not in table and "fp" not in table
    in_line = next(line for line in table.splitlines() if line.startswith("a.weight") and " in " in
                   line)
    assert "power law" in in_line
    assert [p.name for p in plots] == ["a.weight.in.png", "a.weight.out.png"]
    assert all(p.stat().st_size > 10_000 for p in plots)


def test_report_without_a_sparse_checkpoint_or_log_is_a_clear_error(tmp_path):
    checkpoint_with(tmp_path, {"b.weight": torch.ones(4, 4)}, ["b.weight"])
    assert write_degree_report(tmp_path) == ("", [])
    done = subprocess.run([sys.executable, "-m", "distq.launch.cli", "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "neither a monitor log nor a sparsified checkpoint" in done.stderr
