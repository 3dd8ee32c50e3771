"""The curves of ``diffloop report``: each metric against epochs completed, one line per run.

The data comes first and is plain (:class:`Curve`, :func:`metric_curve`: a test can check every
number by hand); drawing it is :func:`plot_curves`, with matplotlib (a dependency of diffloop,
imported inside the function because importing it costs about half a second).

x: training epochs completed when the value was measured (``metrics.Metric.x_offset``):
    measured on epoch e's samples, drawn before its update (reward_*, monitor_*):   x = e
    measured on epoch e's update (approx_kl, clipfrac, ...):                        x = e + 1
    evaluated after epoch e's update (eval_*; the row with epoch -1 is the base):   x = e + 1

Bands (the schema's ``band`` and ``band_kind`` of the plotted key):
    std: y +- std                  the spread of the values (reward_mean: of the epoch's samples)
    sem: y +- std / sqrt(n - 1)    the standard error of the mean of n values
The logged std is the population std (ddof 0) of the n values, so std sqrt(n / (n - 1)) is the
sample std s and s / sqrt(n) = std / sqrt(n - 1). For the held-out reward n = eval.num_prompts x
eval.samples_per_prompt. The band treats the n images as independent draws; images of one prompt
are correlated, so the uncertainty about the prompt distribution is somewhat larger than it shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffloop import metrics
from diffloop.errors import DiffloopError

EPOCH = metrics.key("epoch")
MATPLOTLIB_PIN = "matplotlib>=3.7"  # keep equal to pyproject.toml's dependency


class PlotsUnavailableError(DiffloopError):
    """matplotlib, a dependency of diffloop, does not import (a broken or partial install)."""


def x_offset(key: str) -> int:
    """Epochs completed at measurement = row epoch + this offset (the schema's ``measured``)."""
    return metrics.get(key).x_offset


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(x, y) of ``key`` over the rows that have it as a number; x per x_offset(key)."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if is_number(value):
            xs.append(int(row[EPOCH]) + x_offset(key))
            ys.append(float(value))
    return xs, ys


def standard_error(std: float, n: int | None) -> float | None:
    """s.e. of the mean of n values from their population std: std / sqrt(n - 1) (module doc);
    None when n is unknown or below 2 (no standard error to draw)."""
    if n is None or n < 2:
        return None
    return std / math.sqrt(n - 1)


@dataclass(frozen=True)
class Curve:
    """One run's line on one plot.

    Fields:
        x, y:       epochs completed and the logged values of the key (same length).
        band_x:     the x where the band key was logged too (a subset of x).
        lo, hi:     y - b and y + b at band_x, b the std or the standard error (module doc).
    """

    x: list[int]
    y: list[float]
    band_x: list[int]
    lo: list[float]
    hi: list[float]


def metric_curve(rows: Sequence[dict[str, Any]], key: str, n: int | None = None) -> Curve:
    """The line of ``key`` and its band (the schema's ``band`` / ``band_kind``); ``n``: the number
    of values behind each mean, for a standard-error band (None: no such band)."""
    metric = metrics.get(key)
    xs, ys = series(rows, key)
    band_x: list[int] = []
    lo: list[float] = []
    hi: list[float] = []
    if metric.band is not None:
        at = dict(zip(*series(rows, metric.band), strict=True))
        for x, y in zip(xs, ys, strict=True):
            spread = at.get(x)
            b = spread if metric.band_kind == "std" or spread is None else standard_error(spread, n)
            if b is not None and math.isfinite(b) and math.isfinite(y):
                band_x.append(x)
                lo.append(y - b)
                hi.append(y + b)
    return Curve(xs, ys, band_x, lo, hi)


def band_label(key: str, n: int | None, rows: Sequence[dict[str, Any]]) -> str:
    """What a run's standard-error band rests on, for its legend entry: "n = N images", or why
    there is no band although the std was logged; "" for other keys."""
    metric = metrics.get(key)
    if metric.band is None or metric.band_kind != "sem":
        return ""
    if n is not None and n >= 2:
        return f"n = {n} images"
    return "no s.e.: image count unknown" if series(rows, metric.band)[0] else ""


def plot_curves(
    curves: Sequence[tuple[str, Curve, int]], title: str, ylabel: str, path: Path
) -> None:
    """One PNG at ``path``: a line per (label, curve, colour index) with its band shaded.

    matplotlib's object API (``Figure``, no pyplot): no global backend or figure state is touched,
    so a caller's own plotting (a notebook's) is left as it was."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise PlotsUnavailableError(
            f"matplotlib, a dependency of diffloop, does not import ({e}): reinstall it with "
            f"pip install '{MATPLOTLIB_PIN}'"
        ) from e
    fig = Figure(figsize=(6.0, 3.4), dpi=100)
    ax = fig.subplots()
    for label, curve, index in curves:
        color = f"C{index % 10}"
        ax.plot(curve.x, curve.y, marker="o", markersize=3, color=color, label=label)
        if curve.band_x:
            ax.fill_between(curve.band_x, curve.lo, curve.hi, color=color, alpha=0.2, linewidth=0)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs completed (0 = base model)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
