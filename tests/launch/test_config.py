"""The config schema: defaults, YAML, CLI overrides, and errors that name the bad key or value."""

import argparse
import re
import subprocess
import typing
from pathlib import Path

import pytest
import torch

from distq.launch import config
from tests.launch.commands import QUIET, distq_train


def parse(argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_args(parser.parse_args(argv))


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("scheme: linear\nbits: 3\nepochs: 4\nkeep_full_precision: [first]\n")
    cfg = parse([str(path), "--epochs", "2", "--no-progress"])
    assert (cfg.weights.scheme, cfg.weights.bits, cfg.run.epochs) == ("linear", 3, 2)
    assert cfg.run.progress is False and cfg.weights.keep_full_precision == ["first"]
    assert cfg.run.lr == config.Run().lr


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
        ({"scheme": "shared", "bits": 5}, "bits=5 is not allowed for scheme 'shared'; allowed: 2"),
        ({"scheme": "shared", "bits": 3, "sparsity": 0.5}, "'shared' fits a codebook"),
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


def test_shared_takes_its_bits_from_the_record():
    cfg = parse(["--scheme", "shared", "--bits", "3"])
    assert (cfg.weights.scheme, cfg.weights.bits) == ("shared", 3)


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
    assert cfg.weights.scheme == "none" and cfg.weights.clip_latent is None


def mismatched_worker(rank, world, out):
    from distq.launch import train
    from distq.launch.environment import DistEnv

    cfg = config.TrainConfig(
        grad_bits=2 if rank == 0 else 4,
        out_dir=str(out / f"r{rank}"),
        progress=False,
        metrics_port=None,
        epochs=1,
    )
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
            "ranks disagree on the configuration: rank 1 has grad_bits=4 but rank 0 has grad_bits=2"
        )


FLOAT_FIELDS = [
    name
    for name, (section, field) in config.FLAT.items()
    if typing.get_type_hints(config.SECTIONS[section])[field] in (float, float | None)
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_every_float_option_refuses_nan_and_inf(name, value):
    assert {"lr", "clip", "sparsity", "test_fraction", "clip_latent"} <= set(FLOAT_FIELDS)
    with pytest.raises(config.ConfigError, match=rf"^{name}=.* not allowed; allowed: a finite"):
        parse([f"--{name.replace('_', '-')}={value}"])


@pytest.mark.slow
def test_a_diverging_run_exits_non_zero_with_one_line_and_saves_no_nan(tmp_path):
    done = subprocess.run(
        distq_train(
            lr=1e30, epochs=1, hidden=16, depth=2, **QUIET, checkpoint_every=5, out_dir=tmp_path
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "distq train: error: training diverged: " in done.stderr
    assert "Traceback" not in done.stderr and "done:" not in done.stdout
    assert not (tmp_path / "summary.json").exists()
    for path in (tmp_path / "checkpoints").glob("step-*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(t.isfinite().all() for t in state["model"].values()), path


def test_yaml_takes_exponent_floats_and_refuses_a_key_given_twice(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-4\n")
    cfg = parse([str(path)])
    assert (cfg.run.lr, cfg.run.weight_decay) == (1e-3, 5e-4)
    path.write_text("lr: 0.1\nepochs: 2\nlr: 0.01\n")
    with pytest.raises(config.ConfigError, match=r"key 'lr' is given twice \(line 3\)"):
        parse([str(path)])


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--clip=0", "clip=0.0 is not allowed; allowed: above 0"),
        ("--clip-latent=0", "clip_latent=0.0 is not allowed; allowed: above 0"),
        ("--metrics-port=70000", "metrics_port=70000 is above the maximum 65535"),
    ],
)
def test_bounds_are_the_ones_the_code_needs(flag, message):
    with pytest.raises(config.ConfigError, match=f"^{re.escape(message)}$"):
        parse([flag])


def test_a_layer_name_that_matches_nothing_is_a_config_error(tmp_path):
    from distq.launch import train

    cfg = config.TrainConfig(
        epochs=1,
        hidden=16,
        depth=2,
        out_dir=str(tmp_path),
        **QUIET,
        keep_full_precision=["nosuchlayer"],
    )
    with pytest.raises(config.ConfigError, match="nosuchlayer"):
        train.run(cfg)


@pytest.mark.slow
def test_an_out_dir_that_cannot_be_a_directory_stops_before_training():
    done = subprocess.run(
        distq_train(epochs=1, progress=False, metrics_port=None, out_dir="/dev/null"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "distq train: error: out_dir '/dev/null' cannot hold a run: File exists (allowed: a "
        "writable directory, or a path where one can be made)"
    ]
    assert "epoch" not in done.stdout


def exporter_and_resume_worker(rank, world, out):
    from distq.launch import train
    from distq.launch.environment import DistEnv

    def cfg(**changes):
        settings = {"epochs": 1, "hidden": 16, "depth": 2, "monitor_every": 5, **changes}
        return config.TrainConfig(
            **{"out_dir": str(out), "progress": False, "metrics_port": 65535, **settings}
        )

    result = train.run(cfg(), DistEnv(rank, rank, world))  # rank 1's port would be 65536
    assert result.steps == 22
    try:
        train.run(cfg(resume=True, grad_bits=4, metrics_port=None), DistEnv(rank, rank, world))
        message = "resumed"
    except config.ConfigError as exc:
        message = str(exc)
    (out / f"rank{rank}.txt").write_text(message)


@pytest.mark.slow
def test_an_impossible_metrics_port_keeps_training_and_another_grad_bits_is_one_error(tmp_path):
    from tests.distributed import run_workers

    run_workers(exporter_and_resume_worker, 2, tmp_path)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("cannot resume from "), message
        assert "bits" in message


def test_yaml_sections_and_flat_keys_set_the_same_fields_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "gradients: {bits: 4, collective: allgather}\nsparsity: {final: 0.5}\n"
        "monitor: false\nlr: 0.05\n"
    )
    cfg = parse([str(path), "--grad-bits", "3"])
    assert (cfg.gradients.bits, cfg.gradients.collective) == (3, "allgather")
    assert (cfg.sparsity.final, cfg.monitor.enabled, cfg.run.lr) == (0.5, False, 0.05)
    assert cfg == config.TrainConfig(
        grad_bits=3, collective="allgather", sparsity=0.5, monitor=False, lr=0.05
    )
    assert cfg == config.from_mapping(cfg.to_dict()) == config.from_mapping(cfg.flat())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "gradients: {bitz: 4}\n",
            "unknown key 'bitz' in section 'gradients' of {path}; did you mean "
            "'bits'? allowed: bits, collective",
        ),
        (
            "grad_bits: 4\ngradients: {bits: 3}\n",
            "grad_bits and gradients.bits in {path} set one option; give one",
        ),
        ("weights: ternary\n", "weights in {path} must be a mapping of scheme, bits"),
        (
            "sparsity: {begin: 0.5, end: 0.4, schedule: cubic}\n",
            "sparsity_begin=0.5 must be below sparsity_end=0.4 for the cubic schedule",
        ),
        ("gradients: {bits: 9}\n", "grad_bits=9 is above the maximum 8"),
    ],
)
def test_section_errors_name_the_key_and_what_is_allowed(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=re.escape(message.format(path=path))):
        parse([str(path)])


