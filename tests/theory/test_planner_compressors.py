"""The planner's compressors: the rotated quantizers' bytes against distq.comm's wire format
(real gloo traffic: tests/theory/test_planner.py), their Gaussian-approximation blow-up
estimate, the refusals, and `distq plan` with the default compressor printing what it printed
before the compressor was an option."""

import pytest

from distq.comm.collectives import chunk_length as comm_chunk_length
from distq.comm.registry import COMPRESSORS
from distq.comm.rotation import RotatedQuantizer
from distq.launch.plan import main
from distq.theory.exchange import COLLECTIVES, VARIANCE_LAWS
from distq.theory.plan_compressors import PLANNED
from distq.theory.planner import chunk_length, payload_nbytes, plan
from distq.theory.rotation import rotated_vnmse

ROTATED = ("rotated", "rotated-stochastic")


def _quantizer(name: str, bits: int, bucket: int) -> RotatedQuantizer:
    return RotatedQuantizer(bits, bucket, stochastic=name == "rotated-stochastic")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket", [8, 64, 512, 4096])
def test_rotated_payload_is_the_wire_formats(bits, bucket):
    wire = RotatedQuantizer(bits, bucket).wire
    for n in (0, 1, bucket - 1, bucket, bucket + 1, 3 * bucket + 5, 1_000_003):
        assert payload_nbytes(n, bits, bucket, 4, whole_buckets=True) == wire.payload_nbytes(n)
    for n, ranks in ((1, 1), (1000, 3), (1_000_003, 7), (5 * bucket, 5)):
        assert chunk_length(n, ranks, bits, bucket) == comm_chunk_length(
            n, ranks, RotatedQuantizer(bits, bucket)
        )


def test_rotated_sends_the_partial_bucket_whole():
    # 1000 elements in buckets of 512, 2 bits: 2 whole buckets, 2·512·2/8 + 2·4 = 264 bytes
    # (the stochastic quantizer's partial bucket: ⌈1000·2/8⌉ + 8 = 258)
    p = plan(1000, 2, 512, None, 2, "allgather", 1e9, compressor="rotated")
    assert p.chosen.bytes_sent == 264
    assert plan(1000, 2, 512, None, 2, "allgather", 1e9).chosen.bytes_sent == 258
    with pytest.raises(ValueError, match="whole_buckets=True needs a bucket_size"):
        payload_nbytes(10, 2, None, whole_buckets=True)


@pytest.mark.parametrize("name", ROTATED)
@pytest.mark.parametrize(
    ("params", "bits", "bucket", "world", "nodes"),
    [(6_300_000, 2, 512, 4, 2), (1, 1, 8, 2, None), (12_345, 3, 64, 7, 7), (777, 4, 4096, 8, 4)],
)
def test_rotated_plan_bytes_are_the_collectives(name, params, bits, bucket, world, nodes):
    q = _quantizer(name, bits, bucket)
    p = plan(params, bits, bucket, 2.5, world, "scatter", 1e9, nodes=nodes, compressor=name)
    for collective, record in COLLECTIVES.items():
        expected = record.bytes_sent(
            params, world, nodes or world, q.wire.payload_nbytes,
            lambda n, ranks: comm_chunk_length(n, ranks, q),
        )  # fmt: skip
        assert p.collectives[collective].bytes_sent == expected


@pytest.mark.parametrize("name", ROTATED)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket", [64, 512, 4096])
def test_rotated_blowup_is_the_gaussian_estimate(name, bits, bucket):
    vnmse = rotated_vnmse(bits, bucket, stochastic=name == "rotated-stochastic")
    for clip in (2.5, None):  # the exchange clips, then rotates: the clip does not enter it
        p = plan(10_000, bits, bucket, clip, 4, "scatter", 1e9, compressor=name)
        assert p.collectives["allgather"].blowup == pytest.approx(1 + vnmse, rel=1e-12)
        assert p.collectives["scatter"].blowup == pytest.approx(1 + 2 * vnmse, rel=1e-12)
        assert p.fp32.blowup == 1.0 and p.fp32.blowup_is_bound
        assert not p.collectives["scatter"].blowup_is_bound
        assert not p.collectives["allgather"].blowup_is_bound


