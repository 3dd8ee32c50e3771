"""Composite rewards: weighted, normalised sums of components, each component's scores exposed.

Components are the user rewards of tests/example_rewards.py and tests/reward_fns.py, whose values
are known exactly: Brightness(scale) = scale * mean pixel, prompt_length = len(prompt).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from diffloop.config import RewardConfig, load_config
from diffloop.rewards import RewardError, build_reward, score
from diffloop.rewards.composite import (
    CompositeReward,
    build_reward_from_config,
    unique_names,
    weighted_total,
)

BRIGHT = "example_rewards:Brightness"
LENGTH = "example_rewards:prompt_length"


def _batch() -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Two images with mean pixel 0.5 and 0.25, prompts of length 2 and 5."""
    images = torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 0.25)])
    return images, ["ab", "abcde"], [{"sample_index": 0}, {"sample_index": 1}]


def test_weighted_normalised_sum_hand_computed() -> None:
    reward = CompositeReward(
        [
            {"name": BRIGHT, "weight": 2.0, "kwargs": {"scale": 4.0}},  # raw 2.0, 1.0
            {"name": LENGTH, "weight": 0.5, "mean": 1.0, "std": 2.0},  # raw 2, 5
        ]
    )
    result = score(reward, *_batch())
    # 2 * 2.0 + 0.5 * (2 - 1) / 2 = 4.25 ;  2 * 1.0 + 0.5 * (5 - 1) / 2 = 3.0
    assert result.scores.tolist() == [4.25, 3.0]
    assert result.num_invalid == 0
    assert set(result.components) == {BRIGHT, LENGTH}
    assert result.components[BRIGHT].tolist() == [2.0, 1.0]  # raw, not weighted or normalised
    assert result.components[LENGTH].tolist() == [2.0, 5.0]
    assert result.components[LENGTH].dtype == torch.float32


def test_defaults_are_weight_one_and_no_normalisation() -> None:
    reward = CompositeReward([{"name": BRIGHT}, {"name": LENGTH}])
    assert reward(*_batch()).tolist() == [2.5, 5.25]  # 0.5 + 2, 0.25 + 5


def test_negative_weight_and_mean_shift() -> None:
    reward = CompositeReward([{"name": LENGTH, "weight": -1, "mean": 3, "std": 0.5}])
    assert reward(*_batch()).tolist() == [2.0, -4.0]  # -(2 - 3) / 0.5, -(5 - 3) / 0.5


def test_weighted_total_function_shapes_and_nan() -> None:
    scores = torch.tensor([[1.0, 2.0, math.nan], [10.0, 20.0, 30.0]], dtype=torch.float64)  # (C, N)
    total = weighted_total(
        scores,
        weights=torch.tensor([1.0, 0.1], dtype=torch.float64),
        means=torch.tensor([0.0, 10.0], dtype=torch.float64),
        stds=torch.tensor([1.0, 5.0], dtype=torch.float64),
    )
    assert total.shape == (3,)
    assert total[:2].tolist() == [1.0, 2.0 + 0.1 * 10.0 / 5.0]
    assert math.isnan(total[2])


def test_nan_in_one_component_makes_the_total_nan_and_invalid() -> None:
    reward = CompositeReward([{"name": BRIGHT}, {"name": "reward_fns:nan_on_odd", "weight": 0.0}])
    result = score(reward, *_batch())
    # weight 0 does not rescue the sample: 0 * NaN is NaN (documented)
    assert result.scores[0].item() == 0.5 and math.isnan(result.scores[1])
    assert result.num_invalid == 1 and result.valid.tolist() == [True, False]
    assert result.components[BRIGHT].tolist() == [0.5, 0.25]  # the valid component is still logged


def test_inf_component_becomes_nan() -> None:
    reward = CompositeReward([{"name": BRIGHT}])
    reward.rewards[0] = lambda images, prompts, metadata: [1.0, math.inf]
    result = score(reward, *_batch())
    assert result.scores[0].item() == 1.0 and math.isnan(result.scores[1])
    assert math.isnan(result.components[BRIGHT][1])


def test_duplicate_component_names_are_disambiguated() -> None:
    reward = CompositeReward(
        [
            {"name": BRIGHT, "kwargs": {"scale": 1.0}},
            {"name": BRIGHT, "kwargs": {"scale": 2.0}},
            {"name": BRIGHT, "kwargs": {"scale": 3.0}},
        ]
    )
    result = score(reward, *_batch())
    assert list(result.components) == [BRIGHT, f"{BRIGHT}_1", f"{BRIGHT}_2"]
    assert result.components[f"{BRIGHT}_2"].tolist() == [1.5, 0.75]
    assert result.scores.tolist() == [3.0, 1.5]
    assert unique_names(["a", "b", "a", "a_1"]) == ["a", "b", "a_2", "a_1"]


def test_last_components_are_per_thread() -> None:
    reward = CompositeReward([{"name": LENGTH}])
    images, prompts, metadata = _batch()
    assert reward.last_components is None
    reward(images, prompts, metadata)
    other: dict[str, Any] = {}

    def in_thread() -> None:
        other["before"] = reward.last_components
        reward(images[:1], ["xyz"], [{}])
        other["after"] = reward.last_components

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert other["before"] is None and other["after"][LENGTH].tolist() == [3.0]
    assert reward.last_components[LENGTH].tolist() == [2.0, 5.0]  # this thread's call is intact


