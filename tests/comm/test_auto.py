"""bits="auto" (`distq.comm.auto`): the choice rule, the settings it accepts, the measured
choice on real gloo groups (the same on every rank, recorded with its reasons, and the average
it gives is that option's), and the trial of real steps that settles what the margin decides."""

from __future__ import annotations

import logging
import math
import os
import time

import pytest
import torch

from distq.comm import ExchangeSettings, GradientExchange
from distq.comm.auto import Choice, Option, StepTrial, choose, predict
from tests.distributed import run_workers


def test_the_fastest_option_within_the_budget_wins():
    options = {
        "fp32": Option(1.0, 0.0),
        "fp16": Option(0.6, 1e-7),
        "4-bit": Option(0.25, 0.05),  # counts as 0.5 (CODEC_MARGIN 2)
        "2-bit": Option(0.2, 0.4),  # fastest, but over the budget
    }
    assert choose(options, budget=0.3) == "4-bit"
    assert choose(options, budget=0.5) == "2-bit"
    assert choose(options, budget=1e-9) == "fp32"  # fp16's rounding is over it too
    slow_codecs = {**options, "4-bit": Option(2.0, 0.05), "2-bit": Option(3.0, 0.1)}
    assert choose(slow_codecs, budget=0.3) == "fp32"  # fp16 counts as 1.2: the margin too
    assert choose({**slow_codecs, "fp16": Option(0.4, 1e-7)}, budget=0.3) == "fp16"
    assert choose({"fp32": Option(1.0, 0.0), "fp16": Option(1.0, 0.0)}, 0.3) == "fp32"  # ties
    # a width must be predicted CODEC_MARGIN times faster than full precision
    near = {"fp32": Option(1.0, 0.0), "2-bit": Option(0.55, 0.1)}
    assert choose(near, 0.3) == "fp32"
    assert choose({**near, "2-bit": Option(0.45, 0.1)}, 0.3) == "2-bit"
    assert Choice("2-bit", 10, options).bits == 2 and Choice("fp16", 10, options).bits is None


def test_the_margin_alone_deciding_leaves_a_contender_for_real_steps():
    near = {"fp32": Option(1.0, 0.0), "fp16": Option(0.9, 1e-7), "2-bit": Option(0.55, 0.1)}
    assert predict(near, 0.3, 10) == Choice("fp32", 10, near, contender="2-bit")
    assert predict({**near, "2-bit": Option(0.95, 0.1)}, 0.3, 10).contender == "fp16"
    far = {**near, "2-bit": Option(0.4, 0.1)}
    assert predict(far, 0.3, 10) == Choice("2-bit", 10, far)  # faster even with the margin
    slow = {**near, "fp16": Option(1.5, 1e-7), "2-bit": Option(1.2, 0.1)}
    assert predict(slow, 0.3, 10) == Choice("fp32", 10, slow)  # slower even without it
    settled = predict(near, 0.3, 10).settled(0.9)
    assert (settled.name, settled.contender) == ("2-bit", None)
    assert settled.describe().endswith("; steps timed: 2-bit 0.900x fp32's -> 2-bit")
    for ratio in (0.96, 1.2):  # a tie (within TRIAL_TOLERANCE) goes to the margin's choice
        kept = predict(near, 0.3, 10).settled(ratio)
        assert (kept.name, kept.contender) == ("fp32", None)


def test_a_trial_alternates_sides_and_takes_the_median_ratio_of_neighbours():
    trial = StepTrial(start=5, rounds=3)
    assert [trial.contender_at(s) for s in range(4, 12)] == [0, 1, 0, 1, 0, 1, 0, 0]
    for step, at in zip(range(5, 13), [0, 1, 3, 4.5, 6.5, 7, 9, 100], strict=True):
        trial.stamp(step, at)  # step 12 lies past the end: not kept
    # rounds (contender ÷ margin's): 1/2, 1.5/2, 0.5/2; a drift or an outlier in one round
    # does not move the median
    assert trial.ratio() == 0.5 and 12 not in trial.stamps
    gaps = StepTrial(start=0, rounds=2)
    for step in (0, 1, 3, 4):  # step 2 never stamped: no round is whole
        gaps.stamp(step, float(step))
    assert gaps.ratio() == math.inf


