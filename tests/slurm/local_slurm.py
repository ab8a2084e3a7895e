"""A real SLURM cluster on this machine for tests: munged, slurmctld and one slurmd per node,
from Debian's slurm-wlm, configured in a temporary directory (SLURM_CONF), nothing global but
munge. Nodes are either this machine ("localhost") or network-namespace hosts of a
VirtualCluster (gateway=True), each with its own slurmd and address.

    with LocalSlurm(tmp_path) as slurm:
        job = slurm.submit("slurm/single_node.sbatch", ["--epochs", "1"], cwd=tmp_path)
        assert slurm.wait(job) == "COMPLETED"
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
CREDENTIAL_SECONDS = 5
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def missing_daemons() -> list[str]:
    """The SLURM/munge programs not installed here (empty: a local cluster can start)."""
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


@dataclass(frozen=True)
class Node:
    """A SLURM node: its name, address (None: the name resolves) and network namespace."""

    name: str
    address: str | None = None
    namespace: str | None = None


class LocalSlurm:
    """slurmctld on `controller` (an address of this machine) and a slurmd per node."""

    _started = 0

    def __init__(
        self,
        directory: Path,
        nodes: Sequence[Node] = (Node("localhost"),),
        controller: str | None = None,
        cpus_per_node: int = 2,
    ) -> None:
        self.directory = Path(directory)
        self.nodes = list(nodes)
        self.controller = controller
        self.cpus_per_node = cpus_per_node
        LocalSlurm._started += 1  # ports apart from other clusters' and SLURM's defaults
        base = 20000 + (os.getpid() % 1000) * 16 + 2 * (LocalSlurm._started % 8)
        self.ports = (base, base + 1)
        self._procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.directory / "slurm.conf")}

    def __enter__(self) -> LocalSlurm:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_config(self) -> None:
        d = self.directory
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host = f"localhost({self.controller})" if self.controller else "localhost"
        lines = [
            "ClusterName=distqtest",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            # A requeued job waits out the credential lifetime before it may start again: 120 s
            # by default, shortened so that tests do not idle.
            f"AuthInfo=cred_expire={CREDENTIAL_SECONDS}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "KillWait=30",
            f"SlurmctldPort={self.ports[0]}",
            f"SlurmdPort={self.ports[1]}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",
        ]
        cores = f"CPUs={self.cpus_per_node} Sockets=1 CoresPerSocket={self.cpus_per_node} "
        for node in self.nodes:
            addr = f" NodeAddr={node.address}" if node.address else ""
            lines.append(f"NodeName={node.name}{addr} {cores}ThreadsPerCore=1 RealMemory=4000")
        names = ",".join(n.name for n in self.nodes)
        lines.append(f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP")
        (d / "slurm.conf").write_text("\n".join(lines) + "\n")

    def _start(self) -> None:
        self._write_config()
        _start_munge()
        self._spawn(["slurmctld", "-D", "-i"])
        for node in self.nodes:
            # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree slurmd reads
            netns = ["nsenter", f"--net=/run/netns/{node.namespace}"] if node.namespace else []
            self._spawn([*netns, "slurmd", "-D", "-N", node.name])
        deadline = time.monotonic() + 60
        while self.node_states() != {"idle"}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM nodes not idle after 60 s: {self.describe()}")
            time.sleep(0.5)

    def _spawn(self, cmd: list[str]) -> None:
        log = (self.directory / "log" / f"{cmd[-1]}.out").open("ab")
        self._procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, start_new_session=True))

    def command(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def node_states(self) -> set[str]:
        out = self.command("sinfo", "-h", "-N", "-o", "%t", check=False)
        return {s.strip().rstrip("*") for s in out.split()} or {"none"}

    def submit(
        self,
        script: str | Path,
        args: Sequence[str] = (),
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        sbatch: Sequence[str] = (),
    ) -> str:
        """sbatch the script; returns the job id."""
        done = subprocess.run(
            ["sbatch", "--parsable", *sbatch, str(script), *args],
            env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value."""
        fields = self.command("scontrol", "show", "job", "-o", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: str, states: set[str] = FINAL_STATES, timeout: float = 300) -> str:
        """Poll until the job reaches one of `states`; returns the state."""
        deadline = time.monotonic() + timeout
        while (state := self.job(job_id)["JobState"]) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
            time.sleep(0.5)
        return state

    def describe(self) -> str:
        return self.command("sinfo", "-N", "-l", check=False) + "".join(
            p.read_text()[-2000:] for p in sorted((self.directory / "log").glob("*"))
        )

    def close(self) -> None:
        """Cancel what still runs, then stop the daemons this cluster started."""
        if self._procs:
            self.command("scancel", "--user=root", check=False)
            time.sleep(1)
        for proc in reversed(self._procs):
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs.clear()


def _start_munge() -> None:
    """munged, once for the machine (its socket is shared by every cluster)."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
