"""The labelled before/after grid: headings, the prompt beside each row, each image's score under
it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffloop.images import labelled_before_after

PROMPTS = ["a red circle and a yellow cross", "a striped blue square and a green triangle"]


def grid(before_scores, after_scores, headings=("before", "after"), prompts=PROMPTS):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=g)
    return labelled_before_after(images, images.clone(), prompts, before_scores, after_scores,
                                 per_row=2, upscale=4, headings=headings)  # fmt: skip


def ink(band: np.ndarray) -> int:
    """Non-white pixels: drawn text."""
    return int((band < 250).any(axis=-1).sum())


def test_size_and_image_placement():
    out = grid([0.1] * 4, [0.2] * 4)
    tile, pad = 32, 4
    rows_h = out.shape[0] - pad
    # heading band + 2 rows of (tile + score band + pad): the score band equals the heading band
    text_h = (rows_h - 2 * (tile + pad)) // 3
    assert out.shape[0] == text_h + 2 * (tile + text_h + pad) + pad
    assert out.shape[1] > 2 * 2 * (tile + pad)  # two halves of 2 images, plus the prompt column
    assert out.dtype == np.uint8 and out.shape[2] == 3


def test_labels_are_drawn_where_they_belong():
    base = grid([0.1] * 4, [0.2] * 4)
    no_heading = grid([0.1] * 4, [0.2] * 4, headings=("", ""))
    no_prompts = grid([0.1] * 4, [0.2] * 4, prompts=["", ""])
    other_scores = grid([0.1] * 4, [0.9, 0.2, 0.2, float("nan")])
    assert base.shape == no_heading.shape == other_scores.shape
    heading_rows = np.nonzero((base != no_heading).any(axis=(1, 2)))[0]
    assert heading_rows.size and heading_rows.max() < 20  # only the top band changed
    assert ink(base[: heading_rows.max() + 1]) > ink(no_heading[: heading_rows.max() + 1])
    # the prompts: a left column as wide as the longest prompt, with text in each row
    label_w = base.shape[1] - 2 * 2 * (32 + 4) - 3 * 4 - 4  # width - 2 halves - gap - pad
    assert label_w > 100 and no_prompts.shape[1] == base.shape[1] - label_w + 2 * 4
    text_rows = np.nonzero((base[:, :label_w] < 250).any(axis=(1, 2)))[0]
    assert text_rows.min() > 20 and text_rows.max() > base.shape[0] // 2  # beside both rows
    assert ink(no_prompts[:, : 2 * 4]) == 0
    # the scores: only the bands under the images change, and only under the changed images
    diff_rows = np.nonzero((base != other_scores).any(axis=(1, 2)))[0]
    diff_cols = np.nonzero((base != other_scores).any(axis=(0, 2)))[0]
    assert diff_rows.size and diff_cols.min() > base.shape[1] // 2  # the "after" half only
    assert not (base[:, : base.shape[1] // 2] != other_scores[:, : base.shape[1] // 2]).any()


def test_mismatched_inputs_are_one_clear_error():
    with pytest.raises(ValueError, match="need 4 scores"):
        grid([0.1] * 3, [0.2] * 4)
    with pytest.raises(ValueError, match="do not describe the same grid"):
        grid([0.1] * 4, [0.2] * 4, prompts=PROMPTS[:1])


def test_labelled_grid_is_readable_with_prompts_and_title():
    from diffloop.images import labelled_grid

    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = labelled_grid(images, PROMPTS, per_row=2, title=["model shapes", "20 steps, eta 1.0"])
    no_text = labelled_grid(images, ["", ""], per_row=2)
    assert out.shape[0] >= 2 * 128 and out.shape[1] >= 2 * 128 + 100  # 8 px -> 128 px tiles
    label = out[:, : out.shape[1] - 2 * (128 + 4) - 4]
    rows = np.nonzero((label < 128).any(axis=(1, 2)))[0]
    assert rows.min() < 30 and rows.max() > out.shape[0] // 2  # the title, and beside both rows
    first = rows[: np.argmax(np.diff(np.r_[rows, 10**6]) > 1) + 1]
    assert first.max() - first.min() + 1 >= 13  # "model shapes": a readable font
    assert ink(no_text[:, :4]) == 0 and no_text.shape[0] < out.shape[0]


def test_long_prompts_wrap_within_the_label_column():
    from diffloop.images import labelled_grid

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    long = " ".join(["a very detailed photograph of a red fox in the snow"] * 6)
    out = labelled_grid(images, [long], per_row=2)
    short = labelled_grid(images, ["a fox"], per_row=2)
    assert out.shape[1] <= 480 + 2 * 4 + 2 * (128 + 4) + 4  # label column <= 480 px + pad
    assert out.shape[0] > short.shape[0]  # the row grew to hold the wrapped lines
