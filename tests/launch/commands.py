"""What the launch tests start: `distq train` alone, under torchrun on this host, or on one
host of a c10d rendezvous, with its options written as keyword arguments (`epochs=2`)."""

import subprocess
import sys

# No progress bar, no monitor log, no Prometheus exporter: settings or flags of a quiet run.
QUIET = {"progress": False, "monitor": False, "metrics_port": None}


def flags(**options: object) -> list[str]:
    """Options as flags: epochs=2 -> --epochs 2, True -> --name, False -> --no-name, None ->
    none. (A bare --monitor is not one: under torchrun it abbreviates --monitor-interval.)"""
    argv = []
    for name, value in options.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", "none" if value is None else str(value)]
    return argv


def distq_train(**options: object) -> list[str]:
    """`python -m distq.launch.train` with these options, one process."""
    return [sys.executable, "-m", "distq.launch.train", *flags(**options)]


def torchrun(nproc: int = 2, **options: object) -> list[str]:
    """`distq train` under torchrun with `nproc` workers on this host."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={nproc}", *distq_train(**options)[1:]]


def torchrun_on_host(
    cluster, host: int, nproc: int, port: int, rdzv_id: str, **options: object
) -> list[str]:
    """`distq train` under torchrun on `host` of `cluster` (a VirtualCluster), joining the
    c10d rendezvous that host 0 serves on `port`."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={cluster.hosts}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={cluster.address(0)}:{port}",
        f"--rdzv_id={rdzv_id}",
        f"--local_addr={cluster.address(host)}",
        *(["--rdzv_conf=is_host=1"] if host == 0 else []),
    ]
    return [*launcher, *distq_train(**options)[1:]]


def run_on_hosts(cluster, commands: list[list[str]], env: dict[str, str], timeout: float) -> list:
    """Run commands[i] on host i of `cluster`, all at once; their outputs (stdout and stderr
    together), each checked to have exited 0."""
    procs = [
        cluster.popen(i, cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, cmd in enumerate(commands)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:  # a timeout leaves no host's command running
        for p in procs:
            p.kill()
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text
    return outputs
