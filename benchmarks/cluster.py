"""A virtual cluster on one machine: N network-namespace hosts on a bridge, links shaped by tc.

Each host gets its own namespace, address 10.<net>.0.<i> on `eth0`, and optionally a token
bucket (`tbf`) limiting what it sends. The hosts hang off a bridge in a separate "switch"
namespace, so every byte a host sends to any other crosses its own `eth0` and is counted in its
`tx_bytes`. With `gateway=True` the machine's own (root) namespace joins the bridge too, at
10.<net>.0.254, so daemons and commands started outside the hosts (a SLURM controller, sbatch)
reach them. Needs root (ip netns). Always used as a context manager: teardown runs on failure.

    with VirtualCluster(4, rate="200mbit") as cluster:
        procs = [cluster.popen(i, ["python", "train.py"], env) for i in range(4)]
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

DEVICE = "eth0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class VirtualCluster:
    """`hosts` namespaces on a bridge; `rate` (tc syntax, e.g. '200mbit') shapes each host's
    egress, None leaves links unshaped."""

    def __init__(
        self, hosts: int, rate: str | None = None, net: int = 200, gateway: bool = False
    ) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts={hosts}; allowed: 1..200")
        self.hosts, self.rate, self.net, self.gateway = hosts, rate, net, gateway
        self.prefix = f"dq{os.getpid() % 100000}"
        self.switch = f"{self.prefix}sw"

    def namespace(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def address(self, i: int) -> str:
        return f"10.{self.net}.0.{i + 1}"

    @property
    def gateway_address(self) -> str:
        """The root namespace's address on the bridge (with gateway=True)."""
        return f"10.{self.net}.0.254"

    def __enter__(self) -> VirtualCluster:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.hosts):
            ns = self.namespace(i)
            _ip("netns", "add", ns)
            _ip("link", "add", DEVICE, "netns", ns, "type", "veth",
                "peer", "name", f"p{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", DEVICE)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", DEVICE, "up")
            if self.rate:
                subprocess.run(
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", DEVICE, "root",
                     "tbf", "rate", self.rate, "burst", "256kb", "latency", "50ms"],
                    check=True, capture_output=True, timeout=30,
                )

        if self.gateway:
            root_end = f"{self.prefix}gw"
            _ip("link", "add", root_end, "type", "veth",
                "peer", "name", "pgw", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", "pgw", "master", "br0")
            _ip("-n", self.switch, "link", "set", "pgw", "up")
            _ip("addr", "add", f"{self.gateway_address}/24", "dev", root_end)
            _ip("link", "set", root_end, "up")

    def close(self) -> None:
        """Delete every namespace this cluster made (their veths go with them)."""
        for ns in [self.switch, *(self.namespace(i) for i in range(self.hosts))]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def popen(
        self, i: int, cmd: Sequence[str], env: Mapping[str, str] | None = None, **kwargs
    ) -> subprocess.Popen:
        """Start `cmd` on host i, with GLOO_SOCKET_IFNAME set to the host's interface."""
        full_env = {**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": DEVICE}
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(i), *cmd],
                                env=full_env, **kwargs)

    def tx_bytes(self, i: int) -> int:
        """Bytes host i has sent on its link (kernel counter)."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.namespace(i), "cat",
             str(Path("/sys/class/net") / DEVICE / "statistics" / "tx_bytes")],
            check=True, capture_output=True, text=True, timeout=30,
        )
        return int(out.stdout)
