"""User-callable rewards for tests, given to diffloop as ``reward_fns:<name>``."""

from __future__ import annotations

import torch


def brightness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Mean pixel value: a cheap reward with spread across samples."""
    return images.mean(dim=(1, 2, 3))


def whiteness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Fraction of pixels within 0.25 (RGB distance) of the shapes world's background (240, 240,
    240): a dense, prompt-independent reward (docs/method.md, "Which steps to train")."""
    background = torch.full((1, 3, 1, 1), 240 / 255, device=images.device)
    return ((images.float() - background).norm(dim=1) < 0.25).float().mean(dim=(1, 2))


def nan_on_odd(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Brightness, but NaN for odd global sample indices (a reward server failing on some
    images)."""
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


def constant_half(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """0.5 for every image (an evaluation reward that differs from any training one)."""
    return torch.full((images.shape[0],), 0.5)
