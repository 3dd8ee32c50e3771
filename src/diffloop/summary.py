"""What a person reads at the end of a run: the held-out verdict (base -> trained, and the
evaluation reward's breakdown when it offers one: ``diffloop.rewards.breakdown``) and the labelled
before/after image grid.

The grid, ``eval/before_after.png``: the base model's held-out images on the left, the last
evaluation's on the right (same prompts, same noise), each image's score under it. Its rows are
chosen after both evaluations are known, spread evenly over the per-prompt change
(``representative_rows``), and it prints the shown rows' mean and every prompt's mean, before ->
after. ``eval/before_after.json`` (``FigureLayout``) says what it shows, for the model card.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffloop.rewards.breakdown import BreakdownSection


def summary_lines(
    base: dict[str, Any],
    trained: dict[str, Any],
    label: str,
    source: str,
    num_prompts: int,
    k: int,
    breakdown: Sequence[BreakdownSection] = (),
) -> list[str]:
    """The end-of-run verdict from the base (epoch -1) and last evaluation rows: the held-out
    reward (named ``label``: ``rewards.breakdown.summary_label``), then each section of the
    reward's ``breakdown`` (``rewards.breakdown.summary_sections``) that the base row has a key
    of, as base -> trained (difference)."""
    verdict = (f"{label} on held-out prompts: base {base['eval_reward_mean']:.4f} -> trained "
               f"{trained['eval_reward_mean']:.4f} ({source}, {num_prompts} prompts x "
               f"{k} images)")  # fmt: skip
    lines = [verdict]

    def change(key: str, name: str) -> str:
        if key not in base or key not in trained:
            return f"    {name:<30} n/a"
        b, t = base[key], trained[key]
        return f"    {name:<30} base {b:.4f} -> trained {t:.4f} ({t - b:+.4f})"

    for section in breakdown:
        if any(row.key in base for row in section.rows):
            lines.append(f"  {section.heading}")
            lines += [change(row.key, row.label) + row.note for row in section.rows]
    return lines


FIGURE_ROWS = 16  # prompt rows eval/before_after.png shows
FIGURE_SIDE = 256  # longest side (px) of the evaluation images kept for the figure
LAYOUT_NAME = "before_after.json"  # next to before_after.png: what the figure shows


def figure_images(images: torch.Tensor, side: int = FIGURE_SIDE) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, h, w) uint8 for the figure: as is when max(H, W) <= side,
    else area-averaged down to longest side ``side`` (a 1024 px evaluation of 96 x 2 images keeps
    37 MB, not 600 MB)."""
    h, w = images.shape[-2:]
    if max(h, w) > side:
        size = (max(1, round(h * side / max(h, w))), max(1, round(w * side / max(h, w))))
        images = torch.nn.functional.interpolate(images.float(), size=size, mode="area")
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def save_eval_images(
    path: Path, images: torch.Tensor, scores: torch.Tensor, prompts: list[str]
) -> None:
    """eval/<tag>.npz of the base or the last evaluation: every image (uint8, ``figure_images``),
    every score (NaN = invalid) and every prompt (the row labels), so that the figure's rows can
    be chosen once both evaluations are known. images: (P k, 3, h, w) uint8, prompt-major;
    scores: (P k,); prompts: P."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images.cpu().numpy(), scores=scores.float().cpu().numpy(),
                        prompts=np.array(prompts))  # fmt: skip


def prompt_changes(before: np.ndarray, after: np.ndarray, k: int) -> np.ndarray:
    """Each prompt's change of mean score: d_p = nanmean(after[p k : (p + 1) k]) -
    nanmean(before[p k : (p + 1) k]), (P k,) x 2 -> (P,); NaN where either side has no valid
    score."""
    with np.errstate(all="ignore"), _quiet_nanmean():
        b = np.nanmean(before.reshape(-1, k), axis=1)
        a = np.nanmean(after.reshape(-1, k), axis=1)
    return a - b


def representative_rows(change: np.ndarray, rows: int) -> np.ndarray:
    """The prompts to show: ``rows`` of them spread evenly over the distribution of per-prompt
    change, in order from the largest drop to the largest gain.

    With the M prompts of finite change sorted ascending (ties by prompt order), row i (i = 0 ..
    rows - 1) is the prompt at sorted position floor((i + 1/2) M / rows): the middle of the i-th
    of ``rows`` equal shares. All M when M <= rows; prompts of NaN change only fill rows left over.

    Why quantiles and not "the biggest wins and losses": each row stands for an equal share of
    the prompts, so the shown rows' mean change tracks every prompt's (a stratified sample), and
    the first and last rows still show how bad the worst and how good the best share got. The
    largest wins and losses alone overstate the spread and say nothing of the typical prompt, and
    the first rows in prompt order show whatever those prompts happened to do."""
    finite = np.flatnonzero(np.isfinite(change))
    order = finite[np.argsort(change[finite], kind="stable")]
    m = len(order)
    if m > rows:
        order = order[((np.arange(rows) + 0.5) * m / rows).astype(int)]
    missing = np.flatnonzero(~np.isfinite(change))[: max(0, rows - len(order))]
    return np.concatenate([order, missing]).astype(int)


@dataclass(frozen=True)
class FigureLayout:
    """What eval/before_after.png shows (written next to it as before_after.json; the model card
    describes the figure from it)."""

    arrangement: (
        str  # "side_by_side": before left, after right; "stacked": before top, after bottom
    )
    selection: str  # "change_quantiles" (representative_rows) or "all" (every evaluation image)
    rows: int  # prompt rows shown (0: not one row per prompt)
    num_prompts: int  # evaluation prompts the rows were chosen from
    images_per_prompt: int
    after_heading: str  # e.g. "after: epoch 60"
    shown_before: float | None = None  # the shown images' mean score, base model
    shown_after: float | None = None
    all_before: float | None = None  # every evaluation image's mean score, base model
    all_after: float | None = None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> FigureLayout | None:
        """The layout saved at ``path``; None when absent or unreadable (an older run)."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def rows_sentence(self) -> str:
        """How the rows were chosen, in one sentence (the figure, the card and the run's
        summary)."""
        if self.selection != "change_quantiles":
            return f"Every held-out image of the {self.num_prompts} evaluation prompts."
        if self.rows >= self.num_prompts:
            return (f"All {self.num_prompts} evaluation prompts, one per row, sorted by the "
                    "change of "
                    "their mean score from the largest drop (top) to the largest gain "
                    "(bottom).")  # fmt: skip
        return (f"{self.rows} of the {self.num_prompts} evaluation prompts, spread evenly over the "
                "change of their mean score: sorted from the largest drop (top) to "
                "the largest gain "
                f"(bottom), each row is the middle prompt of one of {self.rows} equal "
                "shares.")  # fmt: skip

    def means_sentences(self) -> list[str]:
        """The shown rows' and every prompt's mean score, before -> after."""
        if self.shown_before is None or self.all_before is None:
            return []
        k, shown = self.images_per_prompt, min(self.rows, self.num_prompts)
        return [(f"Shown rows: mean {_change(self.shown_before, self.shown_after)}, n = "
                 f"{shown * k} "
                 f"images of {shown} prompts."),
                (f"All prompts: mean {_change(self.all_before, self.all_after)}, n = "
                 f"{self.num_prompts * k} images of {self.num_prompts} prompts.")]  # fmt: skip


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None or math.isnan(before) or math.isnan(after):
        return f"{before} -> {after}"
    return f"{before:.4f} -> {after:.4f} ({after - before:+.4f})"


