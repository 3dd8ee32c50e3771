"""Shapes-world binding reward: its validation properties, partial credit, speed."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffloop.shapes import world
from diffloop.shapes.reward import (
    BindingReward,
    RewardParams,
    aggregate_assignment,
    binding_score,
    connected_components,
)
from diffloop.shapes.world import ObjectSpec

BETA = RewardParams().partial_credit  # 0.2


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 3, H, W), edges replicated."""
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    n, c, h, w = x.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    return y.view(n, c, h, w)


@pytest.fixture(scope="module")
def clean() -> tuple[torch.Tensor, list[str]]:
    """Renders of 200 random train + val captions (seeded)."""
    rng = np.random.default_rng(0)
    splits = world.prompt_splits()
    texts = splits["train"] + splits["val"]
    prompts = [texts[i] for i in rng.choice(len(texts), 200, replace=False)]
    return _to_tensor([world.render(world.parse_caption(t), rng) for t in prompts]), prompts


@pytest.fixture(scope="module")
def pairs() -> dict[str, object]:
    """100 two-object captions: clean, colour-swapped, shape-swapped, one-shape-wrong renders."""
    rng = np.random.default_rng(1)
    texts = world.prompt_splits()["val_pair"] + world.prompt_splits()["train_pair"]
    prompts = [texts[i] for i in rng.choice(len(texts), 100, replace=False)]
    out: dict[str, list] = {"clean": [], "colour_swap": [], "shape_swap": [], "one_wrong": []}
    for text in prompts:
        a, b = world.parse_caption(text)
        other = [s for s in world.SHAPES if s not in (a.shape, b.shape)][int(rng.integers(2))]
        out["clean"].append(world.render([a, b], rng))
        out["colour_swap"].append(
            world.render(
                [ObjectSpec(b.color, a.shape, a.texture), ObjectSpec(a.color, b.shape, b.texture)],
                rng,
            )
        )
        out["shape_swap"].append(
            world.render(
                [ObjectSpec(a.color, b.shape, a.texture), ObjectSpec(b.color, a.shape, b.texture)],
                rng,
            )
        )
        out["one_wrong"].append(world.render([ObjectSpec(a.color, other, a.texture), b], rng))
    result: dict[str, object] = {k: _to_tensor(v) for k, v in out.items()}
    result["prompts"] = prompts
    return result


# ------------------------------------------------------------------- the validation properties
def test_clean_renders_score_high(clean: tuple[torch.Tensor, list[str]]) -> None:
    x, prompts = clean
    scores = BindingReward()(x, prompts)
    assert scores.shape == (200,) and scores.dtype == torch.float32
    assert scores.mean() >= 0.95  # measured 0.989
    assert scores.min() >= 0.85  # measured 0.971
    assert BindingReward("mean")(x, prompts).mean() >= 0.97  # measured 0.994


@pytest.mark.parametrize("aggregate", ["product", "mean"])
@pytest.mark.parametrize("kind", ["colour_swap", "shape_swap"])
def test_swapped_attributes_score_low(pairs: dict, aggregate: str, kind: str) -> None:
    reward = BindingReward(aggregate)
    swapped = reward(pairs[kind], pairs["prompts"]).mean()
    assert swapped <= 0.25
    # Each phrase's best object has one of its two attributes right: beta^2 (product) or beta.
    expected = BETA**2 if aggregate == "product" else BETA
    assert float(swapped) == pytest.approx(expected, abs=0.01)


def test_partial_credit_between_swapped_and_clean(pairs: dict) -> None:
    reward = BindingReward()
    prompts = pairs["prompts"]
    clean = reward(pairs["clean"], prompts).mean()
    swapped = reward(pairs["colour_swap"], prompts).mean()
    one_wrong = reward(pairs["one_wrong"], prompts).mean()  # right colours, one shape wrong
    assert swapped < one_wrong < clean
    assert float(one_wrong) == pytest.approx(BETA, abs=0.01)
    assert float(clean) >= 0.95


def test_monotone_in_gaussian_noise(clean: tuple[torch.Tensor, list[str]]) -> None:
    x, prompts = clean
    reward = BindingReward()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    means = [
        float(reward((x + s * noise).clamp(0, 1), prompts).mean())
        for s in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
    ]
    # measured 0.989 0.985 0.935 0.706 0.280 0.028
    assert all(b <= a + 1e-3 for a, b in itertools.pairwise(means)), means
    assert means[0] - means[2] > 0.02 and means[2] - means[4] > 0.3 and means[-1] < 0.1, means


def test_blurred_renders_still_score_high(clean: tuple[torch.Tensor, list[str]]) -> None:
    x, prompts = clean
    reward = BindingReward()
    assert reward(_blur(x, 0.7), prompts).mean() >= 0.9  # measured 0.98
    assert reward(_blur(x, 1.0), prompts).mean() >= 0.8  # measured 0.91


def test_tolerates_a_generators_colour_drift(clean: tuple[torch.Tensor, list[str]]) -> None:
    """Background tint, 10-degree hue drift, slight blur and noise together (a model's output)."""
    x, prompts = clean
    theta = np.deg2rad(10.0)
    k = np.ones(3) / np.sqrt(3)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = torch.tensor(
        np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx, dtype=torch.float32
    )
    y = torch.einsum("ij,njhw->nihw", rot, x)
    y = _blur(y, 0.6) + torch.tensor([-0.05, -0.03, 0.0]).view(1, 3, 1, 1)
    y = y + 0.03 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    assert BindingReward()(y.clamp(0, 1), prompts).mean() >= 0.9  # measured 0.97


