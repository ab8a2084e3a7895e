"""The config schema: defaults, YAML, CLI overrides, and errors that name the bad key or value."""

import argparse
import dataclasses
import subprocess
import sys
import typing

import pytest
import torch

from distq.launch import config


def parse(argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_args(parser.parse_args(argv))


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("scheme: linear\nbits: 3\nepochs: 4\nkeep_full_precision: [first]\n")
    cfg = parse([str(path), "--epochs", "2", "--no-progress"])
    assert (cfg.scheme, cfg.bits, cfg.epochs, cfg.progress) == ("linear", 3, 2, False)
    assert cfg.keep_full_precision == ["first"]
    assert cfg.lr == config.TrainConfig().lr


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("shceme: ternary\n")
    with pytest.raises(config.ConfigError, match=r"unknown key 'shceme'.*did you mean 'scheme'"):
        parse([str(path)])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"scheme": "fourary"}, "scheme='fourary' is not allowed; allowed: none, binary"),
        ({"scheme": "linear"}, "needs bits: 2..8"),
        ({"scheme": "ternary", "bits": 4}, "bits=4 is not allowed for scheme 'ternary'"),
        ({"epochs": 0}, "epochs=0 is below the minimum 1"),
        ({"lr": "fast"}, "lr='fast': expected float"),
        ({"epochs": 2.5}, "expected int"),
        ({"progress": "yes"}, "expected bool"),
        ({"optimizer": "lamb"}, "allowed: adam, adamw, sgd"),
        ({"keep_full_precision": "first"}, "expected a list of strings"),
        ({"test_fraction": 0.95}, "above the maximum"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(values, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_mapping(values)


def test_bad_flag_value_exits_with_a_message(capsys):
    from distq.launch import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--scheme", "quaternary"])
    assert exit_info.value.code == 2
    assert "scheme='quaternary' is not allowed" in capsys.readouterr().err


def test_missing_config_file_is_named():
    with pytest.raises(config.ConfigError, match="does not exist"):
        parse(["/nonexistent/run.yaml"])


def test_flags_parse_none_only_where_null_is_allowed():
    cfg = parse(["--scheme", "none", "--clip-latent", "none"])
    assert cfg.scheme == "none" and cfg.clip_latent is None


def mismatched_worker(rank, world, out):
    from distq.launch import train
    from distq.launch.environment import DistEnv

    cfg = config.TrainConfig(grad_bits=2 if rank == 0 else 4, out_dir=str(out / f"r{rank}"),
                             progress=False, metrics_port=None, epochs=1)
    try:
        train.run(cfg, DistEnv(rank, rank, world))
        message = "trained"
    except config.ConfigError as exc:
        message = str(exc)
    (out / f"rank{rank}.txt").write_text(message)
    assert not (out / f"r{rank}" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_ranks_with_different_settings_stop_before_training(tmp_path):
    from tests.distributed import run_workers

    run_workers(mismatched_worker, 2, tmp_path)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message == (
            "ranks disagree on the configuration: rank 1 has grad_bits=4 but rank 0 has "
            "grad_bits=2"
        )


FLOAT_FIELDS = [f.name for f in dataclasses.fields(config.TrainConfig)
                if typing.get_type_hints(config.TrainConfig)[f.name] in (float, float | None)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_every_float_option_refuses_nan_and_inf(name, value):
    assert {"lr", "clip", "sparsity", "test_fraction", "clip_latent"} <= set(FLOAT_FIELDS)
    with pytest.raises(config.ConfigError, match=rf"^{name}=.* not allowed; allowed: a finite"):
        parse([f"--{name.replace('_', '-')}={value}"])


@pytest.mark.slow
def test_a_diverging_run_exits_non_zero_with_one_line_and_saves_no_nan(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "distq.launch.train", "--lr", "1e30", "--epochs", "1",
         "--hidden", "16", "--depth", "2", "--no-progress", "--no-monitor", "--metrics-port",
         "none", "--checkpoint-every", "5", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "distq train: error: training diverged: " in done.stderr
    assert "Traceback" not in done.stderr and "done:" not in done.stdout
    assert not (tmp_path / "summary.json").exists()
    for path in (tmp_path / "checkpoints").glob("step-*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(t.isfinite().all() for t in state["model"].values()), path