def test_rotated_blowup_none_below_64_and_quantize_is_a_bound():
    small = plan(10_000, 2, 32, None, 4, "scatter", 1e9, compressor="rotated")
    assert small.chosen.blowup is None and "n/a (bucket < 64)" in small.to_str()
    default = plan(10_000, 2, 512, 2.5, 4, "scatter", 1e9)
    assert default.compressor == "quantize"
    assert all(e.blowup_is_bound for e in [default.fp32, *default.collectives.values()])
    assert "†" not in default.to_str(all_collectives=True)
    est = plan(10_000, 2, 512, 2.5, 4, "scatter", 1e9, compressor="rotated-stochastic")
    assert est.chosen.blowup != plan(10_000, 2, 512, 2.5, 4, "scatter", 1e9, compressor="rotated")
    text = est.to_str()
    assert "2-bit rotated-stochastic, buckets of 512" in text and "blow-up†" in text
    assert "an estimate, not a bound" in text and "Gaussian approximation" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"compressor": "ring"},
            "compressor='ring'; allowed: quantize, rotated, rotated-stochastic",
        ),
        (
            {"compressor": "sign"},
            "compressor='sign' has no model in the planner; allowed: quantize",
        ),
        ({"compressor": "terngrad"}, "compressor='terngrad' has no model"),
        ({"bits": 5}, r"bits=5 with compressor 'rotated'; allowed: 1\.\.4"),
        ({"bits": 8}, "bits=8 with compressor 'rotated'"),
        ({"bucket_size": None}, r"bucket_size=None with compressor 'rotated'; allowed: a power of"),
        ({"bucket_size": 500}, "bucket_size=500 .* two in 8..65536"),
        ({"bucket_size": 4}, "bucket_size=4 "),
        ({"bucket_size": 1 << 17}, "bucket_size=131072 "),
        ({"scale_bytes": 2}, "scale_bytes=2 with compressor 'rotated'; allowed: 4"),
    ],
)
def test_plan_rejects_for_rotated(kwargs, message):
    args = dict(
        params=1000, bits=2, bucket_size=512, clip=2.5, world_size=4, collective="scatter",
        bandwidth_bps=1e9, compressor="rotated",
    ) | kwargs  # fmt: skip
    with pytest.raises(ValueError, match=message):
        plan(**args)


def test_planned_names_are_the_registrys():
    assert set(PLANNED) <= set(VARIANCE_LAWS) == set(COMPRESSORS)


NOTES_BEFORE = (
    "MB: 10^6 bytes each rank sends over the slow link per step; fp32 all-reduce is one flat\n"
    "ring over all ranks; hierarchical counts only the node leaders' quantized exchange.\n"
    "step = compute + comm + codec (no overlap; codec: --codec-ns per element, 0 if "
    "not given).\n"
    "blow-up: the theory's bound on E|Q(g)|²/|g|²; scatter and hierarchical quantize twice\n"
    "and the two variances add.\n"
)
BEFORE = {  # `distq plan` output at dd452ee, before --compressor existed
    "--params 6.3e6 --bandwidth 200mbit --compute-ms 30 --all --codec-ns 6": (
        "6,300,000 params, 2-bit, buckets of 512, clip at 2.5σ, 4 ranks, 4 nodes, 200 Mbit/s, "
        "compute 30 ms, codec 6 ns/element\n"
        "\n"
        "exchange         MB sent/rank  comm ms  step ms  speed-up  bytes ratio  "
        "quantized  blow-up\n"
        "fp32 all-reduce        37.800   1512.0   1542.0     1.00×        1.00×          "
        "0    1.000\n"
        "allgather               4.873    194.9    262.7     5.87×        7.76×          "
        "1    2.995\n"
        "scatter *               2.437     97.5    165.3     9.33×       15.51×          "
        "2    4.989\n"
        "hierarchical            2.437     97.5    165.3     9.33×       15.51×          "
        "2    4.989\n"
        "\n"
        + NOTES_BEFORE
        + "scatter beats fp32 below 7.48 Gbit/s (codec 6 ns/element); on a faster link turn it off "
        "(plain DDP).\n"
    ),
    "--params 6300000 --bits 1 --bucket-size none --clip none --collective hierarchical "
    "--world-size 8 --nodes 2 --bandwidth 1gbit": (
        "6,300,000 params, 1-bit, one scale a tensor, no clipping, 8 ranks, 2 nodes, "
        "1000 Mbit/s, compute 0 ms, codec 0 ns/element\n"
        "\n"
        "exchange         MB sent/rank  comm ms  step ms  speed-up  bytes ratio  quantized      "
        "blow-up\n"
        "fp32 all-reduce        44.100    352.8    352.8     1.00×        1.00×          0  "
        "n/a (1 bit)\n"
        "hierarchical *          0.788      6.3      6.3    56.00×       56.00×          2  "
        "n/a (1 bit)\n"
        "\n" + NOTES_BEFORE
    ),
}


@pytest.mark.parametrize("argv", BEFORE)
def test_cli_default_compressor_prints_what_it_printed_before(argv, capsys):
    assert main(argv.split()) == 0
    assert capsys.readouterr().out == BEFORE[argv]
    assert main([*argv.split(), "--compressor", "quantize"]) == 0
    assert capsys.readouterr().out == BEFORE[argv]


def test_cli_rotated(capsys):
    argv = "--compressor rotated --bits 2 --params 6.3e6 --bandwidth 200mbit --compute-ms 30"
    assert main(argv.split()) == 0
    out = capsys.readouterr().out
    once = rotated_vnmse(2, 512)
    assert "2-bit rotated, buckets of 512, clip at 2.5σ" in out
    assert f"  {1 + 2 * once:.3f}\n" in out and "blow-up†" in out
    assert "blow-up†: an estimate, not a bound" in out


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ("--compressor sign", "compressor='sign' has no model in the planner; allowed: quantize"),
        ("--compressor rotated --bits 5", "bits=5 with compressor 'rotated'; allowed: 1..4"),
        ("--compressor rotated --bucket-size none", "bucket_size=None with compressor 'rotated'"),
        ("--compressor rotated-stochastic --bucket-size 100", "bucket_size=100"),
    ],
)
def test_cli_rotated_bad_arguments_exit_2(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", "1000", "--bandwidth", "1gbit", *argv.split()])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
