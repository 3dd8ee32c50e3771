"""Rewards: image conversion, JPEG rewards, the registry, and score()'s invalid-value policy.

User rewards for the 'module:attr' form come from tests/example_rewards.py.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import numpy as np
import pytest
import torch

from diffloop.rewards import (
    REWARDS,
    RewardError,
    available_rewards,
    build_reward,
    register_reward,
    score,
    to_pil_images,
    to_uint8,
)
from diffloop.rewards.jpeg import JpegReward, jpeg_sizes_kb


def _batch(n: int = 4) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    return torch.full((n, 3, 8, 8), 0.5), [f"p{i}" for i in range(n)], [{} for _ in range(n)]


# --- images ---------------------------------------------------------------------------------


def test_to_uint8_rounds_clamps_and_moves_channels_last() -> None:
    values = torch.tensor([0.0, 0.49 / 255, 0.51 / 255, 100.4 / 255, 1.0, 1.5, -0.3])
    images = values.view(1, 1, 1, 7).expand(1, 3, 1, 7).clone()
    images[0, 1] = 1.0  # green channel saturated, to check the channel order
    u8 = to_uint8(images)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 1, 7, 3)
    assert u8[0, 0, :, 0].tolist() == [0, 0, 1, 100, 255, 255, 0]
    assert u8[0, 0, :, 1].tolist() == [255] * 7


def test_to_pil_images_size_mode_and_pixels() -> None:
    images = torch.zeros(2, 3, 4, 5)
    images[1, 2, 3, 4] = 1.0  # blue pixel at row 3, column 4 of the second image
    pil = to_pil_images(images)
    assert [im.size for im in pil] == [(5, 4), (5, 4)] and {im.mode for im in pil} == {"RGB"}
    assert pil[1].getpixel((4, 3)) == (0, 0, 255) and pil[0].getpixel((4, 3)) == (0, 0, 0)


def test_to_uint8_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        to_uint8(torch.zeros(3, 8, 8))


# --- JPEG -----------------------------------------------------------------------------------


def test_jpeg_constant_image_more_compressible_than_noise() -> None:
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.cat([torch.full((1, 3, 32, 32), 0.3), noise])
    comp, incomp = build_reward("jpeg_compressibility"), build_reward("jpeg_incompressibility")
    r_comp, r_incomp = comp(images, ["a", "b"], [{}, {}]), incomp(images, ["a", "b"], [{}, {}])
    assert r_comp.shape == (2,) and r_comp.dtype == torch.float32
    assert r_comp[0] > r_comp[1]  # the constant image is more compressible
    assert torch.equal(r_incomp, -r_comp)
    assert (r_incomp > 0).all()


def test_jpeg_size_is_kilobytes_at_quality_95() -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = []
    for image in to_pil_images(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    torch.testing.assert_close(jpeg_sizes_kb(images), torch.tensor(expected), rtol=0, atol=0)
    # noise at quality 50 is smaller: the quality parameter reaches the encoder
    assert (jpeg_sizes_kb(images, quality=50) < jpeg_sizes_kb(images)).all()


def test_jpeg_reward_kwargs_and_name() -> None:
    reward = build_reward("jpeg_incompressibility", quality=80)
    assert isinstance(reward, JpegReward) and reward.quality == 80
    assert reward.name == "jpeg_incompressibility"
    assert build_reward("jpeg_compressibility").name == "jpeg_compressibility"
    with pytest.raises(ValueError, match="quality"):
        build_reward("jpeg_compressibility", quality=100)


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_lazy_entries() -> None:
    assert {"jpeg_compressibility", "jpeg_incompressibility", "shapes_binding"} <= set(
        available_rewards()
    )
    # a string entry is imported only when built: the shapes world is not loaded by the registry
    assert REWARDS["shapes_binding"] == "diffloop.shapes.reward:BindingReward"


def test_build_reward_from_user_function() -> None:
    reward = build_reward("example_rewards:prompt_length")
    images, _, metadata = _batch(2)
    assert score(reward, images, ["ab", "abcde"], metadata).scores.tolist() == [2.0, 5.0]
    with pytest.raises(ValueError, match="takes no kwargs"):
        build_reward("example_rewards:prompt_length", scale=2)


def test_build_reward_from_user_class_with_kwargs() -> None:
    reward = build_reward("example_rewards:Brightness", scale=4.0)
    images, prompts, metadata = _batch(3)
    result = score(reward, images, prompts, metadata)
    torch.testing.assert_close(result.scores, torch.full((3,), 2.0), rtol=0, atol=0)


def test_unknown_name_suggests_closest_and_module_form() -> None:
    with pytest.raises(ValueError) as info:
        build_reward("jpeg_compresibility")
    message = str(info.value)
    assert "Did you mean 'jpeg_compressibility'?" in message
    assert "jpeg_incompressibility" in message and "shapes_binding" in message  # the list
    assert "package.module:function" in message


def test_import_errors_name_the_module() -> None:
    with pytest.raises(ImportError, match="'no_such_package_xyz.rewards'"):
        build_reward("no_such_package_xyz.rewards:fn")
    with pytest.raises(ValueError, match="'example_rewards' has no attribute 'missing'"):
        build_reward("example_rewards:missing")
    with pytest.raises(TypeError, match="not a function or class"):
        build_reward("example_rewards:NOT_A_REWARD")
    with pytest.raises(ValueError, match="package.module:attr"):
        build_reward("example_rewards:")


def test_register_reward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("diffloop.rewards.registry.REWARDS", dict(REWARDS))
    from diffloop.rewards import registry

    @register_reward("constant_test")
    def constant(value: float = 1.0):
        return lambda images, prompts, metadata: [value] * len(prompts)

    assert "constant_test" in registry.available_rewards()
    images, prompts, metadata = _batch(2)
    result = score(build_reward("constant_test", value=3.0), images, prompts, metadata)
    assert result.scores.tolist() == [3.0, 3.0]
    register_reward("constant_test")(constant)  # the same object again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("constant_test")(lambda: None)
    # a module decorating the class its lazy entry names replaces the string
    registry.REWARDS["lazy_test"] = f"{JpegReward.__module__}:{JpegReward.__qualname__}"
    assert register_reward("lazy_test")(JpegReward) is JpegReward
    assert registry.REWARDS["lazy_test"] is JpegReward


# --- score(): the invalid-value policy ------------------------------------------------------


def test_score_valid_outputs_become_float32_cpu() -> None:
    images, prompts, metadata = _batch(3)
    outputs = [
        [1, 2, 3],
        np.array([1.0, 2.0, 3.0]),
        torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True),
        (np.array([1, 2, 3]), {"info": 0}),  # DDPO's (scores, info) pair
    ]
    for output in outputs:
        result = score(lambda *_, out=output: out, images, prompts, metadata)
        assert result.scores.dtype == torch.float32 and result.scores.device.type == "cpu"
        assert result.scores.tolist() == [1.0, 2.0, 3.0] and result.num_invalid == 0
        assert not result.scores.requires_grad


def test_score_nan_and_inf_are_kept_as_nan_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    images, prompts, metadata = _batch(4)

    class Flaky:
        name = "flaky"

        def __call__(self, *_: Any) -> list[float]:
            return [1.5, math.nan, math.inf, -math.inf]

    with caplog.at_level(logging.WARNING, logger="diffloop.rewards.registry"):
        result = score(Flaky(), images, prompts, metadata)
    assert result.num_invalid == 3
    assert result.scores[0].item() == 1.5 and torch.isnan(result.scores[1:]).all()
    assert result.valid.tolist() == [True, False, False, False]
    assert "'flaky'" in caplog.text and "3 of 4" in caplog.text and "[1, 2, 3]" in caplog.text


@pytest.mark.parametrize(
    "output, got",
    [([1.0, 2.0, 3.0], r"got \(3,\)"), (torch.zeros(4, 1), r"got \(4, 1\)"), (2.0, r"got \(\)")],
)
def test_score_wrong_shape_raises(output: Any, got: str) -> None:
    images, prompts, metadata = _batch(4)
    with pytest.raises(RewardError, match=r"expected \(4,\).*" + got):
        score(lambda *_: output, images, prompts, metadata)


@pytest.mark.parametrize(
    "output",
    [
        ["a", "b", "c", "d"],
        [None] * 4,
        [[1.0], [1.0, 2.0], [3.0], [4.0]],  # ragged
        torch.zeros(4, dtype=torch.complex64),
    ],
)
def test_score_non_numeric_raises(output: Any) -> None:
    images, prompts, metadata = _batch(4)
    with pytest.raises(RewardError, match=r"expected \(4,\) numbers"):
        score(lambda *_: output, images, prompts, metadata)


def test_score_reward_that_raises_is_named_and_chained() -> None:
    images, prompts, metadata = _batch(2)

    def broken(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> list[float]:
        raise ZeroDivisionError("boom")

    expected = r"'broken' raised ZeroDivisionError: boom.*resume=true"
    with pytest.raises(RewardError, match=expected) as info:
        score(broken, images, prompts, metadata)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_score_checks_prompt_and_metadata_lengths() -> None:
    images, prompts, metadata = _batch(3)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        score(lambda *_: [0.0] * 3, images, prompts[:2], metadata)


def test_evaluation_reward_is_eval_reward_else_the_declared_counterpart():
    from diffloop.rewards.registry import evaluation_reward_name
    from diffloop.shapes.reward import BindingReward, PhraseMeanBindingReward

    # the shapes default trains on the phrase mean and is judged by the product (T2I-CompBench's)
    assert evaluation_reward_name("shapes_binding_mean", None) == "shapes_binding"
    assert (
        evaluation_reward_name("shapes_binding_mean", "jpeg_compressibility")
        == "jpeg_compressibility"
    )
    assert evaluation_reward_name("jpeg_compressibility", None) == "jpeg_compressibility"
    assert evaluation_reward_name("reward_fns:brightness", None) == "reward_fns:brightness"
    mean, product = PhraseMeanBindingReward(), BindingReward()
    assert (mean.aggregate, product.aggregate) == ("mean", "product")
