"""Configs: every shipped YAML validates; every bad value fails before a model loads, naming the field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from diffloop.cli import main
from diffloop.config import ConfigError, derived_arithmetic, load_config, validate

CONFIG_DIR = Path(str(resources.files("diffloop") / "configs"))


def test_shipped_configs_exist():
    assert len(list(CONFIG_DIR.glob("**/*.yaml"))) >= 3


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    validate(config)
    assert derived_arithmetic(config).samples_per_epoch >= 1


def test_defaults_yaml_and_overrides_layer(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 0.001\nsample:\n  num_steps: 7\n")
    config = load_config(f, ["train.learning_rate=2e-4", "lora.target_modules=to_q,to_v"])
    assert config.train.learning_rate == 2e-4  # override beats file
    assert config.sample.num_steps == 7  # file beats default
    assert config.sample.eta == 1.0  # default
    assert config.lora.target_modules == ["to_q", "to_v"]


BAD = [
    (["train.algorithm=loop", "sample.samples_per_prompt=1"], "sample.samples_per_prompt"),
    (["train.algorithm=grpo", "sample.samples_per_prompt=1"], "at least 2"),
    (["sample.eta=0"], "sample.eta"),
    (["sample.eta=-1"], "deterministic"),
    (["train.timestep_fraction=0"], "train.timestep_fraction"),
    (["train.timestep_fraction=1.5"], "(0, 1]"),
    (["sample.batch_size=0"], "sample.batch_size"),
    (["sample.prompts_per_epoch=2", "sample.samples_per_prompt=2", "train.batch_size=3"], "train.batch_size"),
    (["sample.prompts_per_epoch=2", "sample.samples_per_prompt=2", "sample.batch_size=4",
      "train.batch_size=1", "train.gradient_accumulation_steps=3"], "train.gradient_accumulation_steps"),
    (["train.algorithm=reinforce", "train.num_inner_epochs=2"], "one gradient step"),
    (["train.algorithm=dpo"], "train.algorithm"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["train.logprob_reduction=max"], "train.logprob_reduction"),
    (["train.lerning_rate=1e-4"], "Did you mean 'learning_rate'"),
    (["sampel.num_steps=3"], "Did you mean 'sample'"),
    (["train.learning_rate=fast"], "train.learning_rate: expected a number"),
    (["sample.num_steps=2.5"], "sample.num_steps: expected an integer"),
    (["lora.rank=0"], "lora.rank"),
    (["prompts.source=file"], "prompts.path"),
    (["train.stat_tracking_min_count=64"], "train.stat_tracking_min_count"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[1] for b in BAD])
def test_bad_config_error_names_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_batch_must_divide_over_processes():
    config = load_config(None, ["sample.prompts_per_epoch=3", "sample.samples_per_prompt=1", "sample.batch_size=1",
                                "train.algorithm=ppo", "train.batch_size=1"])
    with pytest.raises(ConfigError, match="divide evenly over 2 processes"):
        validate(config, num_processes=2)


def test_check_config_cli_prints_arithmetic(capsys, tmp_path):
    assert main(["check-config", "sample.prompts_per_epoch=4", "sample.samples_per_prompt=4"]) == 0
    out = capsys.readouterr().out
    assert "samples per epoch:             16" in out and "gradient updates per epoch" in out


def test_cli_bad_config_is_a_clean_error(capsys):
    assert main(["train", "sample.eta=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffloop: error: sample.eta=0")


def test_missing_config_file(capsys):
    assert main(["check-config", "/nonexistent/c.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_derived_arithmetic():
    config = load_config(None, ["sample.prompts_per_epoch=8", "sample.samples_per_prompt=4", "sample.batch_size=8",
                                "train.batch_size=4", "train.gradient_accumulation_steps=2",
                                "train.num_inner_epochs=2", "sample.num_steps=10", "train.timestep_fraction=0.5"])
    a = derived_arithmetic(config)
    assert (a.samples_per_epoch, a.reward_queries_per_epoch, a.trained_timesteps_per_sample) == (32, 32, 5)
    assert a.gradient_updates_per_epoch == 2 * (32 // 4) // 2
    config.train.algorithm = "reinforce_loo"
    config.train.num_inner_epochs = 1
    assert derived_arithmetic(config).gradient_updates_per_epoch == 1


def test_no_is_a_string_for_string_fields_and_a_boolean_for_boolean_fields(tmp_path):
    # YAML 1.1 would read `no` as False: mixed_precision's documented value must survive both routes.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\nlogging:\n  wandb: off\n  tensorboard: yes\n")
    for config in (load_config(path), load_config(None, ["train.mixed_precision=no", "logging.wandb=off",
                                                          "logging.tensorboard=yes"])):  # fmt: skip
        assert config.train.mixed_precision == "no"
        assert config.logging.wandb is False and config.logging.tensorboard is True
