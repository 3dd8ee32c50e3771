"""eval/before_after.png tells the truth: representative rows, the means it prints, a readable size,
and a model card that describes the layout it embeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffloop.images
from diffloop.config import load_config
from diffloop.export import card_text
from diffloop.summary import write_before_after

P, K = 96, 2  # the shapes default: 96 evaluation prompts x 2 images


def constructed_scores() -> tuple[np.ndarray, np.ndarray]:
    """(before, after), (P K,) each: the first 16 prompts all get worse by 0.1, the other 80 get
    better by 0.02 .. 0.3, so every prompt's mean improves (0.2 -> about 0.3)."""
    before = np.full(P * K, 0.2)
    gain = np.repeat(np.r_[np.full(16, -0.1), np.linspace(0.02, 0.3, P - 16)], K)
    return before, before + gain


def write_eval(path: Path, scores: np.ndarray, side: int = 32) -> None:
    """An eval/<tag>.npz as the trainer writes it: (P K, 3, side, side) uint8 images, scores,
    prompts."""
    rng = np.random.default_rng(len(scores))
    images = rng.integers(0, 255, (P * K, 3, side, side), dtype=np.uint8)
    prompts = np.array([f"prompt {p}" for p in range(P)])
    np.savez_compressed(path, images=images, scores=scores.astype(np.float32), prompts=prompts)


@pytest.fixture
def figure(tmp_path, monkeypatch):
    """(output png, the arguments labelled_before_after drew, the return value) of the figure of
    the constructed scores."""
    drawn: dict = {}
    real = diffloop.images.labelled_before_after

    def recording(before, after, prompts, before_scores, after_scores, *args, **kwargs):
        drawn.update(prompts=prompts, before=before_scores, after=after_scores, **kwargs)
        return real(before, after, prompts, before_scores, after_scores, *args, **kwargs)

    monkeypatch.setattr(diffloop.images, "labelled_before_after", recording)
    before, after = constructed_scores()
    write_eval(tmp_path / "base.npz", before)
    write_eval(tmp_path / "epoch_0002.npz", after)
    out = tmp_path / "before_after.png"
    got = write_before_after(tmp_path / "base.npz", tmp_path / "epoch_0002.npz", out, K)
    return out, drawn, got


def test_rows_are_representative_not_the_first_prompts(figure):
    _, drawn, _ = figure
    before, after = constructed_scores()
    shown = [int(p.split()[-1]) for p in drawn["prompts"]]
    assert len(shown) == 16 and len(set(shown)) == 16
    change = (after - before).reshape(P, K).mean(axis=1)
    # the first 16 prompts all got worse, the whole evaluation got better: the figure shows mostly
    # improving prompts (80 of 96 improve: about 13 of 16 rows), and still some of the losers
    improved = sum(change[p] > 0 for p in shown)
    assert 12 <= improved <= 14, shown
    # the shown rows' mean change is close to every prompt's (0.11), not the first rows' (-0.1)
    assert np.mean(change[shown]) == pytest.approx(change.mean(), abs=0.02)
    # sorted from the largest drop to the largest gain
    assert list(change[shown]) == sorted(change[shown])


def test_printed_means_equal_the_computed_ones(figure):
    _, drawn, layout = figure
    before, after = constructed_scores()
    rows = [int(p.split()[-1]) for p in drawn["prompts"]]
    images = np.concatenate([np.arange(p * K, (p + 1) * K) for p in rows])
    shown = (before[images].mean(), after[images].mean())
    every = (before.mean(), after.mean())
    assert (layout.shown_before, layout.shown_after) == pytest.approx(shown, abs=1e-6)
    assert (layout.all_before, layout.all_after) == pytest.approx(every, abs=1e-6)
    title = "\n".join(drawn["title"])
    assert (
        f"Shown rows: mean {shown[0]:.4f} -> {shown[1]:.4f} ({shown[1] - shown[0]:+.4f})" in title
    )
    assert f"n = {16 * K} images of 16 prompts" in title
    assert (
        f"All prompts: mean {every[0]:.4f} -> {every[1]:.4f} ({every[1] - every[0]:+.4f})" in title
    )
    assert f"n = {P * K} images of {P} prompts" in title
    # each row's note is that prompt's own mean, before -> after
    p = rows[0]
    b, a = before[p * K : (p + 1) * K].mean(), after[p * K : (p + 1) * K].mean()
    assert drawn["row_notes"][0].startswith(f"mean {b:.3f} -> {a:.3f} ({a - b:+.3f})")
    # the images' score labels are the saved scores of the shown images
    assert drawn["before"] == pytest.approx(before[images].tolist(), abs=1e-6)


