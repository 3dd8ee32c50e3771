"""Over-optimisation monitors: hand-computed brightness, HSV saturation and group diversity."""

from __future__ import annotations

import colorsys
import itertools

import pytest
import torch
import torch.nn.functional as F

from diffloop.monitors import group_diversity, image_statistics, mean_brightness, mean_saturation


def constant(*rgb: float, size: int = 4) -> torch.Tensor:
    """(1, 3, size, size) image of one colour."""
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_brightness_is_rec601_luma() -> None:
    assert mean_brightness(constant(1, 0, 0)) == pytest.approx(0.299, abs=1e-7)
    assert mean_brightness(constant(0, 1, 0)) == pytest.approx(0.587, abs=1e-7)
    assert mean_brightness(constant(1, 1, 1)) == pytest.approx(1.0, abs=1e-7)
    # mean over images and pixels: red image + black image, then half a blue image
    assert mean_brightness(torch.cat([constant(1, 0, 0), constant(0, 0, 0)])) == pytest.approx(
        0.1495, abs=1e-7
    )
    half_blue = constant(0, 0, 0)
    half_blue[:, 2, :2] = 1.0
    assert mean_brightness(half_blue) == pytest.approx(0.057, abs=1e-7)


def test_saturation_is_hsv() -> None:
    assert mean_saturation(constant(0.5, 0.25, 0.0)) == pytest.approx(1.0, abs=1e-7)
    assert mean_saturation(constant(0.8, 0.4, 0.4)) == pytest.approx(0.5, abs=1e-7)
    assert mean_saturation(constant(0.0, 0.0, 0.0)) == 0.0  # black: S defined as 0, not NaN
    assert mean_saturation(constant(0.3, 0.3, 0.3)) == 0.0
    # against the standard library's HSV conversion, pixel by pixel
    images = torch.rand(3, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    images[0, :, 0, 0] = 0.0  # include a black pixel
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    expected = sum(colorsys.rgb_to_hsv(*p)[1] for p in pixels) / len(pixels)
    assert mean_saturation(images) == pytest.approx(expected, abs=1e-6)


def test_diversity_hand_values() -> None:
    black, grey, white = constant(0, 0, 0), constant(0.5, 0.5, 0.5), constant(1, 1, 1)
    assert group_diversity(torch.cat([black, white]), 2) == pytest.approx(1.0, abs=1e-6)
    assert group_diversity(torch.cat([grey, grey]), 2) == 0.0
    # K = 3: pairwise RMS distances 0.5, 1, 0.5 -> mean 2/3
    assert group_diversity(torch.cat([black, grey, white]), 3) == pytest.approx(2 / 3, abs=1e-6)
    # groups are consecutive and averaged: [black, white] -> 1, [grey, grey] -> 0
    assert group_diversity(torch.cat([black, white, grey, grey]), 2) == pytest.approx(0.5, abs=1e-6)
    # ... so the same images in another order measure differently: collapse is within a group
    assert group_diversity(torch.cat([black, white, black, white]), 2) == pytest.approx(
        1.0, abs=1e-6
    )
    assert group_diversity(torch.cat([black, black, white, white]), 2) == 0.0


def test_diversity_ignores_texture_finer_than_the_downsampling() -> None:
    # a 1-pixel checkerboard and its inverse differ at every pixel but average to the same grey
    checker = ((torch.arange(16).view(16, 1) + torch.arange(16).view(1, 16)) % 2).float()
    a = checker.expand(1, 3, 16, 16)
    assert group_diversity(torch.cat([a, 1 - a]), 2, size=8) == pytest.approx(0.0, abs=1e-6)
    assert group_diversity(torch.cat([a, 1 - a]), 2, size=16) == pytest.approx(1.0, abs=1e-6)


def test_diversity_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    images, k = torch.rand(12, 3, 16, 16, generator=gen), 4
    small = F.adaptive_avg_pool2d(images, 8).reshape(12, -1)
    per_group = []
    for g in range(3):
        rows = small[g * k : (g + 1) * k]
        d = [
            float((rows[i] - rows[j]).pow(2).mean().sqrt())
            for i, j in itertools.combinations(range(k), 2)
        ]
        per_group.append(sum(d) / len(d))
    assert group_diversity(images, k) == pytest.approx(sum(per_group) / 3, rel=1e-5)


def test_image_statistics_keys_and_single_sample_groups() -> None:
    images = torch.cat([constant(1, 0, 0), constant(0, 0, 0)])
    stats = image_statistics(images, group_size=2)
    # red vs black differ by 1 in one channel of three: RMS distance sqrt(1/3)
    expected = {
        "monitor_brightness": 0.1495,
        "monitor_saturation": 0.5,
        "monitor_group_diversity": (1 / 3) ** 0.5,
    }
    assert stats == pytest.approx(expected, abs=1e-6)
    # K = 1 (reinforce, ppo): no groups, so no diversity key rather than a misleading 0
    assert set(image_statistics(images, group_size=1)) == {
        "monitor_brightness",
        "monitor_saturation",
    }


def test_errors() -> None:
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        image_statistics(torch.rand(3, 3, 4, 4), group_size=2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_diversity(torch.rand(2, 3, 4, 4), group_size=1)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        mean_brightness(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="at least one image"):
        mean_saturation(torch.rand(0, 3, 4, 4))
