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
    arr = (
        (images.detach().float().clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_grid(
    images: torch.Tensor, path: str | Path, ncols: int | None = None, upscale: int = 1
) -> np.ndarray:
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
    canvas = Image.new(
        "RGB", (width, sum(im.height for im in images) + gap * (len(images) - 1)), "white"
    )
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    canvas.save(out)


def _to_uint8(images: torch.Tensor, upscale: int) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H*upscale, W*upscale, 3) uint8, nearest-neighbour upscaled."""
    arr = (
        (images.detach().float().clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return arr.repeat(upscale, axis=1).repeat(upscale, axis=2) if upscale > 1 else arr


def labelled_before_after(
    before: torch.Tensor,
    after: torch.Tensor,
    prompts: list[str],
    before_scores: list[float],
    after_scores: list[float],
    per_row: int,
    upscale: int = 1,
    headings: tuple[str, str] = ("before", "after"),
    pad: int = 4,
) -> np.ndarray:
    """The before/after comparison a person reads: one row per prompt (its text on the left), the
    ``per_row`` images of that prompt before training, then after, each image's score under it,
    "before" / "after" headings on top. PIL's default font; no other dependency.

    before, after: (N, 3, H, W) in [0, 1], N = rows x per_row, prompt-major (image i shows
    ``prompts[i // per_row]``); prompts: N // per_row row labels; scores: N each (NaN -> "n/a").
    Returns (text_h + rows (H' + text_h + pad) + pad, label_w + 2 per_row (W' + pad) + gap + pad, 3)
    uint8 with H' = H upscale, W' = W upscale, text_h = font line height + 4.
    """
    from PIL import Image, ImageDraw, ImageFont

    n = before.shape[0]
    if after.shape != before.shape or n % per_row or len(prompts) != n // per_row:
        raise ValueError(f"before {tuple(before.shape)}, after {tuple(after.shape)}, {len(prompts)} prompts "
                         f"and {per_row} images per row do not describe the same grid")  # fmt: skip
    if len(before_scores) != n or len(after_scores) != n:
        raise ValueError(
            f"{n} images need {n} scores each, got {len(before_scores)} and {len(after_scores)}"
        )
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = probe.textbbox((0, 0), "Ag0.", font=font)[3] + 4
    label_w = max(probe.textbbox((0, 0), p, font=font)[2] for p in prompts) + 2 * pad
    tiles = [_to_uint8(before, upscale), _to_uint8(after, upscale)]
    h, w = tiles[0].shape[1:3]
    block_w, gap = per_row * (w + pad), 3 * pad  # the gap separates before from after
    canvas = Image.new("RGB", (label_w + 2 * block_w + gap + pad, text_h + (n // per_row) * (h + text_h + pad) + pad),
                       "white")  # fmt: skip
    draw = ImageDraw.Draw(canvas)
    for half, (heading, scores) in enumerate(
        zip(headings, (before_scores, after_scores), strict=True)
    ):
        x0 = label_w + half * (block_w + gap)
        draw.text((x0 + block_w // 2, 2), heading, fill="black", font=font, anchor="ma")
        for i in range(n):
            row, col = divmod(i, per_row)
            x, y = x0 + col * (w + pad), text_h + row * (h + text_h + pad)
            canvas.paste(Image.fromarray(tiles[half][i]), (x, y))
            label = "n/a" if math.isnan(scores[i]) else f"{scores[i]:.3f}"
            draw.text((x + w // 2, y + h + 1), label, fill="black", font=font, anchor="ma")
    for row, prompt in enumerate(prompts):
        y = text_h + row * (h + text_h + pad) + h // 2
        draw.text((pad, y), prompt, fill="black", font=font, anchor="lm")
    return np.asarray(canvas)
