"""``diffloop report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page about training runs.

The page holds, for the runs given (several runs share each plot, one colour per run: seeds or
variants side by side): a summary row per run; the curves of their metrics.jsonl (the training
reward with its spread, the held-out reward with its standard error, KL to the base model, clip
fraction, ratio mean, approximate KL and the other logged statistics); the held-out breakdown (per
attribute and seen / unseen combinations, for the shapes world's reward); the evaluation images
(eval/before_after.png, the labelled eval/<tag>.npz images with prompts and scores, the PNG grids);
and each run's resolved config. Every image is embedded as a base64 ``data:`` URI, so the one HTML
file can be mailed or archived; the plots are also written as PNG files to ``<output stem>_plots/``.
The plots use matplotlib, a dependency of diffloop.

Which keys are plotted, in which section, with which title and band, and where on the x axis, is
the metrics schema's (``diffloop.metrics``); the report spells no key of its own. Curve data and
bands: ``diffloop.tools.report_curves``; the page: ``diffloop.tools.report_page``. Rows may use the
TensorBoard-style aliases of keys (``reward/mean``); keys the schema does not know (from other
versions) are listed on the page, not plotted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffloop import metrics
from diffloop.errors import CommandParser, DiffloopError
from diffloop.tools.report_curves import (
    band_label,
    metric_curve,
    plot_curves,
    series,
    x_offset,
)
from diffloop.tools.report_page import RunData, eval_files, render_html

__all__ = ["RunData", "load_run", "report_main", "series", "unique_names", "write_report",
           "x_offset"]  # fmt: skip


def eval_grids(run_dir: Path) -> list[tuple[str, Path]]:
    """Before (eval/base.png) and after (the highest eval/epoch_N.png) grids that exist."""
    found = eval_files(run_dir, "png")
    before = [f for f in found if f[1].name == "base.png"]
    after = [f for f in found if f[1].name != "base.png"][-1:]
    return before + after


def eval_image_count(config: dict[str, Any]) -> int | None:
    """eval.num_prompts x eval.samples_per_prompt of a resolved config, None if not both given."""
    e = config.get("eval")
    if not isinstance(e, dict):
        return None
    n, k = e.get("num_prompts"), e.get("samples_per_prompt")
    return n * k if isinstance(n, int) and isinstance(k, int) else None


def load_run(run_dir: str | Path, name: str | None = None) -> RunData:
    """Read config.yaml, metrics.jsonl and the eval grids of a run; ValueError if not a run."""
    import yaml

    from diffloop.run_dir import read_metrics

    path = Path(run_dir)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"'{path}' is not a run directory (no config.yaml)")
    text = config_path.read_text()
    config = yaml.safe_load(text) or {}
    return RunData(
        name=name or path.resolve().name,
        path=path,
        config_text=text,
        config=config,
        rows=[metrics.canonical_row(r) for r in read_metrics(path / "metrics.jsonl")],
        grids=eval_grids(path),
        eval_images=eval_image_count(config),
    )


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Directory names; parent/name where two runs share a name; "#i" if still not unique."""
    names = [p.resolve().name for p in paths]
    longer = [
        "/".join(p.resolve().parts[-2:]) if names.count(n) > 1 else n
        for p, n in zip(paths, names, strict=True)
    ]
    return [n if longer.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(longer)]


def logged_keys(runs: Sequence[RunData]) -> set[str]:
    return {k for run in runs for row in run.rows for k in row}


def section_plots(runs: Sequence[RunData], section: str) -> list[tuple[str, str]]:
    """(key, title) of every schema metric the section plots (absent ones are skipped when
    plotting); patterned keys (reward_<component>_mean) as the runs logged them."""
    return [
        (key, metrics.get(key).title or key)
        for key in metrics.section_keys(section, logged_keys(runs))
    ]


def unknown_keys(runs: Sequence[RunData]) -> list[str]:
    """Logged keys the schema does not declare (another diffloop version's): listed, not plotted."""
    return metrics.undeclared(logged_keys(runs))


def plot_metric(runs: Sequence[RunData], key: str, title: str, path: Path) -> bool:
    """One PNG: ``key`` against epochs completed, one line per run with the schema's band.
    Returns False (and writes nothing) when no run logged ``key``."""
    curves = []
    for index, run in enumerate(runs):  # the colour follows the run's place, logged or not
        curve = metric_curve(run.rows, key, run.eval_images)
        if curve.x:
            extra = band_label(key, run.eval_images, run.rows)
            curves.append((f"{run.name} ({extra})" if extra else run.name, curve, index))
    if not curves:
        return False
    plot_curves(curves, title, key, path)
    return True


def write_report(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Write the HTML report and its PNG plots (``<output stem>_plots/``); returns the HTML path."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, name) for p, name in zip(paths, unique_names(paths), strict=True)]
    output = Path(output)
    plot_dir = output.with_name(output.stem + "_plots")
    sections = []
    for section in metrics.SECTIONS:
        made = []
        for key, title in section_plots(runs, section):
            path = plot_dir / f"{key}.png"
            if plot_metric(runs, key, title, path):
                made.append((key, path))
        sections.append((section, made))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_html(runs, sections, unknown_keys(runs)), encoding="utf-8")
    return output


def report_main(argv: list[str]) -> int:
    """``diffloop report``; returns the exit code (2 on a usage error, message on stderr)."""
    import sys

    ap = CommandParser(
        prog="diffloop report",
        description="Write one self-contained HTML page about training runs (several runs share "
        "each plot, one colour per run): a summary row per run, the curves of their metrics, the "
        "held-out evaluation's breakdown and images before / after training, and each run's "
        "resolved config. Images are embedded, so the one file can be mailed or archived; the "
        "plots are also written as PNG files to <output stem>_plots/.",
    )
    ap.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="a training run directory (the output_dir of diffloop train); several are compared",
    )
    ap.add_argument(
        "--output",
        type=Path,
        default=Path("report.html"),
        help="the HTML file to write (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    try:
        path = write_report(args.run_dirs, args.output)
    except (ValueError, OSError, DiffloopError) as e:  # OSError: --output cannot be written
        print(f"diffloop: error: report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (plots in {path.with_name(path.stem + '_plots')})")
    return 0
