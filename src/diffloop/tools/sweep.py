"""``diffloop compare SWEEP.yaml``: a budget-matched grid of algorithms x settings x seeds.

A sweep file::

    base: shapes.yaml                  # a config path, or the name of a packaged config
    overrides: [eval.every_n_epochs=3] # applied to every run
    budget: {prompts: 192}             # or {reward_queries: 768}: converted to num_epochs per run
    seeds: [0, 1, 2]
    output_dir: runs/shapes_algorithms
    runs:
      - {name: loop_k4, overrides: [train.algorithm=loop, sample.samples_per_prompt=4]}
      - {name: loop, overrides: [train.algorithm=loop], grid: {sample.samples_per_prompt: [2, 4]}}

A run with a ``grid`` expands into the cross product of its values (named
``loop-samples_per_prompt2``, ...). Every (run, seed) is a normal run directory
``output_dir/<name>/seed_<s>/``, trained one after another in the same process. The sweep
resumes as a whole: a finished run (its metrics hold the last epoch and its final export exists)
is skipped, an unfinished one with a checkpoint continues with ``resume=true``, any other starts
fresh.

Budgets are matched explicitly. With ``prompts: N`` every run trains on N prompt draws, so
``num_epochs = N / sample.prompts_per_epoch`` (an algorithm with K samples per prompt then spends
K x N reward queries); with ``reward_queries: N`` every run queries the reward N times,
``num_epochs = N / (prompts_per_epoch * samples_per_prompt)``. A budget that does not divide is an
error.

``--jobs N`` trains N shards (``--shard i/N``) at once as child processes, each with
``OMP_NUM_THREADS = max(1, cores // N)`` (which ``cpu_threads: auto`` reads), so that N runs never
ask for more threads than the machine has cores; N = cores gives single-thread runs.

The summary (``summary.json``, ``summary.md``, three plots) compares held-out reward
(``eval_reward_mean``, fixed prompts and noise) per run name, as mean +- standard error over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import gc
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffloop import metrics
from diffloop.config import Config, ConfigError, load_config, load_yaml
from diffloop.errors import CommandParser
from diffloop.preflight import check_before_loading
from diffloop.resume import RESUME_MAY_CHANGE, config_changes, covered
from diffloop.run_dir import read_metrics

# The metrics.jsonl keys a sweep reads (declared in diffloop.metrics).
EPOCH = metrics.key("epoch")
EVAL_REWARD = metrics.key("eval_reward_mean")
PROMPTS_SEEN = metrics.key("prompts_seen")
REWARD_QUERIES = metrics.key("reward_queries")
EPOCH_TIME = metrics.key("epoch_time_s")

SWEEP_KEYS = ("base", "overrides", "budget", "runs", "seeds", "output_dir")
RUN_KEYS = ("name", "overrides", "grid")
BUDGET_KINDS = ("prompts", "reward_queries")
NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# Settings that change speed or memory but not what a run computes: a resumed run may differ in
# these. A sweep also reruns a run with more epochs and another thread count
# (diffloop.resume.covered's section names: "logging" covers logging.*).
RESUME_COMPATIBLE = (*RESUME_MAY_CHANGE, "num_epochs", "cpu_threads")


class SweepError(ConfigError):
    """A sweep file or a sweep directory is invalid; the message names the key and the fix."""


# ----------------------------------------------------------------------------- the sweep file


@dataclass(frozen=True)
class Budget:
    """What every run of the sweep spends: ``amount`` prompt draws or reward queries."""

    kind: str
    amount: int

    def epochs_for(self, prompts_per_epoch: int, samples_per_prompt: int, name: str) -> int:
        """num_epochs = N / B (prompts) or N / (B K) (reward queries); must divide exactly."""
        per_epoch = prompts_per_epoch * (samples_per_prompt if self.kind == "reward_queries" else 1)
        if self.amount % per_epoch:
            what = "sample.prompts_per_epoch" + (
                " * sample.samples_per_prompt" if self.kind == "reward_queries" else ""
            )
            raise SweepError(
                f"budget {self.kind}={self.amount} is not a whole number of epochs for "
                f"run '{name}': {what} = "
                f"{per_epoch} per epoch ({self.amount / per_epoch:g} epochs). Change "
                "the budget to a multiple "
                f"of {per_epoch} or the run's sample.prompts_per_epoch"
            )
        return self.amount // per_epoch

    def describe(self) -> str:
        if self.kind == "prompts":
            return (
                f"matched training prompts: every run trains on {self.amount} prompt draws "
                "(reward queries = prompts x samples per prompt, so they differ with K)"
            )
        return (
            f"matched reward queries: every run queries the reward {self.amount} times "
            "(training prompts = queries / samples per prompt, so they differ with K)"
        )

    @property
    def axis(self) -> str:
        """The metrics.jsonl key the budget counts."""
        return PROMPTS_SEEN if self.kind == "prompts" else REWARD_QUERIES


@dataclass(frozen=True)
class RunSpec:
    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Sweep:
    path: Path
    base: str
    overrides: tuple[str, ...]
    budget: Budget
    runs: tuple[RunSpec, ...]
    seeds: tuple[int, ...]
    output_dir: Path


@dataclass(frozen=True)
class PlannedRun:
    """One (run, seed) of the grid with its resolved numbers."""

    name: str
    seed: int
    output_dir: Path
    overrides: tuple[str, ...]
    """Every override on top of the base config, in order (common, run's, command line, sweep's
    own)."""
    algorithm: str
    prompts_per_epoch: int
    samples_per_prompt: int
    num_epochs: int

    @property
    def prompts(self) -> int:
        return self.num_epochs * self.prompts_per_epoch

    @property
    def reward_queries(self) -> int:
        return self.prompts * self.samples_per_prompt


def _packaged(folder: str, name: str) -> Path:
    return Path(str(resources.files("diffloop") / folder / name))


def resolve_sweep_path(path: str | Path) -> Path:
    """A sweep file path, or the name of a packaged sweep (``shapes_algorithms.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    if (packaged := _packaged("sweeps", str(path))).is_file():
        return packaged
    raise SweepError(
        f"sweep file '{path}' does not exist (nor is it a packaged sweep in diffloop/sweeps/)"
    )


def _resolve_base(base: str, sweep_dir: Path) -> str:
    """The base config: a path (as given, or relative to the sweep file), else a packaged config."""
    for candidate in (Path(base), sweep_dir / base, _packaged("configs", base)):
        if candidate.is_file():
            return str(candidate)
    raise SweepError(
        f"base config '{base}' not found as a path, next to the sweep file, or as a packaged config"
    )


def _string_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise SweepError(f"{where} must be a list of 'key.sub=value' strings, got {value!r}")
    return tuple(value)


def _check_keys(data: dict, allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise SweepError(
                f"unknown key '{key}' in {where}.{hint} Valid keys: {', '.join(allowed)}"
            )


def _parse_budget(value: Any) -> Budget:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in BUDGET_KINDS:
        raise SweepError(f"budget must be {{prompts: N}} or {{reward_queries: N}}, got {value!r}")
    kind, amount = next(iter(value.items()))
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        raise SweepError(f"budget.{kind} must be a positive integer, got {amount!r}")
    return Budget(kind, amount)


def _grid_suffix(key: str, value: Any) -> str:
    text = str(value).replace("/", "_").replace(" ", "")
    return f"{key.split('.')[-1]}{text}"


def expand_run(entry: Any, index: int) -> list[RunSpec]:
    """One ``runs:`` entry -> its RunSpecs (a ``grid`` gives the cross product of its values)."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise SweepError(f"runs[{index}] must be a mapping with a 'name', got {entry!r}")
    _check_keys(entry, RUN_KEYS, f"runs[{index}]")
    name, overrides = (
        str(entry["name"]),
        _string_list(entry.get("overrides"), f"runs[{index}].overrides"),
    )
    grid = entry.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(
            f"runs[{index}].grid must map config keys to non-empty lists of values, got {grid!r}"
        )
    specs = []
    for values in itertools.product(*grid.values()):
        pairs = list(zip(grid, values))
        full_name = "-".join([name, *(_grid_suffix(k, v) for k, v in pairs)])
        specs.append(
            RunSpec(full_name, overrides + tuple(f"{k}={_yaml_scalar(v)}" for k, v in pairs))
        )
    return specs


def _yaml_scalar(value: Any) -> str:
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def load_sweep(path: str | Path, output_dir: str | Path | None = None) -> Sweep:
    """Read and check a sweep file (no config is resolved yet; see :func:`plan`)."""
    p = resolve_sweep_path(path)
    try:
        data = load_yaml(p.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"sweep file '{p}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep file '{p}' must hold a mapping with keys {', '.join(SWEEP_KEYS)}")
    _check_keys(data, SWEEP_KEYS, f"sweep file '{p}'")
    for key in ("budget", "runs"):
        if key not in data:
            raise SweepError(f"sweep file '{p}' needs '{key}'")
    runs_raw = data["runs"]
    if not isinstance(runs_raw, list) or not runs_raw:
        raise SweepError("runs must be a non-empty list of {name, overrides} entries")
    runs = tuple(spec for i, entry in enumerate(runs_raw) for spec in expand_run(entry, i))
    names = [r.name for r in runs]
    for name in names:
        if not NAME_RE.match(name):
            raise SweepError(
                f"run name '{name}' may use only letters, digits and _ . + - (it names a directory)"
            )
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise SweepError(f"run names must be unique; repeated: {', '.join(dup)}")
    seeds = data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and s >= 0 for s in seeds)
    ):
        raise SweepError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"seeds must be distinct, got {seeds}")
    out = output_dir if output_dir is not None else data.get("output_dir") or f"runs/{p.stem}"
    return Sweep(
        path=p,
        base=_resolve_base(str(data.get("base", "shapes.yaml")), p.parent),
        overrides=_string_list(data.get("overrides"), "overrides"),
        budget=_parse_budget(data["budget"]),
        runs=runs,
        seeds=tuple(seeds),
        output_dir=Path(out),
    )


def plan(sweep: Sweep, extra_overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """Resolve every (run, seed): its config, and num_epochs from the budget. Seed-major order, so
    that a partly finished sweep holds whole seeds of every run. Validates every config; loads no
    model."""
    planned = []
    for seed in sweep.seeds:
        for run in sweep.runs:
            out = sweep.output_dir / run.name / f"seed_{seed}"
            overrides = (
                *sweep.overrides,
                *run.overrides,
                *extra_overrides,
                f"seed={seed}",
                f"output_dir={out}",
            )
            if clash := [o for o in overrides if o.split("=", 1)[0].strip() == "num_epochs"]:
                raise SweepError(
                    f"run '{run.name}' sets {clash[0]}: the sweep's budget decides "
                    "num_epochs; remove it"
                )
            try:
                config = load_config(sweep.base, list(overrides))
                check_before_loading(config)  # what train checks before a model loads
            except ConfigError as e:
                raise SweepError(f"run '{run.name}' (seed {seed}): {e}") from None
            if not config.eval.prompts:
                raise SweepError(
                    f"run '{run.name}': eval.prompts is null; a sweep compares held-out reward, "
                    "so set eval.prompts (e.g. shapes/val_pair)"
                )
            s = config.sample
            epochs = sweep.budget.epochs_for(s.prompts_per_epoch, s.samples_per_prompt, run.name)
            planned.append(PlannedRun(
                name=run.name, seed=seed, output_dir=out, overrides=(*overrides,
                                                                     f"num_epochs={epochs}"),
                algorithm=config.train.algorithm, prompts_per_epoch=s.prompts_per_epoch,
                samples_per_prompt=s.samples_per_prompt, num_epochs=epochs,
            ))  # fmt: skip
    return planned


# ----------------------------------------------------------------------------- running


def run_status(run: PlannedRun) -> str:
    """``finished`` (metrics hold the last epoch and the final export exists), ``resume`` (a
    complete checkpoint exists) or ``new``."""
    from diffloop.checkpoint import latest_checkpoint

    rows = read_metrics(run.output_dir / "metrics.jsonl")
    last = max((r.get(EPOCH, -1) for r in rows), default=-1)
    if last >= run.num_epochs:
        raise SweepError(
            f"'{run.output_dir}' trained {last + 1} epochs, more than this sweep's budget gives "
            f"({run.num_epochs}); delete it or give the sweep another output_dir"
        )
    exported = any((run.output_dir / d).is_dir() for d in ("lora", "model"))
    if exported and last == run.num_epochs - 1:
        return "finished"
    return "resume" if latest_checkpoint(run.output_dir) is not None else "new"


def config_differences(saved: Config, wanted: Config) -> list[str]:
    """Settings (other than speed/memory knobs) in which a run directory's config differs from the
    plan."""
    return [
        f"{k}: {old!r} -> {new!r}"
        for k, (old, new) in config_changes(saved, wanted).items()
        if not covered(k, RESUME_COMPATIBLE)
    ]


def check_compatible(run: PlannedRun, config: Config) -> None:
    """A run directory that will be skipped or resumed must hold the same run (else results would
    mix)."""
    saved_path = run.output_dir / "config.yaml"
    if not saved_path.is_file():
        return
    diffs = config_differences(load_config(saved_path), config)
    if diffs:
        raise SweepError(
            f"'{run.output_dir}' holds a run with other settings "
            f"({'; '.join(diffs[:4])}); delete that directory "
            "or give the sweep another output_dir"
        )


def execute(
    runs: Sequence[PlannedRun], base: str, log: Callable[[str], None] = print
) -> dict[str, int]:
    """Train every unfinished run in order, in this process; returns counts of
    skipped/resumed/new."""
    from diffloop.trainer import Trainer

    counts = {"finished": 0, "resume": 0, "new": 0}
    for i, run in enumerate(runs):
        status = run_status(run)
        counts[status] += 1
        config = load_config(base, [*run.overrides, f"resume={status == 'resume'}"])
        if status != "new":
            check_compatible(run, config)
        if status == "finished":
            log(f"[{i + 1}/{len(runs)}] {run.name} seed {run.seed}: finished, skipped")
            continue
        log(
            f"[{i + 1}/{len(runs)}] {run.name} seed {run.seed}: "
            f"{'resuming' if status == 'resume' else 'starting'}"
            f" ({run.num_epochs} epochs) in {run.output_dir}"
        )
        trainer = Trainer(config, argv=["diffloop", "compare", "--run", run.name, *run.overrides])
        trainer.train()
        del trainer
        _free_memory()
    return counts


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


# ----------------------------------------------------------------------------- statistics (pure)


@dataclass(frozen=True)
class Curve:
    """One run's held-out reward curve: eval points (the base evaluation first, at 0 / 0 / 0)."""

    prompts: tuple[float, ...]
    reward_queries: tuple[float, ...]
    time_s: tuple[float, ...]
    """Training wall-clock at the point: cumulative epoch_time_s (sampling, reward, training;
    evaluation, model loading and checkpointing excluded)."""
    reward: tuple[float, ...]

    def axis(self, key: str) -> tuple[float, ...]:
        return {
            PROMPTS_SEEN: self.prompts,
            REWARD_QUERIES: self.reward_queries,
            "time_s": self.time_s,
        }[key]


def curve_from_metrics(rows: Sequence[dict[str, Any]]) -> Curve:
    """metrics.jsonl rows -> the eval curve. The epoch -1 row is the base model (x = 0)."""
    prompts, queries, times, rewards = [], [], [], []
    elapsed = 0.0
    for r in sorted(map(metrics.canonical_row, rows), key=lambda r: r[EPOCH]):
        if r[EPOCH] >= 0:
            elapsed += float(r.get(EPOCH_TIME, 0.0))
        if EVAL_REWARD not in r:
            continue
        base = r[EPOCH] < 0
        prompts.append(0.0 if base else float(r[PROMPTS_SEEN]))
        queries.append(0.0 if base else float(r[REWARD_QUERIES]))
        times.append(elapsed)
        rewards.append(float(r[EVAL_REWARD]))
    return Curve(tuple(prompts), tuple(queries), tuple(times), tuple(rewards))


def trapezoid_auc(x: Sequence[float], y: Sequence[float], x_end: float) -> float:
    """Normalised area under y(x) from 0 to x_end, by the trapezoid rule:

        AUC = 1/x_end * sum_i (x_{i+1} - x_i) (y_i + y_{i+1}) / 2,   x_0 = 0, x_last = x_end

    i.e. the average held-out reward over training (a constant curve y = c has AUC c).
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need >= 2 points with matching x and y, got {len(x)} and {len(y)}")
    if x[0] != 0 or not math.isclose(x[-1], x_end) or any(b <= a for a, b in itertools.pairwise(x)):
        raise ValueError(f"x must increase from 0 to x_end={x_end}, got {list(x)}")
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(x, x[1:], y, y[1:]))
    return area / x_end


def mean_sem(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean, sem = std(ddof=1) / sqrt(n); sem is None for n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(
    runs: Sequence[PlannedRun], curves: dict[tuple[str, int], Curve], budget: Budget
) -> dict[str, Any]:
    """Per run name: base, final, final - base (paired per seed), AUC on the budget's axis and
    training wall-clock, each as mean +- sem over the seeds whose run has finished (``curves``'
    keys)."""
    by_name: dict[str, list[PlannedRun]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    rows = []
    for name, group in by_name.items():
        done = [curves[(r.name, r.seed)] for r in group if (r.name, r.seed) in curves]
        first = group[0]
        row: dict[str, Any] = {
            "name": name, "algorithm": first.algorithm,
            "samples_per_prompt": first.samples_per_prompt,
            "prompts_per_epoch": first.prompts_per_epoch, "num_epochs": first.num_epochs,
            "prompts": first.prompts, "reward_queries": first.reward_queries,
            "seeds": [r.seed for r in group if (r.name, r.seed) in curves],
            "seeds_planned": len(group),
        }  # fmt: skip
        x_end = first.prompts if budget.kind == "prompts" else first.reward_queries
        stats = {
            "base": [c.reward[0] for c in done],
            "final": [c.reward[-1] for c in done],
            "gain": [c.reward[-1] - c.reward[0] for c in done],
            "auc": [trapezoid_auc(c.axis(budget.axis), c.reward, x_end) for c in done],
            "wallclock_s": [c.time_s[-1] for c in done],
        }
        for key, values in stats.items():
            row[key], row[f"{key}_sem"] = mean_sem(values)
        rows.append(row)
    return {
        "budget": {"kind": budget.kind, "amount": budget.amount, "text": budget.describe()},
        "runs": rows,
    }


# ----------------------------------------------------------------------------- reporting


def _fmt(mean: float, sem: float | None, digits: int = 4) -> str:
    if math.isnan(mean):  # no finished seed
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sem:.{digits}f}" if sem is not None else "")


def summary_markdown(summary: dict[str, Any], sweep: Sweep, eval_text: str) -> str:
    lines = [
        f"# Sweep `{sweep.path.name}`",
        "",
        f"**Budget:** {summary['budget']['text']}.",
        "",
        (
            f"Held-out reward: {eval_text}. Mean ± standard error over seeds. AUC: area under the "
            f"held-out reward curve against {summary['budget']['kind'].replace('_', ' ')} consumed "
            "(trapezoid over the eval points, divided by the budget: the reward averaged over "
            "training). Wall-clock: training time (sampling, reward, updates; evaluation excluded)."
        ),
        "",
        (
            "| run | algorithm | K | epochs | prompts | reward queries | seeds | base | final "
            "| final − base | AUC | wall-clock (s) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        lines.append(
            f"| {r['name']} | {r['algorithm']} | {r['samples_per_prompt']} | "
            f"{r['num_epochs']} | {r['prompts']} "
            f"| {r['reward_queries']} | {len(r['seeds'])}/{r['seeds_planned']} | "
            f"{_fmt(r['base'], r['base_sem'])} "
            f"| {_fmt(r['final'], r['final_sem'])} | {_fmt(r['gain'], r['gain_sem'])} "
            f"| {_fmt(r['auc'], r['auc_sem'])} "
            f"| {_fmt(r['wallclock_s'], r['wallclock_s_sem'], 0)} |"
        )
    plots = [f"![held-out reward vs {label}]({filename})" for _, label, filename in PLOTS]
    lines += ["", " ".join(plots), ""]
    return "\n".join(lines)


PLOTS = (
    (PROMPTS_SEEN, "training prompts consumed", "eval_vs_prompts.png"),
    (REWARD_QUERIES, "reward queries", "eval_vs_queries.png"),
    ("time_s", "training wall-clock (s)", "eval_vs_time.png"),
)


def mean_curve(curves: Sequence[Curve], axis: str) -> tuple[list[float], list[float], list[float]]:
    """Across seeds (same eval schedule): mean x, mean y and sem of y at each eval point."""
    n = min(len(c.reward) for c in curves)
    xs = [mean_sem([c.axis(axis)[i] for c in curves])[0] for i in range(n)]
    ys = [mean_sem([c.reward[i] for c in curves]) for i in range(n)]
    return xs, [m for m, _ in ys], [s or 0.0 for _, s in ys]


def write_plots(
    runs: Sequence[PlannedRun], curves: dict[tuple[str, int], Curve], out_dir: Path, budget: Budget
) -> list[Path]:
    """Held-out reward against prompts, reward queries and wall-clock: mean line, +- sem band per
    run."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    names = list(dict.fromkeys(r.name for r in runs))
    written = []
    for axis, label, filename in PLOTS:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.subplots()
        for name in names:
            group = [
                curves[(r.name, r.seed)]
                for r in runs
                if r.name == name and (r.name, r.seed) in curves
            ]
            if not group:
                continue
            x, y, sem = mean_curve(group, axis)
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=f"{name} (n={len(group)})")
            ax.fill_between(
                x,
                [a - b for a, b in zip(y, sem)],
                [a + b for a, b in zip(y, sem)],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
        ax.set_xlabel(label)
        ax.set_ylabel(f"held-out reward ({EVAL_REWARD})")
        ax.set_title(
            f"budget: {budget.amount} {budget.kind.replace('_', ' ')} per run", fontsize=10
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=120)
        written.append(path)
    return written


def _eval_text(base: str, run: PlannedRun) -> str:
    c = load_config(base, list(run.overrides))
    e = c.eval
    return (
        f"`{EVAL_REWARD}` on the first {e.num_prompts} prompts of {e.prompts} x "
        f"{e.samples_per_prompt} "
        f"images (fixed noise), {c.sample.num_steps} DDIM steps, evaluated before training"
        + (f", every {e.every_n_epochs} epochs" if e.every_n_epochs else "")
        + " and after the last epoch"
    )


def write_summary(sweep: Sweep, runs: Sequence[PlannedRun]) -> dict[str, Any]:
    """Summary of the finished runs: ``summary.json``, ``summary.md`` and the plots in the sweep
    directory."""
    curves = {
        (r.name, r.seed): curve_from_metrics(read_metrics(r.output_dir / "metrics.jsonl"))
        for r in runs
        if run_status(r) == "finished"
    }
    summary = summarize(runs, curves, sweep.budget)
    summary["sweep"] = str(sweep.path)
    summary["base"] = sweep.base
    summary["curves"] = {f"{n}/seed_{s}": dataclasses.asdict(c) for (n, s), c in curves.items()}
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(sweep.output_dir / "summary.json", json.dumps(summary, indent=2))
    _atomic_write(
        sweep.output_dir / "summary.md",
        summary_markdown(summary, sweep, _eval_text(sweep.base, runs[0])),
    )
    write_plots(runs, curves, sweep.output_dir, sweep.budget)
    return summary


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def print_plan(
    sweep: Sweep, runs: Sequence[PlannedRun], log: Callable[[str], None] = print
) -> None:
    log(f"sweep {sweep.path} -> {sweep.output_dir}")
    log(f"base config {sweep.base}; budget: {sweep.budget.describe()}")
    log(
        f"{'run':<28} {'seed':>4} {'algorithm':<14} {'K':>2} {'B':>4} {'epochs':>6} "
        f"{'prompts':>8} {'queries':>8}  status"
    )
    for r in runs:
        log(
            f"{r.name:<28} {r.seed:>4} {r.algorithm:<14} {r.samples_per_prompt:>2} "
            f"{r.prompts_per_epoch:>4} "
            f"{r.num_epochs:>6} {r.prompts:>8} {r.reward_queries:>8}  {run_status(r)}"
        )
    log(f"{len(runs)} runs ({len({r.name for r in runs})} settings x {len(sweep.seeds)} seeds)")


def _parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise SweepError(f"--shard must be I/N with 0 <= I < N, got '{text}'")
    return int(m.group(1)), int(m.group(2))


def shard_runs(runs: Sequence[PlannedRun], index: int, count: int) -> list[PlannedRun]:
    """The runs shard ``index`` of ``count`` trains, balanced by cost (reward queries).

    Greedy longest-first assignment to the least-loaded shard: a plain ``runs[i::n]`` would give one
    shard every K = 4 run of a grid whose settings alternate K. Deterministic, so independent
    processes agree on the partition without talking to each other. Order within a shard is the
    grid's order.
    """
    loads = [0] * count
    owner: dict[int, int] = {}
    by_cost = sorted(range(len(runs)), key=lambda j: (-runs[j].reward_queries, j))
    for j in by_cost:
        shard = min(range(count), key=lambda s: (loads[s], s))
        owner[j] = shard
        loads[shard] += runs[j].reward_queries
    return [r for j, r in enumerate(runs) if owner[j] == index]


def threads_per_job(cores: int, jobs: int) -> int:
    """Torch threads for each of ``jobs`` parallel runs on ``cores`` cores: max(1, cores // jobs).

    jobs x threads <= cores whenever jobs <= cores, so the runs never oversubscribe the CPU (an
    OpenMP thread spin-waiting for a busy core makes everyone slower); jobs = cores gives
    single-thread runs, the fastest use of a CPU for a small model (no synchronisation at all).
    """
    if cores < 1 or jobs < 1:
        raise ValueError(f"cores and jobs must be >= 1, got cores={cores}, jobs={jobs}")
    return max(1, cores // jobs)


def shard_command(sweep: Sweep, index: int, jobs: int, overrides: Sequence[str]) -> list[str]:
    """The ``diffloop compare --shard index/jobs`` child process one ``--jobs`` job runs."""
    import sys

    return [sys.executable, "-m", "diffloop", "compare", str(sweep.path), "--shard",
            f"{index}/{jobs}",
            "--output-dir", str(sweep.output_dir), "--no-summary", *overrides]  # fmt: skip


def run_parallel(
    sweep: Sweep, jobs: int, overrides: Sequence[str], log: Callable[[str], None] = print
) -> int:
    """Train the sweep as ``jobs`` shard processes at once (``shard_runs`` balances them), each with
    OMP_NUM_THREADS = ``threads_per_job`` (read by ``cpu_threads: auto``); each writes its own log
    ``<output_dir>/jobs/shard_<i>.log``. Returns the number of shards that failed."""
    import subprocess

    from diffloop.config import available_cores

    cores = available_cores()
    threads = threads_per_job(cores, jobs)
    if jobs > cores:
        log(f"warning: --jobs {jobs} runs more processes than the {cores} available cores; "
            f"they will share cores (use --jobs {cores} or fewer)")  # fmt: skip
    log(f"{jobs} parallel jobs x {threads} thread(s) on {cores} cores")
    log_dir = sweep.output_dir / "jobs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    children = []
    for i in range(jobs):
        path = log_dir / f"shard_{i}.log"
        with open(path, "w", encoding="utf-8") as out:  # the child keeps its own descriptor
            children.append((i, path, subprocess.Popen(
                shard_command(sweep, i, jobs, overrides), stdout=out, stderr=subprocess.STDOUT,
                env=env,
            )))  # fmt: skip
    failed = 0
    for i, path, child in children:
        if child.wait() != 0:
            failed += 1
            log(f"shard {i}/{jobs} failed (exit {child.returncode}); see {path}")
    return failed


# The module docstring after its first line is the help's epilog (markup stripped by CommandParser).
COMPARE_EPILOG = (
    __doc__.split("\n\n", 1)[1].rstrip()
    + "\n\nexample:\n  diffloop compare shapes_algorithms.yaml --dry-run\n"
)


def compare_main(argv: list[str]) -> int:
    """``diffloop compare SWEEP.yaml [--dry-run | --summary-only] [--output-dir DIR]
    [--shard I/N] [k=v ...]``."""
    ap = CommandParser(
        prog="diffloop compare",
        description="Train a budget-matched grid of algorithms x settings x seeds, one run "
        "directory each, and compare\ntheir held-out reward.",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "sweep", help="sweep YAML file, or the name of a packaged sweep (shapes_algorithms.yaml)"
    )
    ap.add_argument(
        "overrides", nargs="*", help="key.sub=value applied to every run (after the sweep's own)"
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="print the expanded grid with epochs, prompts, queries",
    )
    ap.add_argument(
        "--summary-only", action="store_true", help="recompute the summary from finished runs"
    )
    ap.add_argument("--output-dir", default=None, help="overrides the sweep's output_dir")
    ap.add_argument(
        "--shard",
        default=None,
        help="I/N: train only shard I of N, shards balanced by reward queries (several "
        "processes sharing a GPU or CPU cores); the summary covers whatever has finished",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train N shards at once as child processes, each with cores // N threads (N = the "
        "number of cores: single-thread runs); never more threads than cores",
    )
    ap.add_argument(
        "--no-summary",
        action="store_true",
        help="train only, write no summary (the --jobs children: their parent writes it)",
    )
    args = ap.parse_intermixed_args(argv)
    if args.jobs < 1 or (args.jobs > 1 and args.shard):
        raise SweepError(
            f"--jobs must be >= 1 and cannot be combined with --shard (got --jobs {args.jobs})"
        )
    sweep = load_sweep(args.sweep, args.output_dir)
    runs = plan(sweep, args.overrides)
    if args.dry_run:
        print_plan(sweep, runs)
        return 0
    failed = 0
    if args.jobs > 1 and not args.summary_only:
        print(f"budget: {sweep.budget.describe()}")
        failed = run_parallel(sweep, args.jobs, args.overrides)
    elif not args.summary_only:
        todo = runs
        if args.shard:
            i, n = _parse_shard(args.shard)
            todo = shard_runs(runs, i, n)
        print(f"budget: {sweep.budget.describe()}")
        counts = execute(todo, sweep.base)
        print(
            f"sweep: {counts['finished']} already finished, {counts['resume']} "
            f"resumed, {counts['new']} started"
        )
    if args.no_summary:
        return 0
    summary = write_summary(sweep, runs)
    print(
        f"wrote {sweep.output_dir / 'summary.md'} "
        f"({sum(len(r['seeds']) for r in summary['runs'])}/{len(runs)} "
        "runs finished)"
    )
    return 1 if failed else 0
