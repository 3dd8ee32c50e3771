"""User-callable rewards for tests, given to diffloop as ``reward_fns:<name>``."""

from __future__ import annotations

import torch


def brightness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Mean pixel value: a cheap reward with spread across samples."""
    return images.mean(dim=(1, 2, 3))


def nan_on_odd(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Brightness, but NaN for odd global sample indices (a reward server failing on some images)."""
    out = images.mean(dim=(1, 2, 3)).clone()
    for i, m in enumerate(metadata):
        if m.get("sample_index", 0) % 2 == 1:
            out[i] = float("nan")
    return out


def fails_at_epoch_1(
    images: torch.Tensor, prompts: list[str], metadata: list[dict]
) -> torch.Tensor:
    if metadata and metadata[0].get("epoch") == 1:
        raise ConnectionError("reward server unreachable")
    return images.mean(dim=(1, 2, 3))
