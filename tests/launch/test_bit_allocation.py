"""`--weight-bits-budget` in `distq train`: its config errors, the flags and YAML keys, widths
chosen at allocate_after and recorded (bit_widths.json, the checkpoint), a resume that keeps
them bit-exactly and refuses another budget, and DQMQ's search behind --bit-allocation dqmq."""

import argparse
import json
import re
import subprocess

import pytest
import torch

from distq.launch import config, train
from distq.launch.allocation import BIT_WIDTHS_NAME
from tests.launch.commands import QUIET, torchrun
from tests.launch.test_distill import final, tiny

MIXED = {
    "scheme": "linear",
    "bits": 3,
    "sparsity": 0.0,
    "depth": 3,
    "keep_full_precision": [],
    "weight_bits_budget": 2.5,
    "allocate_after": 5,
}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"weight_bits_budget": 3.0}, "weight_bits_budget needs a scheme of several widths "
         "(linear, log, shared); scheme is 'ternary'"),
        ({"scheme": "none", "weight_bits_budget": 3.0}, "weight_bits_budget=3.0 needs a "
         "quantization scheme; scheme is 'none'"),
        ({"scheme": "linear", "bits": 3, "weight_bits_budget": 4.5}, "weight_bits_budget=4.5 "
         "is outside bit_candidates [2, 3, 4]; allowed: 2..4"),
        ({"scheme": "shared", "bits": 3, "weight_bits_budget": 3.0, "bit_candidates": [2, 5]},
         "bit_candidates=[2, 5]: allowed: distinct widths of scheme 'shared', 2..4"),
        ({"scheme": "linear", "bits": 3, "weight_bits_budget": 3.0, "bit_candidates": ["3"]},
         "bit_candidates=['3']: expected a list of integers"),
        ({"bit_allocation": "greedy"}, "bit_allocation='greedy' is not allowed; allowed: "
         "sensitivity, dqmq"),
        ({"allocate_after": 0}, "allocate_after=0 is below the minimum 1"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key_and_what_is_allowed(values, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.from_mapping(values)


def test_flags_and_yaml_keys_set_the_weights_section(tmp_path):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    argv = ["--scheme", "log", "--bits", "3", "--weight-bits-budget", "2.5"]
    argv += ["--bit-candidates", "2", "4", "--allocate-after", "7", "--bit-allocation", "dqmq"]
    weights = config.from_args(parser.parse_args(argv)).weights
    assert (weights.weight_bits_budget, weights.bit_candidates) == (2.5, [2, 4])
    assert (weights.allocate_after, weights.bit_allocation) == (7, "dqmq")
    path = tmp_path / "run.yaml"
    path.write_text("weights: {scheme: linear, bits: 3, weight_bits_budget: 3, "
                    "bit_candidates: [2, 3, 4]}\n")  # fmt: skip
    weights = config.from_args(parser.parse_args([str(path)])).weights
    assert (weights.weight_bits_budget, weights.bit_candidates) == (3, [2, 3, 4])
    assert "weight_bits_budget" not in weights.as_kwargs()  # not QuantizedOptimizer's


def test_widths_are_chosen_recorded_and_kept_bit_exactly_by_a_resume(tmp_path, capsys):
    train.run(tiny(tmp_path / "whole", epochs=2, **MIXED))
    record = json.loads((tmp_path / "whole" / BIT_WIDTHS_NAME).read_text())
    assert "step 5: weight widths by sensitivity" in capsys.readouterr().out
    assert (record["step"], record["method"], record["candidates"]) == (5, "sensitivity", [2, 3, 4])
    bits, numel = record["bits"], record["numel"]
    assert len(set(bits.values())) > 1 and record["exact"]
    assert sum(numel[n] * b for n, b in bits.items()) <= 2.5 * sum(numel.values())
    state, whole = final(tmp_path / "whole")
    assert state["optimizer"]["tensor_bits"] == bits
    assert {n: s["bits"] for n, s in state["quantized"].items()} == bits
    for name, b in bits.items():  # each tensor holds at most its width's 2^b − 1 levels
        assert state["model"][name].unique().numel() <= 2**b - 1

    train.run(tiny(tmp_path / "split", **MIXED))
    other = {**MIXED, "weight_bits_budget": 3.0}
    with pytest.raises(
        config.ConfigError, match=r"weight_bits_budget: checkpoint 2\.5 vs now 3\.0"
    ):
        train.run(tiny(tmp_path / "split", epochs=2, resume=True, **other))
    train.run(tiny(tmp_path / "split", epochs=2, resume=True, **MIXED))
    state, split = final(tmp_path / "split")
    assert state["epoch"] == 2 and state["optimizer"]["tensor_bits"] == bits
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_dqmq_chooses_the_widths_when_asked(tmp_path):
    train.run(tiny(tmp_path, **MIXED, bit_allocation="dqmq", dqmq_steps=5))
    record = json.loads((tmp_path / BIT_WIDTHS_NAME).read_text())
    assert record["method"] == "dqmq"
    numel = record["numel"]
    assert sum(numel[n] * b for n, b in record["bits"].items()) <= 2.5 * sum(numel.values())
    assert final(tmp_path)[0]["optimizer"]["tensor_bits"] == record["bits"]


def test_an_allocation_past_the_run_is_refused(tmp_path):
    with pytest.raises(
        config.ConfigError, match=r"allocate_after=10000 is past the run's \d+ steps"
    ):
        train.run(tiny(tmp_path, **{**MIXED, "allocate_after": 10000}))


@pytest.mark.slow
def test_two_ranks_under_torchrun_take_rank_0s_widths(tmp_path):
    options = {**MIXED, "hidden": 16, "epochs": 1, "grad_bits": None, "out_dir": tmp_path}
    del options["keep_full_precision"]  # [] below: the flag with no names
    done = subprocess.run(
        [*torchrun(2, **QUIET, **options), "--keep-full-precision"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("step 5: weight widths by sensitivity") == 1  # rank 0 says it
    record = json.loads((tmp_path / BIT_WIDTHS_NAME).read_text())
    state, _ = final(tmp_path)
    assert state["world_size"] == 2 and state["optimizer"]["tensor_bits"] == record["bits"]
    assert {n: s["bits"] for n, s in state["quantized"].items()} == record["bits"]
