"""`--estimator` in `distq train`: its config errors, "ste" trains exactly as before, a checkpoint
records it, a resume continues bit-exactly and refuses another estimator."""

import argparse

import pytest
import torch

from distq.launch import config, train
from distq.launch.checkpoint import CheckpointStore
from tests.launch.test_distill import final, tiny


def test_bad_values_name_the_key_and_what_is_allowed():
    refused = {
        "estimator='metaquant'.*allowed: ste, meta": {"estimator": "metaquant"},
        "estimator='meta' needs a quantization scheme; scheme is 'none'": {
            "estimator": "meta",
            "scheme": "none",
        },
    }
    for message, values in refused.items():
        with pytest.raises(config.ConfigError, match=message):
            config.from_mapping(values)


def test_the_flag_and_yaml_set_it_in_the_weights_section(tmp_path):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    assert config.from_args(parser.parse_args(["--estimator", "meta"])).weights.estimator == "meta"
    path = tmp_path / "run.yaml"
    path.write_text("weights: {estimator: meta}\n")
    assert config.from_args(parser.parse_args([str(path)])).weights.estimator == "meta"
    assert config.Weights().estimator == "ste"
    with pytest.raises(SystemExit):
        parser.parse_args(["--estimator"])


def test_ste_trains_exactly_as_without_the_option_and_a_checkpoint_records_it(tmp_path):
    train.run(tiny(tmp_path / "without", scheme="binary", sparsity=0.0))
    train.run(tiny(tmp_path / "ste", scheme="binary", sparsity=0.0, estimator="ste"))
    train.run(tiny(tmp_path / "meta", scheme="binary", sparsity=0.0, estimator="meta"))
    (_, without), (_, ste), (state, meta) = (
        final(tmp_path / d) for d in ("without", "ste", "meta")
    )
    assert without.keys() == ste.keys() == meta.keys()
    assert all(torch.equal(without[k], ste[k]) for k in without)
    assert not all(torch.equal(without[k], meta[k]) for k in without)  # the option is wired
    assert state["config"]["weights"]["estimator"] == "meta"
    assert state["optimizer"]["quantization"]["estimator"] == "meta"
    assert set(state["optimizer"]["meta"]) == {"net", "optimizer", "previous"}


def test_resume_continues_bit_exactly_and_refuses_another_estimator(tmp_path):
    settings = {"scheme": "binary", "sparsity": 0.0, "optimizer": "sgd", "estimator": "meta"}
    train.run(tiny(tmp_path / "whole", epochs=2, **settings))
    train.run(tiny(tmp_path / "split", **settings))
    with pytest.raises(config.ConfigError, match=r"estimator: checkpoint 'meta' vs now 'ste'"):
        train.run(
            tiny(tmp_path / "split", epochs=2, resume=True, **{**settings, "estimator": "ste"})
        )
    train.run(tiny(tmp_path / "split", epochs=2, resume=True, **settings))
    (_, whole), (state, split) = final(tmp_path / "whole"), final(tmp_path / "split")
    assert state["epoch"] == 2
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    meta = [CheckpointStore(tmp_path / d, keep=3).load_newest()[0]["optimizer"]["meta"]
            for d in ("whole", "split")]  # fmt: skip
    assert all(torch.equal(meta[0]["net"][k], meta[1]["net"][k]) for k in meta[0]["net"])


def test_a_checkpoint_from_before_the_option_resumes_with_the_ste(tmp_path):
    train.run(tiny(tmp_path))
    store = CheckpointStore(tmp_path, keep=3)
    older = store.load_newest()[0]
    for record in (older["config"]["weights"], older["optimizer"]["quantization"]):
        del record["estimator"]  # as checkpoints were written before the option
    store.save(older, older["step"])
    with pytest.raises(config.ConfigError, match=r"estimator: checkpoint 'ste' vs now 'meta'"):
        train.run(tiny(tmp_path, epochs=2, resume=True, estimator="meta"))
    train.run(tiny(tmp_path, epochs=2, resume=True))
    assert store.load_newest()[0]["epoch"] == 2
