"""Over-optimisation monitors: cheap image statistics of an epoch's samples.

A policy that games its reward often drifts in ways the reward does not see: images get brighter or
more saturated, or every sample of a prompt collapses onto the same picture. These statistics make
the drift visible in ``metrics.jsonl`` (keys ``monitor_*``) at a cost negligible next to sampling.

Shape notation: N images, K images per group (one prompt's samples, consecutive), G = N / K
groups, C = 3 channels, H x W pixels, s x s the downsampled size used for diversity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rec. 601 luma weights: perceived brightness of an RGB pixel.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image")


def mean_brightness(images: torch.Tensor) -> float:
    """Mean luma over all images and pixels.

        Y_n,h,w = 0.299 R + 0.587 G + 0.114 B        (Rec. 601, channels in [0, 1])
        brightness = 1/(N H W) sum_{n,h,w} Y_n,h,w   in [0, 1]

    images: (N, 3, H, W) in [0, 1].
    """
    _check_images(images)
    weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return float((images.float() * weights).sum(dim=1).mean())


def mean_saturation(images: torch.Tensor) -> float:
    """Mean HSV saturation over all images and pixels.

        V = max_c x_c,  m = min_c x_c,  S = (V - m) / V  (S = 0 where V = 0, a black pixel)
        saturation = 1/(N H W) sum_{n,h,w} S_n,h,w       in [0, 1]

    images: (N, 3, H, W) in [0, 1].
    """
    _check_images(images)
    x = images.float()
    value = x.amax(dim=1)  # (N, H, W)
    chroma = value - x.amin(dim=1)
    sat = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    return float(sat.mean())


def group_diversity(images: torch.Tensor, group_size: int, size: int = 8) -> float:
    """Mean pairwise RMS distance between downsampled images of the same group.

    Each image is area-averaged to s x s (s = min(size, H, W)) so that only layout and colour
    count, not noise or texture; y_n is the flattened result, D = 3 s^2 its length. Then

        d(a, b)   = ||y_a - y_b||_2 / sqrt(D)                   (per-element RMS; in [0, 1])
        div_g     = 2 / (K (K - 1)) sum_{i < j in group g} d(y_i, y_j)
        diversity = 1/G sum_g div_g

    Groups are K consecutive images (prompt-major sample order, as the trainer draws them).
    0 means every group collapsed to one picture. The O(K^2) pairs per group are cheap for K <= 64.

    images: (N, 3, H, W) in [0, 1], N divisible by K; group_size K >= 2.
    """
    _check_images(images)
    n = images.shape[0]
    if group_size < 2:
        raise ValueError(f"group diversity needs group_size >= 2, got {group_size}")
    if n % group_size:
        raise ValueError(f"{n} images do not split into groups of {group_size}")
    s = min(size, images.shape[2], images.shape[3])
    small = F.adaptive_avg_pool2d(images.float(), s).reshape(
        n // group_size, group_size, -1
    )  # (G, K, D)
    dist = torch.cdist(small, small) / small.shape[-1] ** 0.5  # (G, K, K), zero diagonal
    pairs = group_size * (group_size - 1)
    return float((dist.sum(dim=(1, 2)) / pairs).mean())


def image_statistics(images: torch.Tensor, group_size: int) -> dict[str, float]:
    """The monitors of one epoch's samples, as metrics.jsonl keys.

    Returns ``monitor_brightness`` (``mean_brightness``), ``monitor_saturation``
    (``mean_saturation``) and, when group_size >= 2, ``monitor_group_diversity``
    (``group_diversity`` over groups of ``group_size`` consecutive images; with one sample per
    prompt there is no group to measure and the key is left out rather than reported as 0).

    images: (N, 3, H, W) in [0, 1], N divisible by group_size.
    """
    _check_images(images)
    if group_size < 1 or images.shape[0] % group_size:
        raise ValueError(f"{images.shape[0]} images do not split into groups of {group_size}")
    images = images.detach()
    out = {
        "monitor_brightness": mean_brightness(images),
        "monitor_saturation": mean_saturation(images),
    }
    if group_size >= 2:
        out["monitor_group_diversity"] = group_diversity(images, group_size)
    return out