def _nanmean(x: np.ndarray) -> float:
    with _quiet_nanmean():
        return float(np.nanmean(x)) if x.size else float("nan")


@contextlib.contextmanager
def _quiet_nanmean() -> Iterator[None]:
    """nanmean of an all-NaN slice is NaN (what we want), without numpy's RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def write_before_after(
    before: Path,
    after: Path,
    out: Path,
    k: int,
    after_heading: str = "after",
    rows: int = FIGURE_ROWS,
    reward: str = "reward",
) -> FigureLayout:
    """eval/<tag>.npz of the base and the last evaluation -> the labelled figure at ``out`` and
    its ``FigureLayout`` next to it (``LAYOUT_NAME``); returns the layout.

    Before on the left, after on the right (``diffloop.images.labelled_before_after``), ``rows``
    prompts chosen by ``representative_rows`` from every prompt both files hold, each row labelled
    with its prompt and its mean before -> after; on top, how the rows were chosen, the shown
    rows' mean and every prompt's mean, before -> after. Tiles are >= 128 px (nearest-neighbour
    upscaling of small images), labels in a 16 px TrueType font where one is installed."""
    from PIL import Image

    from diffloop.images import labelled_before_after

    b, a = np.load(before), np.load(after)
    num_prompts = min(
        len(b["prompts"]), len(a["prompts"]), len(b["scores"]) // k, len(a["scores"]) // k
    )
    n = num_prompts * k
    b_scores, a_scores = b["scores"][:n].astype(np.float64), a["scores"][:n].astype(np.float64)
    change = prompt_changes(b_scores, a_scores, k)
    shown = representative_rows(change, rows)
    images = np.concatenate([np.arange(p * k, (p + 1) * k) for p in shown])  # prompt-major
    sorted_rank = {int(p): r for r, p in
                   enumerate(np.argsort(np.where(np.isfinite(change), change, np.inf),
                                        kind="stable"))}  # fmt: skip
    layout = FigureLayout("side_by_side", "change_quantiles", len(shown), num_prompts, k,
                          after_heading, _nanmean(b_scores[images]), _nanmean(a_scores[images]),
                          _nanmean(b_scores), _nanmean(a_scores))  # fmt: skip
    notes = [f"mean {_row_change(b_scores, a_scores, p, k)}, #{sorted_rank[int(p)] + 1} of "
             f"{num_prompts} by change"
             for p in shown]  # fmt: skip
    title = [(f"Held-out prompts before training (left: the base model) and {after_heading} "
              "(right), "
              f"same noise; under each image its {reward} score."), layout.rows_sentence(),
             *layout.means_sentences()]  # fmt: skip
    as_float = lambda x: torch.from_numpy(x[images]).float() / 255.0
    grid = labelled_before_after(as_float(b["images"]), as_float(a["images"]),
                                 [str(b["prompts"][p]) for p in shown], b_scores[images].tolist(),
                                 a_scores[images].tolist(), per_row=k,
                                 upscale=max(1, math.ceil(128 / max(b["images"].shape[-2:]))),
                                 headings=("before: base model", after_heading), font_size=16,
                                 title=title, row_notes=notes)  # fmt: skip
    Image.fromarray(grid).save(out)
    layout.save(out.with_name(LAYOUT_NAME))
    return layout


def _row_change(before: np.ndarray, after: np.ndarray, p: int, k: int) -> str:
    rows = slice(p * k, (p + 1) * k)
    b, a = _nanmean(before[rows]), _nanmean(after[rows])
    return "n/a" if math.isnan(b) or math.isnan(a) else f"{b:.3f} -> {a:.3f} ({a - b:+.3f})"


def write_stacked_before_after(before_png: Path, after_png: Path, out: Path, k: int,
                               num_prompts: int, after_heading: str) -> FigureLayout:  # fmt: skip
    """A run resumed from a version without eval/<tag>.npz: the whole base grid above the whole
    last grid (``diffloop.images.stack_vertically``), and its ``FigureLayout`` next to it."""
    from diffloop.images import stack_vertically

    stack_vertically([before_png, after_png], out)
    layout = FigureLayout("stacked", "all", 0, num_prompts, k, after_heading)
    layout.save(out.with_name(LAYOUT_NAME))
    return layout
