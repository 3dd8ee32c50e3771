"""Image grids: (N, 3, H, W) float tensors in [0, 1] -> one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def make_grid(images: torch.Tensor, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8, white padding."""
    n, _, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, ncols: int | None = None, upscale: int = 1) -> np.ndarray:
    """Write a PNG grid (optionally upscaled with nearest neighbour, for tiny images) and return it."""
    from PIL import Image

    grid = make_grid(images, ncols)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path)
    return grid


def stack_vertically(paths: list[str | Path], out: str | Path, gap: int = 8) -> None:
    """Stack PNG files top to bottom (white gaps) into one PNG, e.g. before / after grids."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height for im in images) + gap * (len(images) - 1)), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    canvas.save(out)
