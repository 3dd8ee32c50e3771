"""Configs: every shipped YAML validates; every bad value fails before a model loads, naming the
field."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from importlib import resources
from pathlib import Path

import pytest

from diffloop.algorithms import ALGORITHMS
from diffloop.cli import main
from diffloop.config import (
    AlgorithmName,
    Config,
    ConfigError,
    TrainConfig,
    derived_arithmetic,
    load_config,
    validate,
)

CONFIG_DIR = Path(str(resources.files("diffloop") / "configs"))


SHIPPED_CONFIGS = {
    "flux1_dev_full_fsdp_8x80gb.yaml",
    "flux1_dev_lora_24gb.yaml",
    "flux2_compbench_color.yaml",
    "flux2_klein_base_compbench_color.yaml",
    "flux2_klein_pickscore.yaml",
    "flux2_lora_48gb.yaml",
    "flux2_pickscore.yaml",
    "flux_compbench_color.yaml",
    "flux_pickscore.yaml",
    "qwen_image_compbench_color.yaml",
    "qwen_image_lora_48gb.yaml",
    "qwen_image_pickscore.yaml",
    "sd15_compressibility.yaml",
    "sd15_low_memory.yaml",
    "sd15_ppo_ddpo.yaml",
    "sd2_incompressibility.yaml",
    "sd35_fast_cps.yaml",
    "sd35_geneval_blip_vqa.yaml",
    "sd35_medium_lora_24gb.yaml",
    "sd35_pickscore.yaml",
    "sdxl_compressibility.yaml",
    "sdxl_low_memory.yaml",
    "shapes.yaml",
    "shapes_long.yaml",
    "zimage_pickscore.yaml",
    "zimage_turbo_compbench_color.yaml",
}


def test_shipped_configs_exist():
    """Exactly these files ship: one that disappears or appears unannounced fails here."""
    shipped = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*") if p.is_file()}
    assert shipped == SHIPPED_CONFIGS


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
    (["train.timestep_window=[5,5]"], "0 <= start < stop"),
    (["train.timestep_window=[0,11]"], "sample.num_steps = 10"),
    (["train.timestep_window=[2]"], "train.timestep_window"),
    (["train.timestep_window=[0,4]", "sample.sde_window=[0,3]"], "sample.sde_window"),
    (["sample.batch_size=0"], "sample.batch_size"),
    (
        ["sample.prompts_per_epoch=2", "sample.samples_per_prompt=2", "train.batch_size=3"],
        "train.batch_size",
    ),
    (
        [
            "sample.prompts_per_epoch=2",
            "sample.samples_per_prompt=2",
            "sample.batch_size=4",
            "train.batch_size=1",
            "train.gradient_accumulation_steps=3",
        ],
        "train.gradient_accumulation_steps",
    ),
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
    (["sample.eta=1.5"], "sample.eta=1.5 must be in (0, 1]"),
    (["train.learning_rate=.inf"], "train.learning_rate=inf is not finite"),
    (["train.learning_rate=nan"], "train.learning_rate=nan is not finite"),
    (["seed=-1"], "seed=-1 must be in [0, "),
    (["eval.seed=-3"], "eval.seed=-3 must be in [0, "),
    (["train.stat_tracking_min_count=1"], "advantage (R - mean) / (std + eps) is exactly 0"),
    (["train.adv_clip_max=-1"], "train.adv_clip_max=-1.0 must be >= 0"),
    (["train.algorithm=lopo"], "Did you mean 'loop'?"),
    (["train.lr_scheduler=cosin"], "Did you mean 'cosine'?"),
    (["performance.compile=sampl"], "performance.compile='sampl' must be one of none, sampling"),
    (["performance.attention=flash"], "performance.attention"),
    (
        [
            "sample.prompts_per_epoch=1",
            "sample.samples_per_prompt=1",
            "sample.batch_size=1",
            "train.algorithm=reinforce",
            "train.batch_size=1",
        ],
        "every advantage is 0",
    ),
    (["train.=3"], "not a dotted key"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[1] for b in BAD])
def test_bad_config_error_names_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_batch_must_divide_over_processes():
    config = load_config(
        None,
        [
            "sample.prompts_per_epoch=3",
            "sample.samples_per_prompt=1",
            "sample.batch_size=1",
            "train.algorithm=ppo",
            "train.batch_size=1",
        ],
    )
    with pytest.raises(ConfigError, match="divide evenly over 2 processes"):
        validate(config, num_processes=2)


def test_check_config_cli_prints_arithmetic(capsys, tmp_path):
    args = ["sample.prompts_per_epoch=4", "sample.samples_per_prompt=4", "train.batch_size=16"]
    assert main(["check-config", *args]) == 0
    out = capsys.readouterr().out
    assert "samples per epoch:             16" in out and "gradient updates per epoch" in out
    assert "by the DDIM rules" not in out  # the shapes model: its numbers are exact
    # Another model is not loaded by check-config: the model-dependent lines say which rule they
    # use.
    assert main(["check-config", "flux_pickscore.yaml"]) == 0
    out = capsys.readouterr().out
    assert "UNet evaluations per sample:   12 (sampling)" in out and "by the DDIM rules" in out


def test_cli_bad_config_is_a_clean_error(capsys):
    assert main(["train", "sample.eta=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffloop: error: sample.eta=0")


def test_missing_config_file(capsys):
    assert main(["check-config", "/nonexistent/c.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_derived_arithmetic():
    config = load_config(
        None,
        [
            "sample.prompts_per_epoch=8",
            "sample.samples_per_prompt=4",
            "sample.batch_size=8",
            "train.batch_size=4",
            "train.gradient_accumulation_steps=2",
            "train.num_inner_epochs=2",
            "sample.num_steps=10",
            "train.timestep_fraction=0.5",
        ],
    )
    a = derived_arithmetic(config)
    # the shapes model trains its noisiest half by default: 0.5 of steps 0-4 -> 2 steps
    assert (a.samples_per_epoch, a.reward_queries_per_epoch, a.trained_timesteps_per_sample) == (
        32,
        32,
        2,
    )
    assert "2 (of steps 0-4: the shapes model's default)" in "\n".join(a.lines())
    config.train.timestep_window = [0, 10]  # every step, stated: DDPO's int(10 x 0.5)
    assert derived_arithmetic(config).trained_timesteps_per_sample == 5
    config.train.timestep_window = None
    config.model.pretrained = (
        "runwayml/stable-diffusion-v1-5"  # other models: every step by default
    )
    assert derived_arithmetic(config).trained_timesteps_per_sample == 5
    config.model.pretrained = "shapes"
    assert a.gradient_updates_per_epoch == 2 * (32 // 4) // 2
    config.train.algorithm = "reinforce_loo"
    config.train.num_inner_epochs = 1
    assert derived_arithmetic(config).gradient_updates_per_epoch == 1


def test_no_is_a_string_for_string_fields_and_a_boolean_for_boolean_fields(tmp_path):
    # YAML 1.1 would read `no` as False: mixed_precision's documented value must survive both
    # routes.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\nlogging:\n  wandb: off\n  tensorboard: yes\n")
    overrides = ["train.mixed_precision=no", "logging.wandb=off", "logging.tensorboard=yes"]
    for config in (load_config(path), load_config(None, overrides)):
        assert config.train.mixed_precision == "no"
        assert config.logging.wandb is False and config.logging.tensorboard is True


# ----- every numeric field has a finite range, checked from one place ----------------------------


def _leaf_fields(
    cls: type = Config, prefix: str = ""
) -> list[tuple[str, dataclasses.Field, object]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, tp))
    return out


def _is_numeric(tp: object) -> bool:
    args = (
        typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    )
    return any(a in (int, float) for a in args)


NUMERIC = [(key, f) for key, f, tp in _leaf_fields() if _is_numeric(tp)]


def test_every_numeric_field_declares_its_range():
    assert len(NUMERIC) >= 35
    missing = [key for key, f in NUMERIC if "range" not in f.metadata]
    assert not missing, f"numeric config fields without num(..., range): {missing}"


@pytest.mark.parametrize("key", [k for k, _ in NUMERIC])
@pytest.mark.parametrize("bad", [".inf", "-.inf", ".nan"])
def test_every_numeric_field_refuses_non_finite_values(key, bad):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_config(None, [f"{key}={bad}"])


@pytest.mark.parametrize("key,field_", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_numeric_field_refuses_values_past_its_bounds(key, field_):
    rng = field_.metadata["range"]
    assert rng.low is not None, f"{key}: every numeric field here has a lower bound"
    outside = [rng.low if rng.low_open else rng.low - 1]
    if rng.high is not None:
        outside.append(rng.high if rng.high_open else rng.high + 1)
    for value in outside:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=\S+ must be (in|>|<)"):
            load_config(None, [f"{key}={value}"])


def test_enumerations_are_literals_matching_the_tables():
    assert set(typing.get_args(AlgorithmName)) == set(ALGORITHMS)
    enumerated = {key for key, _, tp in _leaf_fields() if typing.get_origin(tp) is typing.Literal}
    assert {
        "train.algorithm",
        "train.mixed_precision",
        "train.logprob_reduction",
        "train.lr_scheduler",
        "performance.compile",
        "performance.compile_mode",
        "performance.attention",
    } <= enumerated
    for key in enumerated:
        with pytest.raises(
            ConfigError, match=rf"^{key}='nope' must be one of .*; 'nope' is unknown"
        ):
            load_config(None, [f"{key}=nope"])


def test_validate_checks_configs_built_in_code_too():
    config = Config()
    config.sample.eta = float("nan")
    with pytest.raises(ConfigError, match="sample.eta=nan is not finite"):
        validate(config)
    config = Config(train=TrainConfig(algorithm="dpo"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="train.algorithm='dpo'"):
        validate(config)


# ----- dict fields merge key by key ---------------------------------------------------------------


def test_dict_overrides_merge_with_the_file_and_each_other(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reward:\n  name: jpeg_compressibility\n  kwargs: {a: 0, c: 3}\n")
    config = load_config(f, ["reward.kwargs.a=1", "reward.kwargs.b=2"])
    assert config.reward.kwargs == {"a": 1, "b": 2, "c": 3}
    assert config.reward.name == "jpeg_compressibility"


def test_reward_list_shorthand_survives_other_reward_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reward:\n  - {name: jpeg_compressibility, weight: 1.0}\n")
    config = load_config(f, ["reward.asynchronous=true"])
    assert config.reward.name == "multi" and config.reward.asynchronous
    assert config.reward.components == [{"name": "jpeg_compressibility", "weight": 1.0}]


# ----- output_dir must be creatable before any model loads ----------------------------------------


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"output_dir=.*cannot be created: .*/f is a file"):
        load_config(None, [f"output_dir={tmp_path / 'f' / 'run'}"])


def test_output_dir_that_cannot_be_created_is_refused():
    with pytest.raises(
        ConfigError, match=r"output_dir=/proc/diffloop_run cannot be created: /proc is not writable"
    ):
        load_config(None, ["output_dir=/proc/diffloop_run"])


def test_writable_output_dir_check_leaves_nothing_behind(tmp_path):
    load_config(None, [f"output_dir={tmp_path / 'new' / 'run'}"])
    assert list(tmp_path.iterdir()) == []  # the probe is removed and nothing is created


def test_advantage_clip_default_is_null_meaning_the_algorithms():
    assert TrainConfig().adv_clip_max is None
    assert load_config(None, ["train.adv_clip_max=0"]).train.adv_clip_max == 0.0  # 0 = off
