"""DDPO's JPEG (in)compressibility rewards.

Adapted from kvablack/ddpo-pytorch, ddpo_pytorch/rewards.py (commit 1958463, MIT licence). Changes:
a class with a ``name`` instead of a closure; returns a float32 tensor instead of a
(numpy array, info dict) pair; the JPEG quality is a parameter (default 95, as DDPO).

    size_kB(x)                = len(JPEG_q(u8(x))) / 1000       (u8: see rewards.images.to_uint8)
    jpeg_incompressibility(x) = + size_kB(x)
    jpeg_compressibility(x)   = - size_kB(x)

The prompt and metadata are ignored. Cost: one PIL JPEG encode per image, on the CPU.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from diffloop.rewards.images import to_pil_images


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) float32: size in kB (1000 bytes) of each image as a JPEG."""
    sizes = []
    for image in to_pil_images(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward:
    """sign * JPEG size in kB: sign = -1 rewards compressible images, +1 incompressible ones."""

    def __init__(self, sign: float, quality: int = 95, name: str | None = None) -> None:
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 or +1, got {sign}")
        if not 1 <= quality <= 95:  # PIL: values above 95 disable parts of the compression
            raise ValueError(f"quality must be in [1, 95], got {quality}")
        self.sign = float(sign)
        self.quality = quality
        default = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"
        self.name = name or default

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        return self.sign * jpeg_sizes_kb(images, self.quality)

    def __repr__(self) -> str:
        return f"JpegReward(name={self.name!r}, quality={self.quality})"


def jpeg_compressibility(quality: int = 95) -> JpegReward:
    """-size_kB: higher for images that compress well (DDPO's 'compressibility' task)."""
    return JpegReward(sign=-1, quality=quality)


def jpeg_incompressibility(quality: int = 95) -> JpegReward:
    """+size_kB: higher for images that compress badly (DDPO's 'incompressibility' task)."""
    return JpegReward(sign=+1, quality=quality)
