"""Image grids: (N, 3, H, W) float tensors in [0, 1] -> one PNG, plain or labelled (prompt per row,
scores, headings, title lines) in a readable font."""

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
    """Write a PNG grid (optionally upscaled with nearest neighbour, for tiny images) and return
    it."""
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


def readable_font(size: int | None = None):
    """A font for labels a person reads: DejaVu Sans at ``size`` px when installed (most Linux
    systems), else Pillow's own scalable font (``ImageFont.load_default(size=...)``, Pillow >= 10.1
    with FreeType), else Pillow's small bitmap font. ``size`` None: Pillow's default font as is."""
    from PIL import ImageFont

    if size is None:
        return ImageFont.load_default()
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def wrap_text(text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` px wide in ``font`` (a word wider
    than ``width`` gets a line of its own); [""] for empty text."""
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split(" "):
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and probe.textlength(trial, font=font) <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines or [""]


def labelled_rows(
    blocks: list[torch.Tensor],
    prompts: list[str],
    per_row: int,
    *,
    scores: list[list[float]] | None = None,
    headings: list[str] | None = None,
    upscale: int = 1,
    pad: int = 4,
    font_size: int | None = None,
    title: list[str] | tuple[str, ...] = (),
    row_notes: list[str] | None = None,
    label_width: int = 480,
) -> np.ndarray:
    """A labelled image grid: one row per prompt, its text (wrapped at ``label_width`` px, then its
    ``row_notes`` line) on the left, then ``per_row`` images of each of the ``blocks`` side by side
    (e.g. before | after), each image's score under it when ``scores`` are given, a heading over
    each block when ``headings`` are given, and ``title`` lines (wrapped to the width) on top.

    blocks: B tensors (N, 3, H, W) in [0, 1], N = rows x per_row, prompt-major (image i shows
    ``prompts[i // per_row]``); scores: B lists of N (NaN -> "n/a"); ``font_size`` None: Pillow's
    default font (``readable_font``). Returns uint8 (title_h + heading_h + rows row_h + pad,
    label_w + B per_row (W' + pad) + (B - 1) gap + pad, 3), W' = W upscale, gap = 3 pad,
    row_h = max(H', label lines x text_h) + (text_h with scores) + pad, text_h = line height + 4.
    """
    from PIL import Image, ImageDraw

    n = blocks[0].shape[0]
    if (
        any(b.shape != blocks[0].shape for b in blocks)
        or n % per_row
        or len(prompts) != n // per_row
    ):
        shapes = " and ".join(str(tuple(b.shape)) for b in blocks)
        raise ValueError(f"images {shapes}, {len(prompts)} prompts and {per_row} images per row "
                         "do not describe the same grid")  # fmt: skip
    if scores is not None and any(len(s) != n for s in scores):
        got = " and ".join(str(len(s)) for s in scores)
        raise ValueError(f"{n} images need {n} scores each, got {got}")
    font = readable_font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = probe.textbbox((0, 0), "Ag0.", font=font)[3] + 4
    labels = [wrap_text(p, font, label_width) + ([row_notes[r]] if row_notes else [])
              for r, p in enumerate(prompts)]  # fmt: skip
    label_w = (
        max(probe.textbbox((0, 0), line, font=font)[2] for lines in labels for line in lines)
        + 2 * pad
    )
    tiles = [_to_uint8(b, upscale) for b in blocks]
    h, w = tiles[0].shape[1:3]
    block_w, gap = per_row * (w + pad), 3 * pad  # the gap separates the blocks (before | after)
    score_h = text_h if scores is not None else 0
    row_h = max(h, max(len(lines) for lines in labels) * text_h) + score_h + pad
    width = label_w + len(blocks) * block_w + (len(blocks) - 1) * gap + pad
    title_lines = [line for t in title for line in wrap_text(t, font, width - 2 * pad)]
    title_h = len(title_lines) * text_h + (pad if title_lines else 0)
    heading_h = text_h if headings is not None else 0
    top = title_h + heading_h
    canvas = Image.new("RGB", (width, top + len(prompts) * row_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * text_h), line, fill="black", font=font)
    for b, tile in enumerate(tiles):
        x0 = label_w + b * (block_w + gap)
        if headings is not None:
            draw.text(
                (x0 + block_w // 2, title_h + 2), headings[b], fill="black", font=font, anchor="ma"
            )
        for i in range(n):
            row, col = divmod(i, per_row)
            x, y = x0 + col * (w + pad), top + row * row_h
            canvas.paste(Image.fromarray(tile[i]), (x, y))
            if scores is not None:
                s = scores[b][i]
                label = "n/a" if math.isnan(s) else f"{s:.3f}"
                draw.text((x + w // 2, y + h + 1), label, fill="black", font=font, anchor="ma")
    for row, lines in enumerate(labels):  # the label block centred on the images' height
        y = top + row * row_h + max(0, (h - len(lines) * text_h) // 2) + 2
        for j, line in enumerate(lines):
            draw.text((pad, y + j * text_h), line, fill="black", font=font)
    return np.asarray(canvas)


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
    *,
    font_size: int | None = None,
    title: list[str] | tuple[str, ...] = (),
    row_notes: list[str] | None = None,
) -> np.ndarray:
    """The before/after comparison a person reads: one row per prompt (its text on the left, then
    its ``row_notes`` line), the ``per_row`` images of that prompt before training on the left, then
    after on the right, each image's score under it, "before" / "after" headings on top and the
    ``title`` lines above them (``labelled_rows``).

    before, after: (N, 3, H, W) in [0, 1], N = rows x per_row, prompt-major (image i shows
    ``prompts[i // per_row]``); prompts: N // per_row row labels; scores: N each (NaN -> "n/a").
    Returns (title_h + text_h + rows row_h + pad, label_w + 2 per_row (W' + pad) + gap + pad, 3)
    uint8 with W' = W upscale, text_h = font line height + 4 (``labelled_rows``).
    """
    n = before.shape[0]
    if after.shape != before.shape or n % per_row or len(prompts) != n // per_row:
        raise ValueError(f"before {tuple(before.shape)}, after {tuple(after.shape)}, "
                         f"{len(prompts)} prompts "
                         f"and {per_row} images per row do not describe the same grid")  # fmt: skip
    return labelled_rows([before, after], prompts, per_row, scores=[before_scores, after_scores],
                         headings=list(headings), upscale=upscale, pad=pad, font_size=font_size,
                         title=title, row_notes=row_notes)  # fmt: skip


def labelled_grid(
    images: torch.Tensor,
    prompts: list[str],
    per_row: int,
    *,
    title: list[str] | tuple[str, ...] = (),
    min_side: int = 128,
    font_size: int = 16,
) -> np.ndarray:
    """Samples a person reads: one row per prompt (its text on the left), its ``per_row`` images,
    ``title`` lines on top (e.g. the sampling settings), in a readable font; images smaller than
    ``min_side`` px are upscaled with nearest neighbour to at least that (whole pixels stay sharp).

    images: (N, 3, H, W) in [0, 1], N = len(prompts) x per_row, prompt-major. Returns uint8
    (``labelled_rows`` with one block, upscale = ceil(min_side / max(H, W)))."""
    upscale = max(1, math.ceil(min_side / max(images.shape[-2:])))
    return labelled_rows(
        [images], prompts, per_row, upscale=upscale, font_size=font_size, title=title
    )
