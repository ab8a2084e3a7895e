"""The sbatch templates under a real SLURM (slurmctld + slurmd + munge): jobs complete, and a job
stopped mid-run (SIGUSR1 as before a time limit, or `scontrol requeue`) is requeued, resumes from
its checkpoint and ends with exactly the weights of a job that was never stopped."""

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.cluster import VirtualCluster
from tests.slurm.local_slurm import LocalSlurm, Node, missing_daemons

ROOT = Path(__file__).resolve().parents[2]
SINGLE = ROOT / "slurm" / "single_node.sbatch"
MULTI = ROOT / "slurm" / "multi_node.sbatch"
TRAIN = ["--epochs", "2", "--metrics-port", "none", "--checkpoint-every", "5"]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd and munged need root"),
    pytest.mark.skipif(bool(missing_daemons()), reason=f"not installed: {missing_daemons()}"),
]


# What the submitter exports: distq's interpreter and one BLAS thread (so that results are
# bit-identical across process layouts).
JOB_ENV = {"DISTQ_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
MULTI_ENV = {**JOB_ENV, "DISTQ_NPROC": "1", "GLOO_SOCKET_IFNAME": "eth0"}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return {**state["model"], **{f"latent/{k}": v for k, v in state["optimizer"]["latent"].items()}}


def assert_same_weights(run_dir: Path, reference_job: tuple[str, Path]) -> None:
    job, cwd = reference_job
    reference, mine = weights(cwd / "runs" / f"slurm-{job}"), weights(run_dir)
    assert mine.keys() == reference.keys()
    for name in reference:
        assert torch.equal(mine[name], reference[name]), name


def wait_for_checkpoint(slurm, job, run_dir, step, timeout=240):
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / f"step-{step:08d}.pt").exists():
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.describe()
        assert time.monotonic() < deadline, f"no checkpoint of step {step} in {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("jobs")
    job = slurm.submit(SINGLE, TRAIN, cwd=cwd, env=JOB_ENV)
    assert slurm.wait(job) == "COMPLETED", (cwd / f"distq-{job}.out").read_text()
    return job, cwd


def test_single_node_job_completes_and_reports(slurm, uninterrupted):
    job, cwd = uninterrupted
    output = (cwd / f"distq-{job}.out").read_text()
    assert f"distq: job {job} start 0" in output and "2 worker(s) on gloo" in output
    assert "done: test accuracy" in output
    info = slurm.job(job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert (cwd / "runs" / f"slurm-{job}" / "summary.json").exists()


@pytest.mark.parametrize("stop", ["usr1", "requeue"])
def test_stopped_job_is_requeued_and_ends_with_the_same_weights(slurm, uninterrupted, tmp_path,
                                                                 stop):
    job = slurm.submit(SINGLE, TRAIN, cwd=tmp_path, env=JOB_ENV)
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    wait_for_checkpoint(slurm, job, run_dir, 10)
    if stop == "usr1":  # what --signal=B:USR1@60 sends the batch script before the time limit
        slurm.command("scancel", "--signal=USR1", "--batch", job)
    else:
        slurm.command("scontrol", "requeue", job)
    assert slurm.wait(job) == "COMPLETED"
    output = (tmp_path / f"distq-{job}.out").read_text()
    assert slurm.job(job)["Restarts"] == "1", output
    assert f"distq: job {job} start 1" in output
    signal_name = "SIGUSR1" if stop == "usr1" else "SIGTERM"
    stopped_at = int(output.split(f"{signal_name} received: stopped after step ")[1].split(",")[0])
    assert f"resumed from {Path('runs', f'slurm-{job}', 'checkpoints')}/step-{stopped_at:08d}.pt" \
        in output
    if stop == "usr1":
        assert "checkpoint written; requeueing" in output

    assert_same_weights(run_dir, uninterrupted)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """Two network-namespace hosts, each running its own slurmd; the controller in between."""
    with VirtualCluster(2, gateway=True, net=201) as hosts:
        nodes = [Node(f"n{i + 1}", hosts.address(i), hosts.namespace(i)) for i in range(2)]
        directory = tmp_path_factory.mktemp("slurm2")
        with LocalSlurm(directory, nodes, controller=hosts.gateway_address) as cluster:
            yield cluster


def test_multi_node_job_across_two_hosts_equals_the_single_node_job(two_hosts, uninterrupted,
                                                                    tmp_path):
    job = two_hosts.submit(MULTI, TRAIN, cwd=tmp_path, env=MULTI_ENV)
    state = two_hosts.wait(job)
    output = (tmp_path / f"distq-{job}.out").read_text()
    assert state == "COMPLETED", output
    assert "2 nodes x 1 workers, rendezvous 10.201.0.1:29500 (n1)" in output
    assert "2 worker(s) on gloo" in output
    assert_same_weights(tmp_path / "runs" / f"slurm-{job}", uninterrupted)


def test_multi_node_job_stopped_by_usr1_requeues_and_ends_with_the_same_weights(
        two_hosts, uninterrupted, tmp_path):
    job = two_hosts.submit(MULTI, TRAIN, cwd=tmp_path, env=MULTI_ENV)
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    wait_for_checkpoint(two_hosts, job, run_dir, 10)
    two_hosts.command("scancel", "--signal=USR1", "--batch", job)
    state = two_hosts.wait(job)
    output = (tmp_path / f"distq-{job}.out").read_text()
    assert state == "COMPLETED" and two_hosts.job(job)["Restarts"] == "1", output
    assert "SIGUSR1 received: stopped after step" in output and "resumed from" in output
    assert_same_weights(run_dir, uninterrupted)