def ink_rows(band: np.ndarray) -> np.ndarray:
    return np.nonzero((band < 128).any(axis=(1, 2)))[0]


def test_the_figure_is_readable(figure):
    out, _, _ = figure
    grid = np.asarray(Image.open(out).convert("RGB"))
    # 16 rows of 32 px images upscaled to >= 128 px, 2 before + 2 after per row
    assert grid.shape[0] >= 16 * 128 and grid.shape[1] >= 4 * 128
    # the first text line (the top-left label) is drawn in a font of readable height: its ink,
    # ascenders and descenders included, spans >= 13 px (Pillow's old bitmap font: about 10)
    rows = ink_rows(grid[:, :150])
    first_line = rows[: np.argmax(np.diff(np.r_[rows, 10**6]) > 1) + 1]
    assert first_line.max() - first_line.min() + 1 >= 13


def test_the_card_describes_the_layout_it_embeds(figure):
    _, _, layout = figure
    config = load_config(None, [])
    text = card_text(config, "shapes", None, None, None, True, None, layout)
    assert "![before (left) and after (right) training](before_after.png)" in text
    assert "before (top)" not in text and "after (bottom)" not in text
    assert "16 of the 96 evaluation prompts, spread evenly over the change" in text
    assert f"Shown rows: mean {layout.shown_before:.4f}" in text
    assert f"All prompts: mean {layout.all_before:.4f} -> {layout.all_after:.4f}" in text
    # an older run's stacked grids are described as stacked; an unknown image makes no claim
    from dataclasses import replace

    stacked = replace(layout, arrangement="stacked", selection="all", rows=0)
    assert "before (top) and after (bottom)" in card_text(
        config, "shapes", None, None, None, True, None, stacked
    )
    unknown = card_text(config, "shapes", None, None, None, True)
    assert "(left)" not in unknown and "(top)" not in unknown and "(before_after.png)" in unknown


def test_large_images_are_kept_downscaled_for_the_figure():
    from diffloop.summary import FIGURE_SIDE, figure_images

    big = torch.rand(3, 3, 1024, 768)
    kept = figure_images(big)
    assert kept.dtype == torch.uint8 and kept.shape == (3, 3, FIGURE_SIDE, 192)
    small = torch.rand(2, 3, 32, 32)
    assert torch.equal(figure_images(small), (small * 255).round().to(torch.uint8))


def test_nan_scores_neither_break_the_choice_nor_the_means():
    from diffloop.summary import prompt_changes, representative_rows

    before, after = constructed_scores()
    after[:K] = np.nan  # prompt 0: no valid score after
    change = prompt_changes(before, after, K)
    assert np.isnan(change[0]) and np.isfinite(change[1:]).all()
    assert 0 not in representative_rows(change, 16)
    assert sorted(representative_rows(change[:5], 16)) == [0, 1, 2, 3, 4]  # few prompts: all


def test_a_run_keeps_every_evaluation_image_and_chooses_the_rows_at_the_end(tmp_path, capsys):
    """A tiny shapes run with 20 evaluation prompts: base.npz and the last evaluation's .npz hold
    all 20 prompts (not the first 16), the figure shows 16 rows chosen from them and says so."""
    from diffloop.testing.runs import SHORT_SHAPES_RUN
    from diffloop.trainer import Trainer

    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        "num_epochs=1",
        "eval.prompts=shapes/val",
        "eval.num_prompts=20",
    ]
    Trainer(load_config(None, [*overrides, *SHORT_SHAPES_RUN])).train()
    for name in ("base.npz", "epoch_0001.npz"):
        saved = np.load(out / "eval" / name)
        assert saved["images"].shape == (40, 3, 32, 32) and saved["images"].dtype == np.uint8
        assert saved["scores"].shape == (40,) and len(saved["prompts"]) == 20
    from diffloop.summary import FigureLayout

    layout = FigureLayout.load(out / "eval" / "before_after.json")
    assert (layout.arrangement, layout.rows, layout.num_prompts) == ("side_by_side", 16, 20)
    base = np.load(out / "eval" / "base.npz")["scores"]
    assert layout.all_before == pytest.approx(float(np.nanmean(base)), abs=1e-6)
    printed = capsys.readouterr().out
    assert (
        "before (left) | after (right)" in printed and "16 of the 20 evaluation prompts" in printed
    )
