"""User-style rewards for build_reward's 'module:attr' form (conftest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Any

import torch


def prompt_length(
    images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
) -> list[int]:
    """A plain function reward: the number of characters of each prompt."""
    return [len(p) for p in prompts]


class Brightness:
    """A class reward configured by kwargs: scale * mean pixel value of each image."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.name = "brightness"

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        return self.scale * images.mean(dim=(1, 2, 3))


NOT_A_REWARD = 3