def test_settings_for_auto():
    assert ExchangeSettings(bits="auto").auto_widths() == [8, 4, 2, 1]
    assert ExchangeSettings("rotated", bits="auto").auto_widths() == [4, 2, 1]
    assert ExchangeSettings("terngrad", bits="auto").auto_widths() == [2]
    with pytest.raises(ValueError, match="allowed with it: no bits_by_name"):
        ExchangeSettings(bits="auto", bits_by_name={"x": 4})
    with pytest.raises(ValueError, match="collective 'scatter' or 'allgather'"):
        ExchangeSettings(bits="auto", collective="hierarchical")
    with pytest.raises(ValueError, match="auto_budget=0; allowed: a positive"):
        ExchangeSettings(bits="auto", auto_budget=0)
    with pytest.raises(ValueError, match=r"bits='two'; allowed: an int in 1\.\.8 or 'auto'"):
        ExchangeSettings(bits="two")


def test_one_rank_chooses_full_precision_and_says_why(one_rank, caplog):
    """On one rank nothing crosses a link: an all-reduce costs next to nothing and any codec
    more, so fp32 or fp16 is chosen (measured, not assumed), the average is the input (to fp16's
    rounding), and the log line lists every option."""
    exchange = GradientExchange(ExchangeSettings("rotated", bits="auto"), one_rank)
    g = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="distq.comm.exchange"):
        average = exchange.average(g.clone(), [2000, 3000], ["auto", "auto"], index=0, step=3)
    choice = exchange.choices[0]
    assert choice.bits is None and torch.allclose(average, g, rtol=1e-3, atol=0)
    assert list(choice.options) == ["fp32", "fp16", "4-bit", "2-bit", "1-bit"]
    errors = {name: o.error for name, o in choice.options.items()}
    assert errors["fp32"] == 0 and 0 < errors["fp16"] < 1e-6
    assert 0.3 < errors["1-bit"] / 2 < 0.8 and 0.08 < errors["2-bit"] / 2 < 0.2  # scatter: q = 2
    assert "bucket 0: 5000 elements: fp32" in caplog.text and f"-> {choice.name}" in caplog.text
    before = dict(exchange.choices)
    exchange.average(g.clone(), [2000, 3000], ["auto", "auto"], index=0, step=4)
    assert exchange.choices == before  # measured once per bucket


WORLD = 3


