"""Compressors as objects and by record: a Compressor object given to the exchange sends the
same bytes as its name, per-parameter widths come from the object itself, error feedback keeps
its residuals in a separate memory, and each record's variance law is what the monitor shows."""

from __future__ import annotations

import pytest
import torch

from distq.comm import (
    COMPRESSORS,
    ExchangeSettings,
    GradientExchange,
    Key,
    ResidualMemory,
    SignCompressor,
    StochasticQuantizer,
    make_compressor,
    terngrad,
)
from distq.monitor.monitor import GradientSetup
from distq.theory.exchange import COLLECTIVES, VARIANCE_LAWS


def averaged(settings: ExchangeSettings, transport, widths: list[int]) -> torch.Tensor:
    g = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    exchange = GradientExchange(settings, transport)
    lengths = [1000, 2000]
    return exchange.average(g, lengths, widths, index=1, step=7)


def test_a_compressor_object_sends_what_its_name_sends(one_rank):
    by_name = averaged(ExchangeSettings("quantize", bits=3, bucket_size=256), one_rank, [3, 3])
    by_object = averaged(ExchangeSettings(StochasticQuantizer(3, 256)), one_rank, [3, 3])
    assert torch.equal(by_name, by_object)
    # a 5-bit tensor beside it: the object's own with_bits, as the name's record builds it
    mixed = {"0.weight": 5}
    named = averaged(ExchangeSettings("quantize", 3, 256, bits_by_name=mixed), one_rank, [5, 3])
    obj = averaged(ExchangeSettings(StochasticQuantizer(3, 256), bits_by_name=mixed), one_rank,
                   [5, 3])  # fmt: skip
    assert torch.equal(named, obj)


def test_objects_with_one_width_refuse_others():
    with pytest.raises(ValueError, match="SignCompressor, which sends 1 bit"):
        ExchangeSettings(SignCompressor(512), bits_by_name={"x": 4})
    with pytest.raises(ValueError, match="sends 2 bit"):
        ExchangeSettings(terngrad(512), bits=3)
    assert ExchangeSettings(SignCompressor(512)).bits == 1
    assert (
        ExchangeSettings(StochasticQuantizer(4, 512))
        .config()["compressor"]
        .startswith("StochasticQuantizer(WireFormat(bits=4")
    )


def test_records_build_and_check_widths():
    for name, record in COMPRESSORS.items():
        built = make_compressor(name)
        assert built.wire.bits == record.default_bits
        for bits in range(1, 9):
            if bits in record.widths:
                assert record.bits(bits) == bits == record.build(bits, 512, torch.float32).wire.bits
            else:
                with pytest.raises(ValueError, match=f"bits={bits} with compressor '{name}'"):
                    record.bits(bits)
        assert record.variance is VARIANCE_LAWS[name]
    with pytest.raises(ValueError, match="compressor='foo'; allowed: quantize, terngrad, sign, "):
        make_compressor("foo")


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_the_monitor_shows_each_records_law(bits):
    for name, record in COMPRESSORS.items():
        width = bits if bits in record.widths else record.bits(None)
        setup = GradientSetup(bits=width, clip=2.5, bucket_numel=512, compressor=name)
        assert setup.blowup_bound() == record.variance(width, 512)
    assert (
        GradientSetup(bits=2, clip=None, bucket_numel=512, quantizations=0).blowup_bound() is None
    )
    assert {c.name: c.quantizations for c in COLLECTIVES.values()} == {
        "allgather": 1,
        "scatter": 2,
        "hierarchical": 2,
    }


def test_error_feedback_memory_is_apart_from_the_compressor():
    memory = ResidualMemory()
    first = make_compressor("sign", 1, 64, error_feedback=memory)
    x = torch.randn(256, generator=torch.Generator().manual_seed(1))
    first.compress(x.clone(), Key(slot=4))
    assert set(memory.state_dict()) == {"1/4"}
    # a second view over the same memory carries the residual on: Q(x + e), not Q(x)
    second = make_compressor("sign", 1, 64, error_feedback=memory)
    plain = SignCompressor(64)
    e = memory.residuals[1, 4].clone()
    assert torch.equal(second.compress(x.clone(), Key(step=1, slot=4)),
                       plain.compress(x + e, Key(step=1, slot=4)))  # fmt: skip
    restored = ResidualMemory()
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.residuals[1, 4], memory.residuals[1, 4])


def test_an_unknown_exchange_option_is_refused_with_the_nearest_name():
    """Every engine takes the exchange options as keywords; a typo must not pass silently."""
    from distq.comm import QuantizedCommState

    with pytest.raises(TypeError, match=r"'bitz' \(did you mean 'bits'\?\); allowed: compressor"):
        ExchangeSettings.of(bitz=2)
    with pytest.raises(TypeError, match="did you mean 'error_feedback'"):
        QuantizedCommState(error_feedbak=True)
