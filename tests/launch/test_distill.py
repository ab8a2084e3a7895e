"""`--distill` in `distq train`: its config errors, λ = 0 trains exactly as before, a checkpoint
records it, a resume continues bit-exactly and refuses another λ or T, the monitor logs the
loss' two parts."""

import argparse
import json

import pytest
import torch

from distq.launch import config, train
from distq.launch.checkpoint import CheckpointStore


def tiny(out, **changes):
    values = {
        "epochs": 1,
        "hidden": 16,
        "depth": 2,
        "sparsity": 0.75,
        "lr_schedule": "constant",
        "checkpoint_every": None,
        "out_dir": str(out),
        "progress": False,
        "monitor": False,
        "metrics_port": None,
        **changes,
    }
    return config.TrainConfig(**values)


def final(out):
    state = CheckpointStore(out, keep=3).load_newest()[0]
    return state, {
        **state["model"],
        **{f"latent {k}": v for k, v in state["optimizer"]["latent"].items()},
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"distill": 1.5}, r"distill=1.5 is above the maximum 1"),
        ({"distill": -0.5}, r"distill=-0.5 is below the minimum 0"),
        ({"distill_temperature": 0}, r"distill_temperature=0 is not allowed; allowed: above 0"),
        ({"distill_temperature": float("nan")}, r"distill_temperature=nan is not allowed"),
        ({"distill": 0.5, "scheme": "none"}, r"distill=0.5 needs a quantization scheme"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(values, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_mapping(values)


def test_flags_and_yaml_set_it_in_the_run_section(tmp_path):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    cfg = config.from_args(parser.parse_args(["--distill", "0.5", "--distill-temperature", "3"]))
    assert (cfg.run.distill, cfg.run.distill_temperature) == (0.5, 3.0)
    path = tmp_path / "run.yaml"
    path.write_text("run: {distill: 0.25}\n")
    assert config.from_args(parser.parse_args([str(path)])).run.distill == 0.25
    assert config.Run().distill == 0.0 and config.Run().distill_temperature == 2.0


def test_weight_zero_trains_exactly_as_without_the_option_and_a_checkpoint_records_it(tmp_path):
    train.run(tiny(tmp_path / "without"))
    train.run(tiny(tmp_path / "zero", distill=0.0))
    train.run(tiny(tmp_path / "on", distill=0.5, distill_temperature=3.0))
    (_, without), (_, zero), (state, on) = (final(tmp_path / d) for d in ("without", "zero", "on"))
    assert without.keys() == zero.keys() == on.keys()
    assert all(torch.equal(without[k], zero[k]) for k in without)
    assert not all(torch.equal(without[k], on[k]) for k in without)  # the option is wired
    assert (state["config"]["run"]["distill"], state["config"]["run"]["distill_temperature"]) == (
        0.5,
        3.0,
    )


def test_resume_continues_bit_exactly_and_refuses_another_weight_or_temperature(tmp_path):
    train.run(tiny(tmp_path / "whole", distill=0.5, epochs=2))
    train.run(tiny(tmp_path / "split", distill=0.5))
    for changed, name in (
        ({"distill": 0.3}, "distill"),
        ({"distill_temperature": 4.0}, "distill_temperature"),
    ):
        settings = {"distill": 0.5, **changed}
        with pytest.raises(config.ConfigError, match=f"{name}: checkpoint .* vs now"):
            train.run(tiny(tmp_path / "split", epochs=2, resume=True, **settings))
    train.run(tiny(tmp_path / "split", distill=0.5, epochs=2, resume=True))
    (_, whole), (state, split) = final(tmp_path / "whole"), final(tmp_path / "split")
    assert state["epoch"] == 2
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_a_checkpoint_from_before_the_option_resumes_without_distillation(tmp_path):
    train.run(tiny(tmp_path))
    store = CheckpointStore(tmp_path, keep=3)
    state, _ = store.load_newest()
    del state["config"]["run"]["distill"], state["config"]["run"]["distill_temperature"]
    store.save(state, state["step"])
    with pytest.raises(config.ConfigError, match=r"distill: checkpoint 0.0 vs now 0.5"):
        train.run(tiny(tmp_path, epochs=2, resume=True, distill=0.5))
    train.run(tiny(tmp_path, epochs=2, resume=True))
    assert store.load_newest()[0]["epoch"] == 2


def test_the_monitor_logs_the_cross_entropy_and_kl_parts_every_step(tmp_path):
    """With --distill every record has loss_ce and loss_kl, and loss = (1 − λ)·CE + λ·T²·KL;
    without it neither key appears."""
    train.run(tiny(tmp_path / "on", distill=0.3, distill_temperature=2.0, monitor=True))
    train.run(tiny(tmp_path / "off", monitor=True))
    on = [json.loads(line) for line in (tmp_path / "on" / "monitor-rank0.jsonl").open()]
    off = [json.loads(line) for line in (tmp_path / "off" / "monitor-rank0.jsonl").open()]
    assert on and len(on) == len(off)
    for r in on:
        mixed = 0.7 * r["loss_ce"] + 0.3 * 4 * r["loss_kl"]
        assert r["loss"] == pytest.approx(mixed, rel=1e-5) and r["loss_kl"] >= 0
    assert not any("loss_ce" in r or "loss_kl" in r for r in off)