def worker(rank, world_size, out_dir):
    os.environ["DISTQ_COMPILE"] = "0"
    torch.set_num_threads(1)
    from distq.comm.transport import TorchTransport

    g = torch.randn(20000, generator=torch.Generator().manual_seed(rank))
    out = {}
    for name, budget in (("tight", 1e-12), ("loose", 10.0)):
        settings = ExchangeSettings("rotated", bits="auto", auto_budget=budget, min_numel=0)
        exchange = GradientExchange(settings, TorchTransport())
        average = exchange.average(g.clone(), [20000], ["auto"], index=0, step=2)
        out[name] = (exchange.choices[0], average)
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("auto")
    run_workers(worker, WORLD, str(out_dir))
    return [torch.load(out_dir / f"{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
def test_every_rank_makes_the_same_choice_and_gets_the_same_average(chosen):
    for budget in ("tight", "loose"):
        choices = [out[budget][0] for out in chosen]
        assert all(c == choices[0] for c in choices[1:])  # the max-reduced figures, alike
        averages = [out[budget][1] for out in chosen]
        assert all(torch.equal(averages[0], a) for a in averages[1:])
    assert chosen[0]["tight"][0].name == "fp32"  # fp16's rounding is over 1e-12
    exact = sum(torch.randn(20000, generator=torch.Generator().manual_seed(r)) for r in range(3))
    assert torch.allclose(chosen[0]["tight"][1], exact / 3, atol=1e-6)


def test_saved_choices_are_used_again_without_measuring(one_rank, caplog):
    """A resumed exchange sends what the run it continues chose (a measurement could differ)."""
    settings = ExchangeSettings("rotated", bits="auto", min_numel=0)
    first = GradientExchange(settings, one_rank)
    g = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    first.average(g.clone(), [3000], ["auto"], index=2, step=5)
    state = first.choices_state()
    resumed = GradientExchange(settings, one_rank)
    resumed.load_choices(state)
    assert resumed.choices == first.choices and resumed.stats.choices == first.stats.choices
    with caplog.at_level(logging.INFO, logger="distq.comm.exchange"):
        resumed.average(g.clone(), [3000], ["auto"], index=2, step=6)
    assert "bits='auto'" not in caplog.text  # nothing measured again


def trial_worker(rank, world_size, out_dir, slow_side):
    """Steps of a bucket whose choice the margin decided (fp32, contender 2-bit), the side
    `slow_side` made slower by a sleep: what each step sent, and the settled choice."""
    os.environ["DISTQ_COMPILE"] = "0"
    torch.set_num_threads(1)
    from distq.comm.transport import TorchTransport

    g = torch.randn(4096, generator=torch.Generator().manual_seed(rank))
    exchange = GradientExchange(ExchangeSettings("rotated", bits="auto", min_numel=0),
                                TorchTransport())  # fmt: skip
    options = {"fp32": (1.0, 0.0), "fp16": (1.0, 1e-7), "2-bit": (0.6, 0.1)}
    state = {"name": "fp32", "numel": 4096, "contender": "2-bit", "options": options}
    exchange.load_choices({0: state})
    sent = []
    for step in range(10, 26):
        before = exchange.stats.bytes_sent
        exchange.average(g.clone(), [4096], ["auto"], index=0, step=step)
        codes = exchange.stats.bytes_sent > before
        sent.append("2-bit" if codes else "fp32")
        if sent[-1] == slow_side:
            time.sleep(0.03)
    torch.save((sent, exchange.choices[0], exchange.choices_state()),
               os.path.join(out_dir, f"{rank}.pt"))  # fmt: skip


@pytest.mark.parametrize("slow_side", ["2-bit", "fp32"])
def test_real_steps_settle_the_choice_alike_on_every_rank(tmp_path, slow_side):
    """From the step after the prediction, 5 steps each alternate; the faster side is kept from
    step 21 on, the same on both ranks (their ratios are max-reduced), with the ratio said."""
    run_workers(trial_worker, 2, str(tmp_path), slow_side)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    winner = "fp32" if slow_side == "2-bit" else "2-bit"
    sides = ["fp32"] + ["2-bit", "fp32"] * 5  # steps 10..20
    for sent, choice, state in results:
        assert sent == sides + [winner] * 5, choice.describe()
        assert (choice.name, choice.contender) == (winner, None)
        assert "steps timed: 2-bit" in choice.describe()
        resumed = GradientExchange(ExchangeSettings("rotated", bits="auto"), None)
        resumed.load_choices(state)
        assert resumed.choices[0] == choice
    assert results[0][1] == results[1][1]


def test_a_choice_saved_while_its_steps_are_timed_is_timed_again(one_rank):
    """A checkpoint mid-trial keeps the contender; the resumed run times 10 steps of its own."""
    settings = ExchangeSettings("rotated", bits="auto", min_numel=0)
    options = {"fp32": (1.0, 0.0), "fp16": (1.0, 1e-7), "2-bit": (0.6, 0.1)}
    first = GradientExchange(settings, one_rank)
    first.load_choices({0: {"name": "fp32", "numel": 3000, "contender": "2-bit",
                            "options": options}})  # fmt: skip
    g = torch.randn(3000, generator=torch.Generator().manual_seed(2))
    for step in range(5):
        first.average(g.clone(), [3000], ["auto"], index=0, step=step)
    saved = first.choices_state()
    assert saved[0]["contender"] == "2-bit" and first.trial is not None
    resumed = GradientExchange(settings, one_rank)
    resumed.load_choices(saved)
    for step in range(5, 16):  # the trial: steps 6..15, settled on step 16's first call
        resumed.average(g.clone(), [3000], ["auto"], index=0, step=step)
    assert resumed.choices[0].contender == "2-bit"
    resumed.average(g.clone(), [3000], ["auto"], index=0, step=16)
    assert resumed.choices[0].contender is None and "steps timed: 2-bit" in resumed.choices[0].timed