def test_failing_component_is_named() -> None:
    reward = CompositeReward([{"name": BRIGHT}, {"name": "reward_fns:fails_at_epoch_1"}])
    images, prompts, _ = _batch()
    with pytest.raises(RewardError, match="fails_at_epoch_1.*reward server unreachable"):
        score(reward, images, prompts, [{"epoch": 1}, {"epoch": 1}])


def test_non_composite_rewards_have_no_components() -> None:
    assert score(build_reward(BRIGHT), *_batch()).components is None


@pytest.mark.parametrize(
    ("components", "message"),
    [
        ([], "non-empty list"),
        (None, "non-empty list"),
        ({"name": BRIGHT}, "non-empty list"),
        ([BRIGHT], "expected a mapping"),
        ([{"weight": 1.0}], "component 0: needs a 'name'"),
        ([{"name": BRIGHT, "wieght": 1.0}], "unknown key 'wieght'; valid keys are name, weight"),
        (
            [{"name": BRIGHT}, {"name": LENGTH, "weight": "high"}],
            r"component 1 \(.*\): weight='high'",
        ),
        ([{"name": BRIGHT, "weight": True}], "weight=True must be a finite number"),
        ([{"name": BRIGHT, "mean": math.nan}], "mean=nan must be a finite number"),
        ([{"name": BRIGHT, "std": 0}], r"std=0.0 must be > 0"),
        ([{"name": BRIGHT, "std": -1.0}], r"std=-1.0 must be > 0"),
        ([{"name": BRIGHT, "kwargs": [1]}], "kwargs must be a mapping"),
    ],
)
def test_invalid_components(components: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompositeReward(components)


def test_unknown_component_reward_is_reported() -> None:
    with pytest.raises(ValueError, match="Did you mean 'jpeg_compressibility'"):
        CompositeReward([{"name": "jpeg_compresibility"}])


def test_registry_builds_multi() -> None:
    reward = build_reward("multi", components=[{"name": LENGTH, "weight": 2}])
    assert isinstance(reward, CompositeReward) and reward.name == "multi"
    assert reward(*_batch()).tolist() == [4.0, 10.0]


def test_build_reward_from_config() -> None:
    single = build_reward_from_config(RewardConfig(name=BRIGHT, kwargs={"scale": 3.0}))
    assert single.scale == 3.0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="non-empty list"):
        build_reward_from_config(RewardConfig(name="multi"))
    with pytest.raises(ValueError, match="use reward.name=multi"):
        build_reward_from_config(RewardConfig(name=BRIGHT, components=[{"name": LENGTH}]))
    with pytest.raises(ValueError, match="not reward.kwargs"):
        build_reward_from_config(
            RewardConfig(name="multi", kwargs={"scale": 2}, components=[{"name": BRIGHT}])
        )


def test_yaml_list_form_from_overrides() -> None:
    config = load_config(
        None,
        [
            (
                f"reward=[{{name: '{BRIGHT}', weight: 0.5, kwargs: {{scale: 2}}}}, "
                f"{{name: '{LENGTH}', mean: 2, std: 3}}]"
            )
        ],
    )
    assert config.reward.name == "multi"
    assert config.reward.components == [
        {"name": BRIGHT, "weight": 0.5, "kwargs": {"scale": 2}},
        {"name": LENGTH, "mean": 2, "std": 3},
    ]
    reward = build_reward_from_config(config.reward)
    # 0.5 * 2 * 0.5 + (2 - 2) / 3 = 0.5 ;  0.5 * 2 * 0.25 + (5 - 2) / 3 = 1.25
    assert reward(*_batch()).tolist() == [0.5, 1.25]


def test_yaml_list_form_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"reward:\n  - name: {BRIGHT}\n    weight: 1.0\n  - name: {LENGTH}\n    weight: 0.5\n"
    )
    config = load_config(path)
    assert config.reward.name == "multi" and len(config.reward.components) == 2
    assert build_reward_from_config(config.reward)(*_batch()).tolist() == [1.5, 2.75]


def test_trainer_logs_each_component_mean(tiny_sd: Path, tmp_path: Path) -> None:
    from diffloop.testing.runs import run

    rows = run(
        tiny_sd,
        tmp_path / "run",
        num_epochs=1,
        reward=f"[{{name: '{BRIGHT}', weight: 1.0}}, {{name: '{LENGTH}', weight: 0.5}}]",
    )
    row = rows[0]
    bright, length = row[f"reward_{BRIGHT}_mean"], row[f"reward_{LENGTH}_mean"]
    assert 0.0 < bright < 1.0
    # prompts of tiny_overrides: 2 prompts x 2 samples drawn from "a cat", "a dog on a bench", "a
    # red ball"
    assert length in {5.0, 16.0, 10.0, 10.5, 7.5, 13.0}
    # the logged reward is the weighted total of the logged component means (means are linear)
    assert row["reward_mean"] == pytest.approx(bright + 0.5 * length, rel=1e-6)
