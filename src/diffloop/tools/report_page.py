"""The HTML of ``diffloop report``: summary table, held-out breakdown, plots, images and configs.

Every image is inlined as a base64 ``data:`` URI and the page has no script and no external link,
so the one file can be mailed or archived. What a section shows, in page order:

    summary              one row per run: algorithm, model, reward, epochs, rewards before / after
    Rewards              training reward (mean +- std), held-out reward (mean +- standard error)
    held-out breakdown   base -> last evaluation of the reward and, for the shapes world, of each
                         attribute's binding and of seen / unseen combinations (shapes.reward)
    evaluation images    eval/before_after.png (the labelled comparison the run wrote), the
                         eval/<tag>.npz images as a table (prompt per row, score under each
                         image), and the unlabelled grids eval/base.png and the newest epoch_N.png
    other plot sections  reward components, policy statistics, over-optimisation monitors
    configs              each run's resolved config.yaml, verbatim
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffloop import metrics
from diffloop.tools.report_curves import is_number, standard_error

EPOCH = metrics.key("epoch")
REWARD_MEAN = metrics.key("reward_mean")
EVAL_MEAN = metrics.key("eval_reward_mean")
EVAL_STD = metrics.key("eval_reward_std")
EVAL_FILE_RE = re.compile(r"^epoch_(\d+)\.(png|npz)$")
THUMBNAIL = 128  # px: larger evaluation images are shrunk to this in the labelled table
TABLE_ROWS = 32  # prompts the labelled table shows (the .npz may hold every evaluation prompt)
# (key, label) of the held-out breakdown, in table order; a row no run logged is left out.
BREAKDOWN = (
    (EVAL_MEAN, "held-out reward, all prompts"),
    (metrics.key("eval_binding_colour_mean"), "colour binding"),
    (metrics.key("eval_binding_shape_mean"), "shape binding"),
    (metrics.key("eval_binding_texture_mean"), "texture binding"),
    (metrics.key("eval_reward_seen_mean"), "reward, seen combinations"),
    (metrics.key("eval_reward_unseen_mean"), "reward, unseen combinations"),
)

CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1300px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; }
.plots img { width: 600px; max-width: 48%; margin: 4px; border: 1px solid #eee; }
.grids figure { display: inline-block; margin: 8px; vertical-align: top; }
.grids img { width: 560px; max-width: 100%; image-rendering: pixelated; }
figure.before-after img { width: auto; max-width: 100%; image-rendering: auto; }
table.labelled td { text-align: center; vertical-align: top; font-size: 12px; }
table.labelled td.prompt { text-align: left; vertical-align: middle; max-width: 260px; }
table.labelled .first { border-left: 3px solid #888; }
table.labelled img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
.better { color: #1a7f37; } .worse { color: #c0392b; }
.note { color: #555; font-size: 13px; }
pre { background: #f6f6f6; padding: 8px; font-size: 12px; overflow: auto; max-height: 480px; }
"""


