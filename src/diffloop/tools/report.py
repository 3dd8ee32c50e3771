"""``diffloop report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page about training runs.

The page holds, for every run: a summary row, the curves of its metrics.jsonl (several runs overlaid
on the same axes, one colour per run), its before/after evaluation grids (``eval/base.png`` and the
newest ``eval/epoch_*.png``) and its resolved config (config.yaml). Every image is embedded as a
base64 ``data:`` URI, so the one HTML file can be mailed or archived; the plots are also written as
PNG files to ``<output stem>_plots/``. The plots need matplotlib, an optional extra
(``pip install 'diffloop[report]'``); without it the report is written without plots, and both the
page and the command say so.

Which keys are plotted, in which section, with which title and band, and where on the x axis, is
the metrics schema's (``diffloop.metrics``); the report spells no key of its own. x axis of every
curve: training epochs completed when the quantity was measured (``Metric.measured``).
    measured on epoch e's samples, drawn before its update (reward_*, monitor_*):   x = e
    measured on epoch e's update (approx_kl, clipfrac, ...):                        x = e + 1
    evaluated after epoch e's update (eval_*; the row with epoch -1 is the base):   x = e + 1
so x = 0 is the base model for both the training and the evaluation reward. Rows may use the
TensorBoard-style aliases of keys (``reward/mean``); keys the schema does not know (from other
versions) are listed on the page, not plotted.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffloop import metrics
from diffloop.errors import CommandParser

REWARD_MEAN = metrics.key("reward_mean")
EVAL_REWARD_MEAN = metrics.key("eval_reward_mean")
EPOCH = metrics.key("epoch")
EVAL_GRID_RE = re.compile(r"^epoch_(\d+)\.png$")


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
    """

    name: str
    path: Path
    config_text: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    grids: list[tuple[str, Path]] = field(default_factory=list)


def eval_grids(run_dir: Path) -> list[tuple[str, Path]]:
    """Before (eval/base.png) and after (the highest eval/epoch_N.png) grids that exist."""
    folder = run_dir / "eval"
    out = []
    if (folder / "base.png").is_file():
        out.append(("before training (base model)", folder / "base.png"))
    epochs = [
        (int(m.group(1)), p)
        for p in folder.glob("epoch_*.png")
        if (m := EVAL_GRID_RE.match(p.name))
    ]
    if epochs:
        epoch, path = max(epochs)
        out.append((f"after epoch {epoch}", path))
    return out


