"""benchmarks/fsdp_bench.py's reduction of raw run records: warm-up steps left out, the slowest
rank's median step, bytes averaged over steps then hosts, memory the largest rank's, and the
table's ratios against FSDP2 fp32 and DDP."""

from benchmarks.fsdp_bench import WARMUP, measure, render


def _rank(seconds: float, sent: int, opt_sent: int, memory: int) -> dict:
    slow = [99.0] * WARMUP  # warm-up steps: left out of every number
    return {
        "step_seconds": [*slow, seconds, seconds, 3 * seconds],
        "step_tx_bytes": [10**9] * WARMUP + [sent] * 3,
        "optimizer_seconds": [*slow, 0.1, 0.1, 0.1],
        "optimizer_tx_bytes": [10**9] * WARMUP + [opt_sent] * 3,
        "memory": {"latent_bytes": memory, "optimizer_state_bytes": 2 * memory, "param_bytes": 1},
    }


def _record(variant: str, seconds: float, sent: int, memory: int, hosts: int = 2) -> dict:
    ranks = [_rank(seconds * (1 + i), sent * (1 + i), sent // 2, memory + i) for i in range(hosts)]
    return {
        "variant": variant,
        "hosts": hosts,
        "rate": "200mbit",
        "run_tx_bytes": [8000 * (1 + i) for i in range(hosts)],
        "summary": {"steps": 8, "metrics": {"test_loss": 2.0, "test_bpb": 2.885}},
        "ranks": ranks,
    }


def test_measure_leaves_out_warmup_and_takes_the_slowest_rank():
    m = measure(_record("fp32", 0.5, 3000, 100))
    assert m["step_s"] == 1.0  # rank 1: median of 1.0, 1.0, 3.0
    assert m["bytes_per_step"] == 4500  # mean over hosts of 3000 and 6000
    assert m["optimizer_bytes_per_step"] == 1500
    assert m["run_bytes_per_step"] == 12000 / 8
    assert m["latent_opt_bytes"] == 3 * 101


def test_render_ratios_against_fp32_and_ddp():
    records = [
        _record("fp32", 0.5, 30000, 100),
        _record("distq", 0.1, 1000, 50),
        _record("ddp", 0.1, 1000, 100),
    ]
    table = render(records)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    fp32, distq = lines["| FSDP2 fp32"], lines["| distq ternary + 2-bit"]
    assert "| 1000 | 1.00 | 45.0 | 1.0 |" in fp32
    assert "| 200 | 0.20 | 1.5 | 30.0 | 0.5 |" in distq  # 45000 / 1500 bytes; optimizer 500
    # memory: 3·51 bytes against DDP's 3·101, times 2 hosts
    assert f"| {2 * 51 / 101:.3f} |" in distq
    assert "2 hosts, 200mbit" in table