@dataclass
class RunData:
    """What the report reads from one run directory.

    Fields:
        name:        label in legends and headings (the directory name, made unique).
        path:        the run directory.
        config_text: config.yaml as written by the trainer (the resolved config).
        config:      the same, parsed.
        rows:        metrics.jsonl rows, aliases renamed to keys (epoch -1: the base evaluation).
        grids:       (caption, PNG path) of the before / after evaluation grids.
        eval_images: images behind each held-out mean, eval.num_prompts x eval.samples_per_prompt
                     (None when the config does not say).
    """

    name: str
    path: Path
    config_text: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    grids: list[tuple[str, Path]] = field(default_factory=list)
    eval_images: int | None = None


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def array_uri(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> a PNG data URI, shrunk to at most THUMBNAIL px a side."""
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "n/a" if value is None else html.escape(str(value))


def esc(text: str) -> str:
    return html.escape(text, quote=True)


# ----------------------------------------------------------------------------- tables


def base_and_last(rows: Sequence[dict[str, Any]], key: str) -> tuple[Any, Any, int | None]:
    """``key`` at the base evaluation (epoch -1), at the last epoch that logged it, and that
    epoch's epochs completed (None where absent)."""
    base = next((r[key] for r in rows if r.get(EPOCH) == -1 and key in r), None)
    last = next((r for r in reversed(rows) if r.get(EPOCH, -1) >= 0 and key in r), None)
    return base, (None if last is None else last[key]), (None if last is None else last[EPOCH] + 1)


def eval_cell(row: dict[str, Any] | None, n: int | None) -> str:
    """ "mean +- s.e." of the held-out reward in ``row`` ("n/a" without it)."""
    if row is None:
        return "n/a"
    se = standard_error(row[EVAL_STD], n) if is_number(row.get(EVAL_STD)) else None
    return fmt(row[EVAL_MEAN]) + ("" if se is None else f" &plusmn; {fmt(se)}")


SUMMARY_HEADER = ("run", "algorithm", "model", "reward", "epochs", "last training reward",
                  "held-out before", "held-out after", "held-out images")  # fmt: skip


def summary_row(run: RunData) -> list[str]:
    """The summary's cells (HTML): held-out rewards as mean +- standard error."""
    cfg = run.config
    train = [r for r in run.rows if r.get(EPOCH, -1) >= 0]
    evals = [r for r in run.rows if EVAL_MEAN in r]
    base = next((r for r in evals if r[EPOCH] == -1), None)
    last = next((r for r in reversed(evals) if r[EPOCH] >= 0), None)
    reward = cfg.get("reward", {})
    reward_name = reward.get("name") if isinstance(reward, dict) else reward
    images = "n/a" if run.eval_images is None else str(run.eval_images)
    return [
        esc(run.name),
        fmt(cfg.get("train", {}).get("algorithm")),
        fmt(cfg.get("model", {}).get("pretrained")),
        fmt(reward_name),
        str(len(train)),
        fmt(train[-1].get(REWARD_MEAN) if train else None),
        eval_cell(base, run.eval_images),
        eval_cell(last, run.eval_images) + ("" if last is None else f" (epoch {last[EPOCH] + 1})"),
        images,
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    """Cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{css}'><tr>{head}</tr>{body}</table>"


def change_cell(key: str, base: Any, last: Any, epoch: int | None) -> str:
    """ "base -> last (change)", the change coloured by the schema's better direction."""
    if not is_number(base) or not is_number(last):
        return f"{fmt(base)} &rarr; {fmt(last)}"
    diff = last - base
    better = metrics.get(key).higher_is_better
    css = "" if better is None or diff == 0 else ("better" if (diff > 0) == better else "worse")
    return (f"{fmt(base)} &rarr; {fmt(last)} <span class='{css}'>({diff:+.4g})</span>"
            f" <small>epoch {epoch}</small>")  # fmt: skip


def breakdown_section(runs: Sequence[RunData]) -> str:
    """Base -> last evaluation of each BREAKDOWN key some run logged besides the mean, then of each
    category of an evaluation reward's own breakdown (``eval_reward_<category>_mean``,
    ``diffloop.rewards.breakdown``), one column per run; "" when no run logged one."""
    present = {k for run in runs for r in run.rows for k in r}
    categories = sorted(k for k in present if metrics.lookup(k) is metrics.EVAL_CATEGORY)
    logged = [(k, label) for k, label in BREAKDOWN if k in present] + [
        (k, f"reward, {k.removeprefix('eval_reward_').removesuffix('_mean')}") for k in categories
    ]
    if [k for k, _ in logged] in ([], [EVAL_MEAN]):
        return ""
    rows = [
        [f"<span title='{esc(metrics.get(k).meaning)}'>{esc(label)}</span>"]
        + [change_cell(k, *base_and_last(run.rows, k)) for run in runs]
        for k, label in logged
    ]
    notes = "".join(f"<li><b>{esc(label)}</b>: {esc(metrics.get(k).meaning)}</li>"
                    for k, label in logged)  # fmt: skip
    return (
        "<h2>Held-out breakdown: base model &rarr; last evaluation</h2>"
        + table(["quantity", *(esc(r.name) for r in runs)], rows)
        + f"<ul class='note'>{notes}</ul>"
    )


# ----------------------------------------------------------------------------- images


@dataclass
class EvalImages:
    """One eval/<tag>.npz as the trainer writes it: images (N, 3, H, W) uint8, scores (N,),
    prompts (P,), image i showing prompts[i // K] with K = N // P."""

    caption: str
    images: np.ndarray
    scores: np.ndarray
    prompts: list[str]

    @property
    def per_prompt(self) -> int:
        return len(self.images) // len(self.prompts)


def eval_files(run_dir: Path, suffix: str) -> list[tuple[str, Path]]:
    """(caption, path) of eval/base.<suffix> and the eval/epoch_N.<suffix> files, by epoch."""
    folder = run_dir / "eval"
    out = []
    if (folder / f"base.{suffix}").is_file():
        out.append(("before training (base model)", folder / f"base.{suffix}"))
    found = [(int(m[1]), p) for p in folder.glob(f"epoch_*.{suffix}")
             if (m := EVAL_FILE_RE.match(p.name))]  # fmt: skip
    return out + [(f"after epoch {epoch}", path) for epoch, path in sorted(found)]


def load_eval_images(caption: str, path: Path) -> EvalImages:
    """ValueError naming the file when its arrays do not describe one grid."""
    with np.load(path) as data:
        images, scores = data["images"], data["scores"].astype(float)
        prompts = [str(p) for p in data["prompts"]]
    if not prompts or images.ndim != 4 or len(images) % len(prompts) or len(scores) != len(images):
        raise ValueError(
            f"{path}: {images.shape} images, {len(scores)} scores and {len(prompts)} prompts "
            "do not describe one grid"
        )
    return EvalImages(caption, images, scores, prompts)


def labelled_table(run_name: str, grids: Sequence[EvalImages]) -> str:
    """One row per prompt (the first TABLE_ROWS), each evaluation's K images side by side with its
    score under each."""
    rows = min(TABLE_ROWS, max(len(g.prompts) for g in grids))
    head = "<th>prompt</th>" + "".join(
        f"<th colspan='{g.per_prompt}' class='first'>{esc(g.caption)}</th>" for g in grids
    )
    body = []
    for r in range(rows):
        names = dict.fromkeys(g.prompts[r] for g in grids if r < len(g.prompts))
        cells = [f"<td class='prompt'>{esc(' / '.join(names))}</td>"]
        for g in grids:
            k = g.per_prompt
            for j in range(k):
                if r >= len(g.prompts):
                    cells.append("<td></td>")
                    continue
                i, first = r * k + j, " class='first'" if j == 0 else ""
                score = "n/a" if math.isnan(g.scores[i]) else f"{g.scores[i]:.3f}"
                alt = f"{run_name}, {g.caption}, prompt {r + 1} image {j + 1}: score {score}"
                src = array_uri(np.ascontiguousarray(g.images[i].transpose(1, 2, 0)))
                cells.append(f"<td{first}><img alt='{esc(alt)}' src='{src}'>{score}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='labelled'><tr>{head}</tr>{''.join(body)}</table>"


def images_section(run: RunData) -> str:
    """A run's evaluation images: the labelled before/after figure, the labelled table of the
    .npz images, the unlabelled PNG grids (folded away when a labelled view exists)."""
    parts = [f"<h3>{esc(run.name)}</h3>"]
    figure = run.path / "eval" / "before_after.png"
    if figure.is_file():
        caption = ("eval/before_after.png: each prompt's images before training (left) and after "
                   "(right), each image's held-out score under it")  # fmt: skip
        parts.append(f"<figure class='before-after'><img alt='{esc(run.name)}: before / after' "
                     f"src='{data_uri(figure)}'><figcaption>{esc(caption)}"
                     "</figcaption></figure>")  # fmt: skip
    grids, problems = [], []
    for caption, path in eval_files(run.path, "npz"):
        try:
            grids.append(load_eval_images(caption, path))
        except (ValueError, KeyError, OSError) as e:  # a damaged or foreign file: say so
            problems.append(f"{path.name} not shown: {e}")
    if grids:
        table_html = labelled_table(run.name, grids)
        stored = max(len(g.prompts) for g in grids)
        shown = (
            f"{stored} prompts"
            if stored <= TABLE_ROWS
            else f"the first {TABLE_ROWS} of {stored} prompts"
        )
        summary = (f"Stored evaluation images (eval/*.npz) with their prompts and scores: "
                   f"{', '.join(g.caption for g in grids)}; {shown}")  # fmt: skip
        parts.append(
            f"<details><summary>{esc(summary)}</summary>{table_html}</details>"
            if figure.is_file()
            else f"<p>{esc(summary)}</p>{table_html}"
        )
    parts += [f"<p class='note'>{esc(p)}</p>" for p in problems]
    figures = "".join(
        f"<figure><img alt='{esc(caption)}' src='{data_uri(p)}'>"
        f"<figcaption>{esc(caption)}</figcaption></figure>"
        for caption, p in run.grids
    )
    if figures and (grids or figure.is_file()):
        parts.append("<details><summary>Unlabelled grids as written (eval/base.png, the newest "
                     "eval/epoch_N.png)</summary><div "
                     f"class='grids'>{figures}</div></details>")  # fmt: skip
    elif figures:
        parts.append(f"<div class='grids'>{figures}</div>")
    elif not grids and not figure.is_file():
        parts.append("<p>no evaluation images (eval/ is empty or missing)</p>")
    return "".join(parts)


# ----------------------------------------------------------------------------- the page


def plot_section(title: str, plots: Sequence[tuple[str, Path]]) -> str:
    if not plots:
        return ""
    imgs = "\n".join(f'<img alt="{esc(k)}" src="{data_uri(p)}">' for k, p in plots)
    return f"<h2>{esc(title)}</h2><div class='plots'>{imgs}</div>"


def render_html(
    runs: Sequence[RunData],
    plot_sections: Sequence[tuple[str, Sequence[tuple[str, Path]]]],
    unknown: Sequence[str] = (),
) -> str:
    """The report page (module doc). ``plot_sections``: (section title, [(key, PNG)]) in
    metrics.SECTIONS order, the first being the rewards; ``unknown``: logged keys the metrics
    schema does not declare, named so none vanishes silently."""
    names = ", ".join(r.name for r in runs)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>diffloop report: {esc(names)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>diffloop training report</h1>",
        table(SUMMARY_HEADER, [summary_row(r) for r in runs]),
        (
            "<p class='note'>x axes: training epochs completed when measured (0 = the base "
            "model). Training rewards are those of each epoch's samples (band: their std); the "
            "held-out reward uses fixed prompts and noise (band and &plusmn;: standard error of "
            "the mean over the held-out images). With several runs, each plot overlays them, one "
            "colour per run.</p>"
        ),
    ]
    first, *rest = plot_sections or [("", [])]
    parts.append(plot_section(*first))
    parts.append(breakdown_section(runs))
    parts.append("<h2>Evaluation images: before and after</h2>")
    parts += [images_section(run) for run in runs]
    parts += [plot_section(title, plots) for title, plots in rest]
    if unknown:
        keys = ", ".join(f"<code>{esc(k)}</code>" for k in unknown)
        parts.append(
            f"<p>Logged keys not in this version's metrics schema (not plotted): {keys}</p>"
        )
    parts.append("<h2>Resolved configs</h2>")
    for run in runs:
        parts.append(f"<h3>{esc(run.name)} <small>({esc(str(run.path))})</small></h3>")
        parts.append(f"<pre>{esc(run.config_text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
