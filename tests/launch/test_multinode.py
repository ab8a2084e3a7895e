"""`distq train` across real network-namespace hosts with torchrun's c10d rendezvous: the weights
equal those of a single-host run with the same seed and world size, bit for bit."""

import os
import subprocess
import sys

import pytest
import torch

from benchmarks.cluster import VirtualCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]
TRAIN = ["-m", "distq.launch.train", "--epochs", "2", "--no-progress", "--metrics-port", "none"]
# Bit-identical results need the same arithmetic everywhere: torchrun sets OMP_NUM_THREADS=1
# only when it starts more than one process per node, and BLAS reductions differ with threads.
THREADS = {"OMP_NUM_THREADS": "1"}


def single_host(out, nproc, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *TRAIN,
        *extra,
        "--out-dir",
        str(out),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **THREADS}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def multi_host(out, hosts, nproc, extra=()):
    with VirtualCluster(hosts) as cluster:
        endpoint = f"{cluster.address(0)}:29533"
        procs = []
        for i in range(hosts):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={hosts}",
                f"--nproc_per_node={nproc}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={endpoint}",
                "--rdzv_id=distq-test",
                f"--local_addr={cluster.address(i)}",
                *(["--rdzv_conf=is_host=1"] if i == 0 else []),
                *TRAIN,
                *extra,
                "--out-dir",
                str(out),
            ]
            procs.append(
                cluster.popen(
                    i, cmd, THREADS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=600)[0])
            finally:
                p.kill()
        for p, text in zip(procs, outputs, strict=True):
            assert p.returncode == 0, text
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"], outputs


SPARSE = ("--sparsity", "0.75", "--sparsity-schedule", "cubic", "--sparse-gradients")


@pytest.mark.parametrize(
    ("hosts", "nproc", "extra"),
    [(2, 1, ()), (2, 2, ()), (2, 2, SPARSE)],
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