def test_scores_in_unit_interval_on_arbitrary_images(clean: tuple[torch.Tensor, list[str]]) -> None:
    _, prompts = clean
    gen = torch.Generator().manual_seed(2)
    n = len(prompts)
    images = torch.cat(
        [
            torch.rand(n // 4, 3, 32, 32, generator=gen),
            torch.zeros(n // 4, 3, 32, 32),
            torch.ones(n // 4, 3, 32, 32),
            (torch.rand(n // 4, 3, 1, 1, generator=gen) * torch.ones(1, 1, 32, 32)),
        ]
    )
    scores = BindingReward()(images, prompts[: len(images)])
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()


# ------------------------------------------------------------------------- specific cases
def _one(objs: list[ObjectSpec], seed: int = 0) -> np.ndarray:
    return world.render(objs, np.random.default_rng(seed))


def test_non_finite_pixels_score_nan_not_zero() -> None:
    img = _to_tensor([_one([ObjectSpec("red", "circle")]), _one([ObjectSpec("red", "circle")])])
    img[1, 0, 5, 5] = float("nan")
    scores = BindingReward()(img, ["a red circle"] * 2)
    assert scores[0] >= 0.97 and torch.isnan(scores[1])


def test_empty_image_scores_zero() -> None:
    blank = np.full((32, 32, 3), world.BACKGROUND, np.uint8)
    assert binding_score(blank, "a red circle") == 0.0
    assert binding_score(blank, "a red circle and a blue square") == 0.0


def test_single_attribute_partial_credit() -> None:
    red_circle = _one([ObjectSpec("red", "circle", "solid")])
    assert binding_score(red_circle, "a red circle") >= 0.97
    assert binding_score(red_circle, "a circle") >= 0.97  # colour unspecified: not checked
    assert binding_score(red_circle, "a blue circle") == pytest.approx(BETA, abs=0.01)
    assert binding_score(red_circle, "a red square") == pytest.approx(BETA, abs=0.02)
    assert binding_score(red_circle, "a striped red circle") == pytest.approx(BETA, abs=0.01)
    assert binding_score(red_circle, "a blue square") == pytest.approx(BETA**2, abs=0.01)
    striped = _one([ObjectSpec("red", "circle", "striped")])
    assert binding_score(striped, "a striped red circle") >= 0.97
    assert binding_score(striped, "a solid red circle") == pytest.approx(BETA, abs=0.01)


def test_one_object_cannot_answer_two_phrases() -> None:
    img = _to_tensor([_one([ObjectSpec("red", "circle", "solid")])])
    text = ["a red circle and a circle"]
    assert float(BindingReward("product")(img, text)[0]) == 0.0
    assert float(BindingReward("mean")(img, text)[0]) == pytest.approx(0.5, abs=0.01)


def test_aggregate_assignment_hand_computed() -> None:
    scores = torch.tensor([[[0.9, 0.8, 0.0], [0.7, 0.1, 0.0]], [[0.6, 0.2, 0.0], [9.0, 9.0, 9.0]]])
    used = torch.tensor([[True, True], [True, False]])  # second image: one phrase only
    prod = aggregate_assignment(scores, used, "product")
    mean = aggregate_assignment(scores, used, "mean")
    torch.testing.assert_close(prod, torch.tensor([0.8 * 0.7, 0.6]))  # not 0.9 * 0.1
    torch.testing.assert_close(mean, torch.tensor([(0.8 + 0.7) / 2, 0.6]))


def test_connected_components_hand_made() -> None:
    mask = torch.zeros(1, 6, 7, dtype=torch.bool)
    mask[0, 0, 0:3] = True  # component A (a bar)
    mask[0, 1, 3] = True  # diagonal neighbour of A: same component (8-neighbour)
    mask[0, 4:6, 0:2] = True  # component B
    mask[0, 3:6, 5] = True  # component C
    labels = connected_components(mask)[0]
    assert (labels[~mask[0]] == 0).all()
    assert len(labels[mask[0]].unique()) == 3
    assert labels[0, 0] == labels[1, 3] and labels[4, 0] == labels[5, 1] != labels[3, 5]


def test_binding_score_matches_batched_reward_and_dtypes(
    clean: tuple[torch.Tensor, list[str]],
) -> None:
    x, prompts = clean
    batched = BindingReward()(x[:8], prompts[:8])
    for i in range(8):
        u8 = (x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert binding_score(u8, prompts[i]) == pytest.approx(float(batched[i]), abs=1e-5)
        assert binding_score(x[i].permute(1, 2, 0).numpy(), prompts[i]) == pytest.approx(
            float(batched[i]), abs=1e-5
        )


def test_rejects_bad_inputs() -> None:
    reward = BindingReward()
    with pytest.raises(ValueError, match="aggregate"):
        BindingReward("max")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        reward(torch.zeros(2, 32, 32, 3), ["a red circle"] * 2)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(torch.zeros(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match="not 'a \\[texture\\]"):
        reward(torch.zeros(1, 3, 32, 32), ["a photo of a cat"])
    assert BindingReward.name == "shapes_binding"


def test_fast_enough_for_rl(clean: tuple[torch.Tensor, list[str]]) -> None:
    x, prompts = clean
    reward = BindingReward()
    reward(x[:4], prompts[:4])  # prototypes built
    start = time.process_time()  # CPU time: one thread, so other users' load does not count
    reward(x, prompts)
    per_image_ms = (time.process_time() - start) / len(prompts) * 1e3
    assert per_image_ms < 5.0  # measured ~0.4 ms
