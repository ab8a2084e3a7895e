"""`distq train` across real network-namespace hosts with torchrun's c10d rendezvous: the weights
equal those of a single-host run with the same seed and world size, bit for bit."""

import os
import subprocess

import pytest
import torch

from benchmarks.cluster import VirtualCluster
from tests.launch.commands import run_on_hosts, torchrun, torchrun_on_host

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]
TRAIN = {"epochs": 2, "progress": False, "metrics_port": None}
# Bit-identical results need the same arithmetic everywhere: torchrun sets OMP_NUM_THREADS=1
# only when it starts more than one process per node, and BLAS reductions differ with threads.
THREADS = {"OMP_NUM_THREADS": "1"}


def single_host(out, nproc, extra):
    cmd = torchrun(nproc, **TRAIN, **extra, out_dir=out)
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **THREADS}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def multi_host(out, hosts, nproc, extra):
    with VirtualCluster(hosts) as cluster:
        commands = [
            torchrun_on_host(cluster, i, nproc, 29533, "distq-test", **TRAIN, **extra, out_dir=out)
            for i in range(hosts)
        ]
        outputs = run_on_hosts(cluster, commands, THREADS, timeout=600)
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"], outputs


SPARSE = {"sparsity": 0.75, "sparsity_schedule": "cubic", "sparse_gradients": True}


@pytest.mark.parametrize(
    ("hosts", "nproc", "extra"),
    [(2, 1, {}), (2, 2, {}), (2, 2, SPARSE)],
    ids=["2x1", "2x2", "2x2-sparse"],
)
def test_multi_host_equals_single_host(tmp_path, hosts, nproc, extra):
    world = hosts * nproc
    reference = single_host(tmp_path / "single", world, extra)
    weights, outputs = multi_host(tmp_path / "multi", hosts, nproc, extra)
    assert f"{world} worker(s) on gloo" in outputs[0]
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name
