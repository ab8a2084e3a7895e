"""Which ranks share a node, for the `hierarchical` collective: one process group per node and
one of the node leaders (the lowest rank of each node)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch.distributed as dist


def node_name(environ: dict[str, str] | None = None) -> str:
    """This process's node: torchrun's GROUP_RANK, SLURM_NODEID, or the host name."""
    env = os.environ if environ is None else environ
    for var in ("GROUP_RANK", "SLURM_NODEID"):
        if var in env:
            return f"{var}={env[var]}"
    return f"host={socket.gethostname()}"


@dataclass(frozen=True)
class Topology:
    """This rank's node group, the leaders' group, and where it stands in them."""

    node_group: dist.ProcessGroup | None
    leader_group: dist.ProcessGroup | None
    leader: int  # global rank of this node's leader
    local_size: int
    num_nodes: int
    is_leader: bool

    @classmethod
    def discover(cls, group: dist.ProcessGroup | None = None) -> Topology:
        """Collective: all ranks of `group` call it together; every rank creates every group."""
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        names: list[str | None] = [None] * len(ranks)
        dist.all_gather_object(names, node_name(), group=group)
        nodes: dict[str, list[int]] = {}
        for rank, name in zip(ranks, names, strict=True):
            nodes.setdefault(name, []).append(rank)
        me, mine = dist.get_rank(), node_name()
        node_groups = {name: dist.new_group(members) for name, members in nodes.items()}
        leaders = [members[0] for members in nodes.values()]
        leader_group = dist.new_group(leaders)
        return cls(
            node_group=node_groups[mine],
            leader_group=leader_group if me in leaders else None,
            leader=nodes[mine][0],
            local_size=len(nodes[mine]),
            num_nodes=len(nodes),
            is_leader=me == nodes[mine][0],
        )
