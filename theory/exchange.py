"""The theory's side of the gradient exchange: what each collective costs (the bytes a rank
sends, how many times a value is quantized) and each compressor's variance law (the proven bound
on E‖Q(x)‖²/‖g‖², where there is one). One record per collective and one law per compressor,
read by the exchange (`distq.comm`), the planner, the monitor and `distq train`; torch-free,
like all of theory/.

N elements, w ranks, P(n) the payload of n elements (packed codes plus scales), c the chunk
length of `scatter` (≥ N/w, whole buckets and bytes):
- allgather:    (w−1)·P(N) bytes, one quantization;
- scatter:      2(w−1)·P(c) bytes, two (the owner re-quantizes the reduced chunk);
- hierarchical: `scatter` among one leader per node (the fp32 reduce and broadcast inside a
  node are not counted), two quantizations across nodes, none on one node.
The fp32 ring all-reduce they are compared with sends 2(w−1)/w·4N bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distq.theory.bounds import grad_blowup_unclipped, level_spacing, sign_blowup_bound


def fp32_allreduce_bytes(numel: int, ranks: int, element_bytes: int = 4) -> int:
    """Bytes a rank sends in a ring all-reduce of `numel` full-precision elements (whole
    bytes: 2(w−1)·numel·element_bytes // w)."""
    return 2 * (ranks - 1) * numel * element_bytes // ranks


@dataclass(frozen=True)
class CollectiveRecord:
    """A collective's cost model: `name`, one line on what it does, the quantizations a value
    goes through across nodes and on a single node, and the bytes a rank sends."""

    name: str
    summary: str
    quantizations: int
    one_node_quantizations: int

    def quantizations_on(self, nodes: int) -> int:
        """How many times a gradient value is quantized with ranks on `nodes` nodes."""
        return self.one_node_quantizations if nodes == 1 else self.quantizations

    def bytes_sent(
        self,
        numel: int,
        ranks: int,
        nodes: int,
        payload: Callable[[int], int],
        chunk: Callable[[int, int], int],
    ) -> int:
        """Payload bytes a rank sends for `numel` elements among `ranks` ranks on `nodes`
        nodes; payload(n) and chunk(numel, ranks) are the compressor's."""
        if self.name == "allgather":
            return (ranks - 1) * payload(numel)
        among = nodes if self.name == "hierarchical" else ranks
        return 2 * (among - 1) * payload(chunk(numel, among))


COLLECTIVES: dict[str, CollectiveRecord] = {
    record.name: record
    for record in (
        CollectiveRecord("allgather", "one quantization; traffic grows with the ranks", 1, 1),
        CollectiveRecord("scatter", "bandwidth-optimal; two quantizations", 2, 2),
        CollectiveRecord("hierarchical", "fp32 inside a node, scatter between node leaders", 2, 0),
    )
}


def collective(name: str) -> CollectiveRecord:
    """The record of collective `name`; a ValueError naming the allowed ones otherwise."""
    if name not in COLLECTIVES:
        raise ValueError(f"collective={name!r}; allowed: {', '.join(COLLECTIVES)}")
    return COLLECTIVES[name]


def stochastic_blowup_bound(bits: int, bucket_numel: int) -> float:
    """The unbiased stochastic quantizer's bound on one quantization's E‖Q(x)‖²/‖g‖², proven
    for every gradient: m ≥ 2 bits, Lemma 3 per bucket with Cauchy–Schwarz, 1 + ((1 + √B)/2)·Δ_g
    (B the bucket size, `grad_blowup_unclipped`; clipping only shrinks ‖x‖); 1 bit (stochastic
    sign, where Lemma 3 does not hold): B (`sign_blowup_bound`)."""
    if bits == 1:
        return float(sign_blowup_bound(bucket_numel))
    return float(grad_blowup_unclipped(bucket_numel, level_spacing(bits)))


def no_bound(bits: int, bucket_numel: int) -> None:
    """No proven bound: TernGrad's scale is the max over all ranks (unbounded by this rank's g)
    and the scaled sign is biased (an unbiased quantizer's blow-up does not describe it)."""
    return None


VARIANCE_LAWS: dict[str, Callable[[int, int], float | None]] = {
    "quantize": stochastic_blowup_bound,
    "terngrad": no_bound,
    "sign": no_bound,
    "rotated": no_bound,
    "rotated-stochastic": no_bound,
}
