"""`distq train` recomputes batch-norm statistics with each epoch's final weights
(run.bn_recalibration): the checkpoint holds the recomputed statistics, the reported accuracy is
the one they give, and training itself is unchanged."""

from __future__ import annotations

import pytest
import torch

from distq.batchnorm import batch_norms, recalibrate
from distq.launch import config, recipes, train
from tests.launch.commands import QUIET

RUN = {"recipe": "digits", "hidden": 64, "epochs": 2, "batch_size": 32, "seed": 3, **QUIET}


def _trained(tmp_path, examples: int) -> tuple[train.TrainResult, dict]:
    out = tmp_path / f"r{examples}"
    result = train.run(config.TrainConfig(**RUN, out_dir=str(out), bn_recalibration=examples))
    return result, torch.load(out / "checkpoint.pt", weights_only=True)


def _recomputed(state: dict, examples: int) -> tuple[torch.nn.Module, recipes.Split]:
    """The checkpoint's model with its statistics recomputed over `examples` training examples
    drawn from the seed, in full batches: the rule distq train states."""
    data = recipes.load("digits", 0.2, RUN["seed"])
    model = recipes.build_model("digits", RUN["hidden"], 3, classes=data.classes)
    model.load_state_dict(state["model"])
    order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(RUN["seed"]))
    recalibrate(model, [data.train_x[i] for i in order[:examples].split(RUN["batch_size"])])
    return model, data


def _statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for n in batch_norms(model) for t in (n.running_mean, n.running_var)]


def test_checkpoint_holds_recomputed_statistics_and_training_is_unchanged(tmp_path):
    on, on_state = _trained(tmp_path, 256)
    off, off_state = _trained(tmp_path, 0)
    assert on.final_loss == off.final_loss
    weights = [k for k in on_state["model"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(on_state["model"][k], off_state["model"][k]) for k in weights)

    model, data = _recomputed(on_state, 256)
    stored = recipes.build_model("digits", RUN["hidden"], 3, classes=data.classes)
    stored.load_state_dict(on_state["model"])
    for mine, theirs in zip(_statistics(stored), _statistics(model), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert on.test_accuracy == recipes.accuracy(stored, data.test_x, data.test_y)

    running_averages = recipes.build_model("digits", RUN["hidden"], 3, classes=data.classes)
    running_averages.load_state_dict(off_state["model"])
    pairs = zip(_statistics(running_averages), _statistics(model), strict=True)
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in pairs), (
        "with bn_recalibration=0 the running averages are kept"
    )


def test_one_example_is_refused_by_name():
    with pytest.raises(config.ConfigError, match="bn_recalibration=1"):
        config.TrainConfig(bn_recalibration=1, **QUIET)
