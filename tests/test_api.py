"""The Python API: Config() is `diffloop train`'s default, Trainer(reward=, prompts=),
register_reward, the lazy top-level exports, and docs/python_api.md's example, executed."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffloop
from diffloop.config import Config, ConfigError, load_config, packaged_config
from diffloop.resume import train_config
from diffloop.rewards import registry
from diffloop.rewards.registry import RewardSpecError, build_reward, register_reward
from diffloop.run_dir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python_api.md"


def test_config_defaults_are_what_diffloop_train_runs():
    assert train_config([]) == Config()  # `diffloop train` with no arguments
    assert load_config(packaged_config("shapes.yaml")) == Config()  # the file spelling them out
    default = Config()
    assert (
        default.model.pretrained,
        default.train.algorithm,
        default.sample.samples_per_prompt,
    ) == ("shapes", "loop", 8)


def test_top_level_exports_are_lazy():
    code = ("import sys, diffloop; assert 'torch' not in sys.modules; "
            "c = diffloop.Config(); assert 'torch' not in sys.modules; "
            "print(type(c).__name__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Config"
    from diffloop.trainer import Trainer

    assert diffloop.Trainer is Trainer and diffloop.register_reward is register_reward
    assert {"Config", "Trainer", "register_reward", "read_metrics", "load_config"} <= set(
        diffloop.__all__
    )


def constant(images, prompts, metadata):
    return [1.0] * len(prompts)


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "REWARDS", dict(registry.REWARDS))


def test_register_reward_takes_a_plain_scoring_function(clean_registry):
    assert register_reward("api_constant", constant) is constant
    assert build_reward("api_constant") is constant  # the function is the reward itself
    assert registry.reward_factory("api_constant", {}) == (constant, False)
    register_reward("api_constant", constant)  # the same function again: fine
    with pytest.raises(RewardSpecError, match="takes no kwargs"):
        build_reward("api_constant", scale=2)
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        register_reward("api_constant", lambda images, prompts, metadata: [0.0] * len(prompts))
    other = lambda images, prompts, metadata: [0.0] * len(prompts)
    register_reward("api_constant", other, replace=True)  # a notebook cell run again
    assert build_reward("api_constant") is other
    with pytest.raises(TypeError, match="decorate a class"):
        register_reward("api_class", dict)


def tiny(out: Path) -> Config:
    return load_config(None, [f"output_dir={out}", "num_epochs=1", "eval.prompts=null",
                              "sample.num_steps=2",
                              "sample.prompts_per_epoch=2", "sample.samples_per_prompt=2",
                              "train.batch_size=4",
                              "logging.progress_bars=false", "logging.report_to=none"])  # fmt: skip


def test_trainer_takes_a_reward_callable_and_prompt_rows(tmp_path, clean_registry):
    from diffloop.trainer import Trainer

    seen = []

    def likes_red(images, prompts, metadata):
        seen.extend(zip(prompts, metadata))
        return images[:, 0].mean(dim=(1, 2))

    config = tiny(tmp_path / "run")
    rows = [{"prompt": "a red circle", "colour": "red"}, "a blue square"]
    history = Trainer(config, reward=likes_red, prompts=iter(rows)).train()  # any iterable
    assert len(history) == 1 and history[0]["reward_queries"] == 4
    assert {p for p, _ in seen} <= {"a red circle", "a blue square"}
    for prompt, meta in seen:
        assert meta.get("colour") == ("red" if prompt == "a red circle" else None)
    recorded = load_config(tmp_path / "run" / "config.yaml")
    assert recorded.reward.name == "python:likes_red"
    assert (recorded.prompts.source, recorded.prompts.prompts) == (
        "list",
        ["a red circle", "a blue square"],
    )
    assert (
        config.reward.name == "shapes_binding_mean" and config.prompts.source == "shapes/train_pair"
    )  # caller's copy
    from diffloop.preflight import check_before_loading

    assert build_reward("python:likes_red") is likes_red  # registered for this process
    del registry.REWARDS["python:likes_red"]  # another session, e.g. a resume from the command line
    with pytest.raises(ConfigError, match="was a Python function given to Trainer"):
        check_before_loading(dataclasses.replace(config, reward=recorded.reward))
    with pytest.raises(TypeError, match="reward must be a callable"):
        Trainer(tiny(tmp_path / "other"), reward="shapes_binding")


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_the_python_api_doc_example_runs(tmp_path, monkeypatch, clean_registry):
    """Every python block of docs/python_api.md, in order, in one namespace; the run is made small
    (2 steps, 2 prompts x 2 samples) by laying those values over the config the Trainer gets."""
    from diffloop.trainer import Trainer

    original = Trainer.__init__

    def small(self, config, *args, **kwargs):
        config = dataclasses.replace(
            config,
            sample=dataclasses.replace(
                config.sample, num_steps=2, prompts_per_epoch=2, samples_per_prompt=2
            ),
            train=dataclasses.replace(config.train, batch_size=4),
            logging=dataclasses.replace(config.logging, report_to=["none"]),
        )
        original(self, config, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", small)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 (the doc is ours)
    rows = read_metrics(tmp_path / "runs" / "notebook_colour" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0] and torch.isfinite(
        torch.tensor(rows[0]["reward_mean"])
    )
    assert namespace["config"].reward.name == "colour_match"
    assert build_reward("colour_match") is namespace["colour_match"]