def test_sections_feed_their_constructors_keyword_arguments():
    import inspect

    from distq.comm import ExchangeSettings
    from distq.optim import QuantizedOptimizer

    cfg = config.TrainConfig(sparsity=0.5, sparsity_schedule="cubic")
    optimizer = inspect.signature(QuantizedOptimizer).parameters
    # the exchange options every engine takes (QuantizedCommState(**exchange) among them)
    assert set(cfg.gradients.as_kwargs()) <= set(ExchangeSettings.__dataclass_fields__)
    assert set(cfg.weights.as_kwargs()) | set(cfg.sparsity.optimizer_kwargs(100)) <= set(optimizer)
    schedule = cfg.sparsity.optimizer_kwargs(100)["sparsity"]
    assert (schedule.final, schedule.kind, schedule.begin, schedule.end) == (0.5, "cubic", 0, 75)


def test_a_config_recorded_flat_reads_as_the_same_settings():
    """Checkpoints written before the config had sections record it by flat keys."""
    cfg = config.TrainConfig(grad_bits=4, sparsity=0.3, monitor=False)
    flat = cfg.flat()
    assert flat["grad_bits"] == 4 and flat["sparsity"] == 0.3 and flat["monitor"] is False
    assert config.flatten(flat) == flat == config.flatten(cfg.to_dict())


def test_the_readme_yaml_example_is_a_valid_config(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = readme.split("```yaml\n# my_run.yaml", 1)[1].split("\n", 1)[1].split("```")[0]
    path = tmp_path / "my_run.yaml"
    path.write_text(example)
    cfg = parse([str(path)])
    assert cfg == config.TrainConfig(), "the example shows the defaults"


def test_grad_bits_auto_from_yaml_and_flag_and_its_errors(tmp_path):
    """`grad_bits: auto` (YAML, flat or in the gradients section) and `--grad-bits auto` reach
    the exchange; another word, or auto with the hierarchical collective, is named."""
    path = tmp_path / "run.yaml"
    path.write_text("gradients: {bits: auto, compressor: rotated, auto_budget: 0.2}\n")
    cfg = parse([str(path)])
    assert (cfg.gradients.bits, cfg.gradients.auto_budget) == ("auto", 0.2)
    assert parse(["--grad-bits", "auto"]).gradients.bits == "auto"
    assert parse(["--grad-bits", "4"]).gradients.bits == 4
    with pytest.raises(config.ConfigError, match="grad_bits='fast': expected int or auto"):
        config.from_mapping({"grad_bits": "fast"})
    with pytest.raises(config.ConfigError, match="grad_bits auto works on a flat group"):
        config.from_mapping({"grad_bits": "auto", "collective": "hierarchical"})
    with pytest.raises(config.ConfigError, match="grad_auto_budget=0 is not allowed"):
        config.from_mapping({"grad_bits": "auto", "grad_auto_budget": 0})
