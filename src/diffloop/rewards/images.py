"""Conversions between the trainer's image tensors and what reward models read."""

from __future__ import annotations

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1], any device -> (N, H, W, 3) uint8 on CPU.

    u = clamp(round(255 x), 0, 255), as ddpo-pytorch does (torch.round: halves go to even).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    # quantise on the images' device so that only uint8 crosses to the CPU
    u8 = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).cpu()


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) float in [0, 1] -> N RGB PIL images (uint8, rounded by :func:`to_uint8`).

    An (H, W, 3) uint8 array is read as RGB (Pillow infers it; its `mode=` argument is deprecated).
    """
    return [Image.fromarray(a) for a in to_uint8(images).numpy()]
