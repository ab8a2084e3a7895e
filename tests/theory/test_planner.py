"""The planner's formulas: hand-computed cases, distq.comm's own byte counts, the CLI."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from distq.comm import StochasticQuantizer
from distq.comm.collectives import chunk_length as comm_chunk_length
from distq.launch.plan import main
from distq.theory.planner import chunk_length, parse_bandwidth, payload_nbytes, plan

CASES = [  # params, bits, bucket, world
    (6_300_000, 2, 512, 4),
    (1, 2, 512, 4),
    (1000, 3, None, 3),
    (12_345, 3, 100, 7),
    (99_999, 5, 2048, 8),
    (4097, 1, None, 2),
    (777, 8, 7, 5),
]


@pytest.mark.parametrize(("params", "bits", "bucket", "world"), CASES)
def test_bytes_match_distq_comm(params, bits, bucket, world):
    for dtype, scale_bytes in ((torch.float32, 4), (torch.float16, 2)):
        compressor = StochasticQuantizer(bits, bucket, scale_dtype=dtype)
        chunk = comm_chunk_length(params, world, compressor)
        assert chunk_length(params, world, bits, bucket) == chunk
        for n in (params, chunk, 1, 0):
            assert payload_nbytes(n, bits, bucket, scale_bytes) == compressor.wire.payload_nbytes(n)
        p = plan(params, bits, bucket, None, world, "scatter", 1e9, scale_bytes=scale_bytes)
        wire = compressor.wire
        assert p.collectives["allgather"].bytes_sent == (world - 1) * wire.payload_nbytes(params)
        assert p.collectives["scatter"].bytes_sent == 2 * (world - 1) * wire.payload_nbytes(chunk)


def test_hand_computed_scatter():
    # c = ⌈6.3e6 / (4·512)⌉·512 = 3077·512; P(c) = 1,575,424·2/8 + 4·3077 = 406,164
    p = plan(6_300_000, 2, 512, 2.5, 4, "scatter", 200e6, compute_seconds=0.03)
    assert p.chosen.bytes_sent == 6 * 406_164 == 2_436_984
    assert p.fp32.bytes_sent == pytest.approx(2 * 3 / 4 * 4 * 6_300_000)  # 37.8 MB
    assert p.chosen.comm_seconds == pytest.approx(2_436_984 * 8 / 200e6)
    assert p.fp32.comm_seconds == pytest.approx(1.512)
    assert p.chosen.step_seconds == pytest.approx(0.03 + 2_436_984 * 8 / 200e6)
    assert p.chosen.speedup == pytest.approx(1.542 / p.chosen.step_seconds)
    assert p.chosen.ratio == pytest.approx(37_800_000 / 2_436_984)
    # allgather: 3·P(N), P(N) = 1,575,000 + 4·⌈6.3e6/512⌉ = 1,575,000 + 4·12,305
    assert p.collectives["allgather"].bytes_sent == 3 * 1_624_220


def test_hand_computed_hierarchical():
    # 8 ranks on 2 nodes: scatter between 2 leaders; c = ⌈6.3e6/1024⌉·512 = 6153·512
    p = plan(6_300_000, 2, 512, None, 8, "hierarchical", 1e9, nodes=2)
    assert p.chosen.bytes_sent == 2 * (3_150_336 // 4 + 4 * 6153) == 1_624_392
    assert p.fp32.bytes_sent == pytest.approx(2 * 7 / 8 * 4 * 6_300_000)
    assert p.chosen.quantizations == 2
    one_node = plan(1000, 2, 512, None, 4, "hierarchical", 1e9, nodes=1)
    assert one_node.chosen.bytes_sent == 0 and one_node.chosen.ratio is None
    # nothing is quantized on one node: no quantization and no blow-up (2 and 24.6 were shown)
    assert one_node.chosen.quantizations == 0 and one_node.chosen.blowup == 1.0
    default = plan(1000, 2, 512, None, 4, "hierarchical", 1e9)  # one rank per node
    assert default.nodes == 4
    assert default.chosen.bytes_sent == default.collectives["scatter"].bytes_sent


@pytest.mark.parametrize("world", [2, 4, 16, 64])
def test_ratio_at_2_bits_512_buckets_is_15_5(world):
    p = plan(25_000_000, 2, 512, 2.5, world, "scatter", 1e9)
    assert p.chosen.ratio == pytest.approx(32 / (2 + 32 / 512), rel=2e-3)  # 15.52
    assert p.chosen.ratio == pytest.approx(15.5, abs=0.05)


def test_blowup():
    delta3 = 1 / 3
    clipped = plan(10_000, 3, 512, 2.5, 4, "scatter", 1e9)
    b = 1 + math.sqrt(2 / math.pi) * 2.5 * delta3
    assert clipped.collectives["allgather"].blowup == pytest.approx(b)
    assert clipped.chosen.blowup == pytest.approx(1 + 2 * (b - 1))  # two quantizations
    assert clipped.fp32.blowup == 1.0
    bucketed = plan(10_000, 3, 512, None, 4, "allgather", 1e9)
    assert bucketed.chosen.blowup == pytest.approx(1 + (1 + math.sqrt(512)) / 2 * delta3)
    whole = plan(10_000, 3, None, None, 4, "allgather", 1e9)
    assert whole.chosen.blowup == pytest.approx(1 + (1 + math.sqrt(10_000)) / 2 * delta3)
    assert plan(10_000, 1, 512, 2.5, 4, "scatter", 1e9).chosen.blowup is None


def test_single_rank_and_zero_compute():
    p = plan(1000, 2, 512, 2.5, 1, "scatter", 1e9, compute_seconds=0.01)
    assert p.fp32.bytes_sent == 0 and p.chosen.bytes_sent == 0
    assert p.chosen.speedup == 1.0 and p.chosen.ratio is None
    assert plan(1000, 2, 512, 2.5, 1, "scatter", 1e9).chosen.speedup is None
    assert "—" in p.to_str()


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("200mbit", 200e6),
        ("1gbit", 1e9),
        ("25MB/s", 200e6),
        ("10Gb/s", 10e9),
        ("200Mbps", 200e6),
        ("1.5 kbit/s", 1500.0),
        ("1GiB/s", 8 * 2**30),
        ("100MiB", 8 * 100 * 2**20),
        ("2e8", 2e8),
        (1e9, 1e9),
        (5, 5.0),
    ],
)
def test_parse_bandwidth(text, bps):
    assert parse_bandwidth(text) == pytest.approx(bps)


@pytest.mark.parametrize(
    "bad",
    ["fast", "", "0", "-5mbit", "10 furlongs", "1.2.3mbit", "inf", "5ibit", True, None, 0, -1.0],
)
def test_parse_bandwidth_rejects(bad):
    with pytest.raises(ValueError, match="bandwidth"):
        parse_bandwidth(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"params": 0}, "params=0"),
        ({"params": 1.5}, "params=1.5"),
        ({"bits": 0}, r"bits=0; allowed: an int in 1..8"),
        ({"bits": 9}, "bits=9"),
        ({"bucket_size": 0}, "bucket_size=0"),
        ({"clip": 0.0}, "clip=0.0"),
        ({"clip": math.nan}, "clip=nan"),
        ({"world_size": 0}, "world_size=0"),
        ({"collective": "ring"}, "collective='ring'; allowed: allgather, scatter, hierarchical"),
        ({"bandwidth_bps": 0}, "bandwidth_bps=0"),
        ({"bandwidth_bps": math.inf}, "bandwidth_bps=inf"),
        ({"compute_seconds": -1.0}, "compute_seconds=-1.0"),
        ({"scale_bytes": 3}, "scale_bytes=3"),
        ({"nodes": 5}, r"nodes=5; allowed: an int in 1..4"),
        ({"nodes": 0}, "nodes=0"),
    ],
)
def test_plan_rejects(kwargs, message):
    args = (
        dict(
            params=1000,
            bits=2,
            bucket_size=512,
            clip=2.5,
            world_size=4,
            collective="scatter",
            bandwidth_bps=1e9,
        )
        | kwargs
    )
    with pytest.raises(ValueError, match=message):
        plan(**args)


def test_to_str_table():
    p = plan(6_300_000, 2, 512, 2.5, 4, "scatter", 200e6, compute_seconds=0.03)
    text = p.to_str()
    assert "fp32 all-reduce" in text and "scatter *" in text and "allgather" not in text
    assert "15.51×" in text and "2.437" in text and "37.800" in text
    full = p.to_str(all_collectives=True)
    assert all(name in full for name in ("allgather", "scatter *", "hierarchical"))
    assert "no overlap" in full


def test_cli_prints_the_table(capsys):
    argv = [
        "--params",
        "6.3e6",
        "--bits",
        "2",
        "--bucket-size",
        "512",
        "--clip",
        "2.5",
        "--world-size",
        "4",
        "--collective",
        "scatter",
        "--bandwidth",
        "200mbit",
        "--compute-ms",
        "30",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "6,300,000 params" in out and "scatter *" in out and "15.51×" in out
    assert (
        main(
            [
                "--params",
                "6300000",
                "--bandwidth",
                "1gbit",
                "--bucket-size",
                "none",
                "--clip",
                "none",
                "--collective",
                "hierarchical",
                "--world-size",
                "8",
                "--nodes",
                "2",
                "--all",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "one scale a tensor" in out and "no clipping" in out and "hierarchical *" in out


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--params", "6.35"], "'6.35'"),
        (["--params", "lots"], "'lots'"),
        (["--bits", "9"], "9"),
        (["--bucket-size", "0"], "'0'"),
        (["--clip", "-1"], "'-1'"),
        (["--bandwidth", "fast"], "'fast'"),
        (["--collective", "ring"], "'ring'"),
        (["--compute-ms", "-3"], "'-3'"),
        (["--world-size", "4", "--nodes", "5"], "nodes=5"),
    ],
)
def test_cli_bad_arguments_exit_2(argv, named, capsys):
    base = {"--params": "1000", "--bandwidth": "1gbit"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    with pytest.raises(SystemExit) as exit_info:
        main([item for pair in base.items() for item in pair])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_theory_imports_no_torch():
    code = "import sys, distq.theory, distq.launch.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


TRAFFIC_CASES = [  # params, bits, bucket, compressor
    (5000, 2, 512, "quantize"),
    (3001, 3, None, "quantize"),
    (777, 4, 100, "quantize"),
    (5000, 2, 512, "rotated"),  # rotated: the partial last bucket is sent whole
    (3001, 3, 64, "rotated-stochastic"),
    (777, 1, 8, "rotated"),
]


def _traffic_worker(rank, world_size, out):
    from distq.comm.collectives import quantized_sum
    from distq.comm.noise import Key
    from distq.comm.registry import COMPRESSORS

    sent = {}
    for params, bits, bucket, name in TRAFFIC_CASES:
        compressor = COMPRESSORS[name].build(bits, bucket, torch.float32)
        for collective in ("allgather", "scatter"):
            x = torch.randn(params, generator=torch.Generator().manual_seed(rank))
            _, traffic = quantized_sum(x, compressor, Key(rank=rank), collective)
            sent[params, name, collective] = traffic.sent
    torch.save(sent, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_bytes_match_real_gloo_traffic(tmp_path):
    from tests.distributed import run_workers

    world = 3
    run_workers(_traffic_worker, world, tmp_path)
    for rank in range(world):
        sent = torch.load(tmp_path / f"rank{rank}.pt")
        for params, bits, bucket, name in TRAFFIC_CASES:
            p = plan(params, bits, bucket, None, world, "scatter", 1e9, compressor=name)
            for collective in ("allgather", "scatter"):
                assert sent[params, name, collective] == p.collectives[collective].bytes_sent


def test_numpy_ints_accepted():
    p = plan(np.int64(6_300_000), np.int32(2), np.int64(512), 2.5, np.int64(4), "scatter", 2e8)
    assert p.chosen.bytes_sent == 2_436_984 and type(p.params) is int


def test_codec_time_and_break_even_bandwidth():
    """At the break-even bandwidth fp32 and the quantized exchange take equally long; below it
    the quantized one wins, above it fp32 does."""
    p = plan(6_300_000, 2, 512, 2.5, 2, "scatter", 1e9, compute_seconds=0.05, codec_ns=6.0)
    chosen = p.chosen
    assert chosen.codec_seconds == pytest.approx(6e-9 * 6_300_000)
    assert p.fp32.codec_seconds == 0.0 and p.fp32.break_even_bps is None
    saved = p.fp32.bytes_sent - chosen.bytes_sent
    assert chosen.break_even_bps == pytest.approx(saved * 8 / chosen.codec_seconds)
    for factor, quantized_wins in ((0.5, True), (2.0, False)):
        q = plan(6_300_000, 2, 512, 2.5, 2, "scatter", factor * chosen.break_even_bps, 0.05,
                 codec_ns=6.0)
        assert (q.chosen.step_seconds < q.fp32.step_seconds) == quantized_wins
    at = plan(6_300_000, 2, 512, 2.5, 2, "scatter", chosen.break_even_bps, 0.05, codec_ns=6.0)
    assert at.chosen.step_seconds == pytest.approx(at.fp32.step_seconds)
    assert "beats fp32 below" in p.to_str()
    assert plan(1000, 2, 512, None, 2, "scatter", 1e9).chosen.break_even_bps == math.inf
    # 8 bits between 2 ranks in buckets of 1: 4 bytes of scale per element, more than fp32 sends
    costly = plan(1000, 8, 1, None, 2, "allgather", 1e9, codec_ns=1.0)
    assert costly.chosen.break_even_bps == 0.0 and "never beats fp32" in costly.to_str()