def load_run(run_dir: str | Path, name: str | None = None) -> RunData:
    """Read config.yaml, metrics.jsonl and the eval grids of a run; ValueError if not a run."""
    import yaml

    from diffloop.run_dir import read_metrics

    path = Path(run_dir)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"'{path}' is not a run directory (no config.yaml)")
    text = config_path.read_text()
    return RunData(
        name=name or path.resolve().name,
        path=path,
        config_text=text,
        config=yaml.safe_load(text) or {},
        rows=[metrics.canonical_row(r) for r in read_metrics(path / "metrics.jsonl")],
        grids=eval_grids(path),
    )


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Directory names; parent/name where two runs share a name; "#i" if still not unique."""
    names = [p.resolve().name for p in paths]
    longer = [
        "/".join(p.resolve().parts[-2:]) if names.count(n) > 1 else n
        for p, n in zip(paths, names, strict=True)
    ]
    return [n if longer.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(longer)]


def x_offset(key: str) -> int:
    """Epochs completed at measurement = row epoch + this offset (the schema's ``measured``)."""
    return metrics.get(key).x_offset


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(x, y) of ``key`` over the rows that have it as a number; x per x_offset(key)."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(int(row[EPOCH]) + x_offset(key))
            ys.append(float(value))
    return xs, ys


def logged_keys(runs: Sequence[RunData]) -> set[str]:
    return {k for run in runs for row in run.rows for k in row}


def section_plots(runs: Sequence[RunData], section: str) -> list[tuple[str, str, str | None]]:
    """(key, title, band key or None) of every schema metric the section plots (absent ones are
    skipped when plotting); patterned keys (reward_<component>_mean) as the runs logged them."""
    specs = []
    for key in metrics.section_keys(section, logged_keys(runs)):
        m = metrics.get(key)
        specs.append((key, m.title or key, m.band))
    return specs


def unknown_keys(runs: Sequence[RunData]) -> list[str]:
    """Logged keys the schema does not declare (another diffloop version's): listed, not plotted."""
    return metrics.undeclared(logged_keys(runs))


MISSING_MATPLOTLIB = (
    "matplotlib is not installed, so the report has no plots (summary, images and configs are "
    "there); install the plotting extra with: pip install 'diffloop[report]'"
)


def load_pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend (no display), or None if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def plots_available() -> bool:
    """Whether the report can draw plots (matplotlib, the ``[report]`` extra, imports)."""
    return load_pyplot() is not None


def plot_metric(
    runs: Sequence[RunData], key: str, title: str, band: str | None, path: Path
) -> bool:
    """One PNG: ``key`` against epochs completed, one line per run (+- ``band`` shaded).

    Returns False (and writes nothing) when no run logged ``key``. Needs matplotlib
    (``plots_available()``); ImportError with the install command otherwise.
    """
    plt = load_pyplot()
    if plt is None:
        raise ImportError(MISSING_MATPLOTLIB)
    from matplotlib.ticker import MaxNLocator

    if not any(series(run.rows, key)[0] for run in runs):
        return False
    fig, ax = plt.subplots(figsize=(6.0, 3.4), dpi=100)
    for i, run in enumerate(runs):
        xs, ys = series(run.rows, key)
        if not xs:
            continue
        color = f"C{i % 10}"
        ax.plot(xs, ys, marker="o", markersize=3, color=color, label=run.name)
        if band is not None:
            bx, spread = series(run.rows, band)
            lookup = dict(zip(bx, spread, strict=True))
            pairs = [(x, y, lookup[x]) for x, y in zip(xs, ys, strict=True) if x in lookup]
            if pairs:
                px, py, ps = zip(*pairs, strict=True)
                lo = [y - s for y, s in zip(py, ps, strict=True)]
                hi = [y + s for y, s in zip(py, ps, strict=True)]
                ax.fill_between(px, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs completed")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "n/a" if value is None else html.escape(str(value))


def summary_row(run: RunData) -> list[Any]:
    """Run, algorithm, model, reward, epochs, last training reward, base / last eval reward."""
    cfg = run.config
    train = [r for r in run.rows if r.get(EPOCH, -1) >= 0]
    evals = [r for r in run.rows if EVAL_REWARD_MEAN in r]
    base = next((r[EVAL_REWARD_MEAN] for r in evals if r[EPOCH] == -1), None)
    last = next((r[EVAL_REWARD_MEAN] for r in reversed(evals) if r[EPOCH] >= 0), None)
    reward = cfg.get("reward", {})
    reward_name = reward.get("name") if isinstance(reward, dict) else reward
    return [
        run.name,
        cfg.get("train", {}).get("algorithm"),
        cfg.get("model", {}).get("pretrained"),
        reward_name,
        len(train),
        train[-1].get(REWARD_MEAN) if train else None,
        base,
        last,
    ]


SUMMARY_HEADER = (
    "run",
    "algorithm",
    "model",
    "reward",
    "epochs",
    "last train reward",
    "eval before",
    "eval after",
)
CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1300px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; }
.plots img { width: 600px; max-width: 48%; margin: 4px; border: 1px solid #eee; }
.grids figure { display: inline-block; margin: 8px; vertical-align: top; }
.grids img { width: 560px; max-width: 100%; image-rendering: pixelated; }
pre { background: #f6f6f6; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def _section_plots(title: str, plots: list[tuple[str, Path]], note: str = "") -> str:
    if not plots:
        return ""
    imgs = "\n".join(f'<img alt="{html.escape(k)}" src="{data_uri(p)}">' for k, p in plots)
    return f"<h2>{html.escape(title)}</h2>{note}<div class='plots'>{imgs}</div>"


def render_html(
    runs: Sequence[RunData],
    plot_sections: list[tuple[str, list[tuple[str, Path]]]],
    unknown: Sequence[str] = (),
    plots_note: str = "",
) -> str:
    """The report page: summary, plot sections, before/after grids and configs, images inlined.
    ``unknown``: logged keys the metrics schema does not declare, named so none vanishes silently.
    ``plots_note``: shown in place of the plots (why there are none)."""
    head = "".join(f"<th>{h}</th>" for h in SUMMARY_HEADER)
    body_rows = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in summary_row(r)) + "</tr>" for r in runs
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>diffloop report: {html.escape(', '.join(r.name for r in runs))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>diffloop training report</h1>",
        f"<table><tr>{head}</tr>{body_rows}</table>",
        (
            "<p>x axes: training epochs completed when measured (0 = the base model). Training "
            "rewards are those of each epoch's samples; evaluation uses fixed prompts and noise.</p>"
        ),
    ]
    if plots_note:
        parts.append(f"<p class='no-plots'><b>No plots:</b> {html.escape(plots_note)}</p>")
    parts += [_section_plots(title, plots) for title, plots in plot_sections]
    if unknown:
        names = ", ".join(f"<code>{html.escape(k)}</code>" for k in unknown)
        note = "Logged keys not in this version's metrics schema (not plotted)"
        parts.append(f"<p>{note}: {names}</p>")
    parts.append("<h2>Evaluation images: before and after</h2>")
    for run in runs:
        figures = "".join(
            f"<figure><img alt='{html.escape(caption)}' src='{data_uri(p)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            for caption, p in run.grids
        )
        figures = figures or "no evaluation grids"
        parts.append(f"<h3>{html.escape(run.name)}</h3><div class='grids'>{figures}</div>")
    parts.append("<h2>Resolved configs</h2>")
    for run in runs:
        parts.append(
            f"<h3>{html.escape(run.name)} <small>({html.escape(str(run.path))})</small></h3>"
        )
        parts.append(f"<pre>{html.escape(run.config_text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Write the HTML report and its PNG plots (``<output stem>_plots/``); returns the HTML path.

    Without matplotlib (``plots_available()`` False) the page is written without plots and says so.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, name) for p, name in zip(paths, unique_names(paths), strict=True)]
    output = Path(output)
    plot_dir = output.with_name(output.stem + "_plots")

    def make(specs: Sequence[tuple[str, str, str | None]]) -> list[tuple[str, Path]]:
        made = []
        for key, title, band in specs:
            path = plot_dir / f"{key}.png"
            if plot_metric(runs, key, title, band, path):
                made.append((key, path))
        return made

    plotting = plots_available()
    sections = (
        [(section, make(section_plots(runs, section))) for section in metrics.SECTIONS]
        if plotting
        else []
    )
    note = "" if plotting else MISSING_MATPLOTLIB
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_html(runs, sections, unknown_keys(runs), note), encoding="utf-8")
    return output


def report_main(argv: list[str]) -> int:
    """``diffloop report``; returns the exit code (2 on a usage error, message on stderr)."""
    import sys

    ap = CommandParser(prog="diffloop report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--output", type=Path, default=Path("report.html"))
    args = ap.parse_args(argv)
    try:
        path = write_report(args.run_dirs, args.output)
    except (ValueError, OSError) as e:  # OSError: --output cannot be written
        print(f"diffloop: error: report: {e}", file=sys.stderr)
        return 2
    if not plots_available():
        print(f"diffloop report: warning: {MISSING_MATPLOTLIB}", file=sys.stderr)
        print(f"wrote {path} (without plots)")
        return 0
    print(f"wrote {path} (plots in {path.with_name(path.stem + '_plots')})")
    return 0
