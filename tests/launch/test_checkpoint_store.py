"""The checkpoint store keeps the newest K, links the latest, survives a bad newest file; RNG
states round-trip; a resume with other settings is refused naming the field; a checkpoint that
records its config by flat keys (as distq did before the config had sections) still resumes."""

import random

import numpy as np
import pytest
import torch

from distq.launch import checkpoint, config, rng, train
from distq.launch.checkpoint import CheckpointStore


def test_store_keeps_the_newest_k_and_links_the_latest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (5, 10, 15):
        store.save({"step": step}, step)
    assert [p.name for p in store.paths()] == ["step-00000010.pt", "step-00000015.pt"]
    assert store.latest.is_symlink()
    assert torch.load(store.latest, weights_only=True) == {"step": 15}
    assert store.load_newest()[0] == {"step": 15}


def test_steps_sort_numerically_past_the_padding(tmp_path):
    store = CheckpointStore(tmp_path, keep=5)
    for step in (99_999_999, 100_000_000, 7):
        store.save({"step": step}, step)
    assert store.load_newest()[0]["step"] == 100_000_000


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep=3)
    store.save({"step": 1}, 1)
    newest = store.save({"step": 2}, 2)
    newest.write_bytes(newest.read_bytes()[:40])  # cut short, as by a full disk
    state, path = store.load_newest()
    assert state == {"step": 1} and path.name == "step-00000001.pt"
    assert "does not load" in caplog.text


def test_a_torn_temporary_file_is_removed_by_the_next_save(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.directory.mkdir(parents=True)
    torn = store.directory / ".step-00000003.pt.abc.tmp"
    torn.write_bytes(b"half")
    store.save({"step": 4}, 4)
    assert not torn.exists() and store.load_newest()[0] == {"step": 4}


def test_no_checkpoint_means_none(tmp_path):
    assert CheckpointStore(tmp_path, keep=1).load_newest() is None
    with pytest.raises(ValueError, match="keep=0"):
        CheckpointStore(tmp_path, keep=0)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng.capture(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def tiny(out, **changes):
    values = {
        "epochs": 1,
        "hidden": 16,
        "depth": 1,
        "out_dir": str(out),
        "progress": False,
        "monitor": False,
        "metrics_port": None,
        "resume": True,
        **changes,
    }
    return config.TrainConfig(**values)


def test_resume_with_other_settings_is_refused_naming_the_field(tmp_path):
    train.run(tiny(tmp_path))
    weights = CheckpointStore(tmp_path, keep=3).load_newest()[0]["model"]
    with pytest.raises(config.ConfigError, match="scheme: checkpoint 'ternary' vs now 'binary'"):
        train.run(tiny(tmp_path, scheme="binary", epochs=2))
    state, _ = CheckpointStore(tmp_path, keep=3).load_newest()
    assert all(torch.equal(state["model"][k], weights[k]) for k in weights)  # nothing trained


def flip_tensor_bytes(path, tensor, count=40):
    """Flip `count` bytes inside `tensor`'s data as stored in the checkpoint file at `path`."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0
    for i in range(at + 100, at + 100 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_tensor_bytes_are_found_and_the_file_is_moved_aside_never_pruned(tmp_path, caplog):
    weights = torch.linspace(-0.25, 0.25, 4096)
    store = CheckpointStore(tmp_path, keep=2)
    store.save({"step": 1, "w": weights}, 1)
    newest = store.save({"step": 2, "w": weights}, 2)
    flip_tensor_bytes(newest, weights)
    with pytest.raises(checkpoint.CheckpointError, match=r"step-00000002\.pt' is corrupt"):
        checkpoint.load(store.latest)  # what `distq export` opens
    state, _ = store.load_newest()
    assert state["step"] == 1 and torch.equal(state["w"], weights)
    assert "step-00000002.pt does not load" in caplog.text
    assert store.corrupt() == [store.directory / "corrupt" / "step-00000002.pt"]
    for step in (3, 4, 5):  # later saves prune good checkpoints only
        store.save({"step": step}, step)
    assert store.corrupt() == [store.directory / "corrupt" / "step-00000002.pt"]


def test_resume_over_only_corrupt_checkpoints_stops_instead_of_starting_over(tmp_path):
    train.run(tiny(tmp_path, resume=False, checkpoint_every=None))
    store = CheckpointStore(tmp_path, keep=3)
    [only] = store.paths()
    weight = torch.load(only, weights_only=True)["model"]["0.weight"]
    flip_tensor_bytes(only, weight)
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* loads"):
        train.run(tiny(tmp_path))
    assert store.corrupt() and not store.paths()
    assert not (tmp_path / "summary.json").read_text().count('"steps": 0')


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_applies_a_new_lr_and_more_epochs_and_records_what_ran(tmp_path, schedule):
    train.run(tiny(tmp_path, resume=False, depth=2, lr_schedule=schedule))
    first = CheckpointStore(tmp_path, keep=3).load_newest()[0]
    train.run(tiny(tmp_path, depth=2, lr_schedule=schedule, epochs=3, lr=0.5))
    state = CheckpointStore(tmp_path, keep=3).load_newest()[0]
    assert state["epoch"] == 3 and state["step"] == 3 * first["step"]
    assert state["config"]["run"]["lr"] == 0.5 and state["schedule"]["base_lrs"] == [0.5]
    lrs = [g["lr"] for g in state["optimizer"]["base"]["param_groups"]]
    assert lrs == ([0.5] if schedule == "constant" else [0.0])  # cosine over 3 epochs ends at 0


def test_a_checkpoint_recording_its_config_flat_resumes_like_one_recording_sections(tmp_path):
    settings = {"sparsity": 0.3, "sparsity_schedule": "cubic", "depth": 2}
    finals = {}
    for form in ("sections", "flat"):
        out = tmp_path / form
        train.run(tiny(out, resume=False, **settings))
        store = CheckpointStore(out, keep=3)
        if form == "flat":
            state, path = store.load_newest()
            state["config"] = config.TrainConfig(**state["config"]).flat()
            checkpoint.save_atomic(state, path)
            with pytest.raises(config.ConfigError, match=r"sparsity: checkpoint 0\.3 vs now 0\.4"):
                train.run(tiny(out, **{**settings, "sparsity": 0.4}, epochs=2))
        train.run(tiny(out, **settings, epochs=2, lr=0.005))
        finals[form] = store.load_newest()[0]
    assert finals["flat"]["step"] == finals["sections"]["step"]
    for name, tensor in finals["sections"]["model"].items():
        assert torch.equal(finals["flat"]["model"][name], tensor), name
