"""Verdicts on the LOOP paper's claims from a finished sweep and a variance measurement (markdown).

    python -m diffloop.tools.claims SUMMARY.json [VARIANCE.json [RUNS_DIR]] [--broad EVAL.json ...]
    e.g. runs/shapes_algorithms/summary.json runs/shapes_algorithms/variance_init.json
         runs/shapes_algorithms

With --broad, the same comparisons on a second, larger evaluation of every trained model
(``diffloop eval`` of the base model and the runs on all held-out prompts with other noise; see
broad_lines) and, for each, how much of the seed-to-seed spread is that evaluation's own noise.

With RUNS_DIR, a table of what each setting did per run (optimizer steps, mean clip fraction) is
added: the settings differ in how many gradient steps the same prompts buy, which the verdicts must
be read with.

Every comparison is paired by seed (runs with the same seed share the evaluation prompts and noise):
d_s = metric_a(seed s) - metric_b(seed s), reported as mean +- standard error over seeds. Verdict by
a two-sided paired t-test at 5%: "holds" when mean > t * s.e., "contradicted" when mean < -t * s.e.
(t = 4.30, 3.18, 2.78 for 3, 4, 5 seeds), otherwise "not resolved at this budget" (the sign alone is
noise). scripts/make_results.sh appends the output to docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffloop import metrics
from diffloop.run_dir import read_metrics
from diffloop.shapes.world import uses_unseen_combination
from diffloop.tools.sweep import mean_sem, trapezoid_auc

# Two-sided 5% critical values of Student's t by degrees of freedom (seeds - 1).
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
              9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t_critical(dof: int) -> float:
    usable = [d for d in T_CRITICAL if d <= dof]
    return T_CRITICAL[max(usable)] if usable else math.inf  # conservative between table entries


def verdict(mean: float, sem: float, n: int) -> str:
    if n < 2 or math.isnan(sem):
        return "one seed: no verdict"
    t = t_critical(n - 1)
    if mean > t * sem:
        return f"**holds** (> {t:.2f} s.e.)"
    if mean < -t * sem:
        return f"**contradicted** (< -{t:.2f} s.e.)"
    # the interval says which sizes of difference this budget rules out (e.g. a lead seen earlier)
    return (
        f"not resolved at this budget (within ±{t:.2f} s.e.: 95% interval "
        f"{mean - t * sem:+.4f} to {mean + t * sem:+.4f})"
    )


def reward_at(curve: dict, axis: str, x: float) -> float | None:
    """Held-out reward at the eval point where ``axis`` equals ``x`` (None when not an eval
    point)."""
    for xi, r in zip(curve[axis], curve["reward"]):
        if abs(xi - x) < 1e-9:
            return r
    return None


def per_seed(summary: dict, run: str, metric) -> dict[int, float]:
    """{seed: metric(curve)} over the finished seeds of ``run``."""
    out = {}
    for key, curve in summary["curves"].items():
        name, seed = key.rsplit("/seed_", 1)
        if name == run:
            value = metric(curve)
            if value is not None:
                out[int(seed)] = value
    return out


def gain(curve: dict) -> float:
    return curve["reward"][-1] - curve["reward"][0]


def auc(curve: dict, axis: str = "prompts") -> float:
    """Area under the held-out reward curve against ``axis`` (the budget's kind), over its
    extent."""
    return trapezoid_auc(curve[axis], curve["reward"], curve[axis][-1])


def paired(summary: dict, a: str, b: str, metric, metric_b=None) -> tuple[float, float, int] | None:
    return paired_values(per_seed(summary, a, metric), per_seed(summary, b, metric_b or metric))


def paired_values(va: dict[int, float], vb: dict[int, float]) -> tuple[float, float, int] | None:
    """Mean and standard error over the seeds both have of va[seed] - vb[seed] (None: no seed)."""
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    m, s = mean_sem([va[k] - vb[k] for k in seeds])
    return m, math.nan if s is None else s, len(seeds)


def row(claim: str, result: tuple[float, float, int] | None) -> str:
    if result is None:
        return f"| {claim} | - | - | runs missing |"
    m, s, n = result
    return f"| {claim} | {m:+.4f} ± {s:.4f} | {n} | {verdict(m, s, n)} |"


def variance_rows(variance: dict) -> list[str]:
    """Ratios of per-query variance (same gradient scale) and per-query SNR (scale-free), with the
    jackknife standard errors of each value when the measurement has them."""
    by = {r["label"]: r for r in variance["results"]}
    lines = []

    def value(label: str, key: str) -> tuple[float, float]:
        r = by[label]
        scale = 1 / r["queries_per_estimate"] if key == "snr_unbiased" else 1.0
        return r[key] * scale, r.get(f"{key}_sem", math.nan) * scale

    def fmt(v: float, e: float) -> str:
        return f"{v:.3e}" if math.isnan(e) else f"{v:.3e} ± {e:.1e}"

    def ratio(a: str, b: str, key: str, what: str, better: str) -> None:
        if a in by and b in by:
            (x, sx), (y, sy) = value(a, key), value(b, key)
            lines.append(
                f"| {what} | {a}: {fmt(x, sx)}, {b}: {fmt(y, sy)} | {x / y:.2f} | {better} |"
            )

    ratio(
        "loop@4",
        "reinforce@1",
        "trace_cov",
        "variance per estimate at equal prompts (same gradient scale)",
        "lower is better",
    )
    ratio(
        "loop@2",
        "reinforce@1",
        "trace_cov",
        "variance per estimate at equal prompts (same gradient scale)",
        "lower is better",
    )
    ratio(
        "loop@4",
        "reinforce@1",
        "variance_per_query",
        "variance per reward query (same gradient scale)",
        "lower is better",
    )
    ratio(
        "loop@2",
        "reinforce@1",
        "variance_per_query",
        "variance per reward query (same gradient scale)",
        "lower is better",
    )
    ratio(
        "loop@4",
        "loop@2",
        "variance_per_query",
        "variance per reward query, K=4 vs K=2",
        "lower is better",
    )
    ratio(
        "loop@4",
        "ppo@1",
        "snr_unbiased",
        "SNR per reward query vs PPO (scale-free)",
        "higher is better",
    )
    ratio(
        "loop@4",
        "grpo@4",
        "snr_unbiased",
        "SNR per reward query vs GRPO (scale-free)",
        "higher is better",
    )
    ratio(
        "loop@4",
        "reinforce@1",
        "snr_unbiased",
        "SNR per reward query vs REINFORCE",
        "higher is better",
    )
    noisy = [r["label"] for r in variance["results"]
             if "snr_unbiased_sem" in r
             and abs(r["snr_unbiased"]) < 2 * r["snr_unbiased_sem"]]  # fmt: skip
    if noisy:
        lines += ["",
                  (f"SNR not distinguishable from 0 at this number of estimates (|SNR| < 2 s.e.): "
                       f"{', '.join(noisy)}; their SNR ratios are not evidence either "
                       "way.")]  # fmt: skip
    return lines


# metrics.jsonl columns of the "what each setting did" table: (key, header, format). Each run's
# epochs are reduced by the key's schema reduction; the runs of a setting are then averaged, or
# maxed where the schema's reduction is a max.
UPDATE_COLUMNS = (
    (metrics.key("optimizer_steps"), "optimizer steps per run", "{:.0f}"),
    (metrics.key("clipfrac"), "mean clip fraction", "{:.3f}"),
    (metrics.key("onpolicy_logprob_err"), "max on-policy log-prob error", "{:.1e}"),
)
EPOCH = metrics.key("epoch")


def update_rows(summary: dict, runs_dir: Path) -> list[str]:
    """Per setting, from its finished runs' metrics.jsonl (the seeds in the summary's curves):
    optimizer steps per run, mean clip fraction and the largest on-policy log-prob error ("-"
    where no run logged the key)."""
    lines = ["| run | " + " | ".join(h for _, h, _ in UPDATE_COLUMNS) + " |",
             "|---|" + "---|" * len(UPDATE_COLUMNS)]  # fmt: skip
    # name -> its finished seeds (a seed still training is not counted)
    finished: dict[str, list[str]] = {}
    for key in summary["curves"]:
        name, seed = key.rsplit("/seed_", 1)
        finished.setdefault(name, []).append(seed)
    for name, seeds in finished.items():
        per_run: dict[str, list[float]] = {key: [] for key, _, _ in UPDATE_COLUMNS}
        found = False
        for path in [runs_dir / name / f"seed_{seed}" / "metrics.jsonl" for seed in seeds]:
            rows = [metrics.canonical_row(r) for r in read_metrics(path) if r.get(EPOCH, -1) >= 0]
            found = found or bool(rows)
            for key, values in per_run.items():
                if logged := [r[key] for r in rows if key in r]:
                    values.append(metrics.reduce_epochs(key, logged))
        if found:
            cells = []
            for key, _, fmt in UPDATE_COLUMNS:
                values = per_run[key]
                combine = max if metrics.get(key).epochs == "max" else lambda v: sum(v) / len(v)
                cells.append(fmt.format(combine(values)) if values else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# The paper's claims as paired comparisons: (run a, run b, what the difference tests).
COMPARISONS = (
    ("loop_k4", "ppo_k1", "(a) gain of loop K=4 − ppo (DDPO)"),
    ("loop_k2", "ppo_k1", "(a) gain of loop K=2 − ppo (DDPO)"),
    ("loop_k4", "loop_k2", "(a) more so as K grows: gain of loop K=4 − loop K=2"),
    ("loop_k4", "reinforce_loo_k4",
     "gain of loop K=4 − reinforce_loo K=4 (PPO's clipped reuse vs one step)"),
    ("loop_k4", "grpo_k4", "gain of loop K=4 − grpo K=4 (std-normalised advantages)"),
    ("loop_k4", "reinforce_k1", "gain of loop K=4 − reinforce K=1"),
)  # fmt: skip


def matched(summary: dict, a: str, b: str) -> str:
    """What two runs have equal: "equal prompts and reward queries", "equal reward queries" or
    "equal prompts", from the sweep summary's per-run totals (the budget's kind when they are
    absent)."""
    totals = {r["name"]: r for r in summary.get("runs", [])}
    if a not in totals or b not in totals:
        return "equal " + summary["budget"]["kind"].replace("_", " ")
    same = [what for key, what in (("prompts", "prompts"), ("reward_queries", "reward queries"))
            if totals[a][key] == totals[b][key]]  # fmt: skip
    return "equal " + " and ".join(same) if same else "unequal prompts and reward queries"


# --- The broad check: every run rescored on all held-out prompts with other noise -----------------

BROAD_REWARD = "shapes_binding"
SETTINGS_THAT_MAY_DIFFER = (
    "device",
    "batch_size",
)  # no effect on the images (per-image noise streams)


@dataclass
class BroadScores:
    """Per-image scores of one ``diffloop eval`` setting, merged over several eval.json files.

    prompts: the P prompts, in order; base: (P, K) scores of the first target (the base model);
    runs: run name -> seed -> (P, K) scores (NaN = invalid image). Image (i, j) of every target
    used the same noise, so differences are paired image by image.
    """

    settings: dict
    prompts: list[str]
    base: np.ndarray
    runs: dict[str, dict[int, np.ndarray]]


def _score_matrix(target: dict) -> np.ndarray:
    rows = target["per_prompt"][BROAD_REWARD]
    return np.array([[np.nan if v is None else v for v in r["scores"]] for r in rows], dtype=float)


def load_broad(paths: list[Path]) -> BroadScores:
    """Merge eval.json files whose first target is the base model and whose other targets are runs
    ``.../<name>/seed_<s>``; every file must have the same settings and the same base scores
    (SystemExit naming the file otherwise: a mixed-up file would pair unrelated images)."""
    merged: BroadScores | None = None
    for path in paths:
        data = json.loads(path.read_text())
        base, *targets = data["targets"]
        if base["kind"] != "model":
            raise SystemExit(
                f"{path}: the first target must be the base model, got {base['target']!r}"
            )
        settings = {k: v for k, v in data["settings"].items() if k not in SETTINGS_THAT_MAY_DIFFER}
        if merged is None:
            prompts = [r["prompt"] for r in base["per_prompt"][BROAD_REWARD]]
            merged = BroadScores(settings, prompts, _score_matrix(base), {})
        elif settings != merged.settings:
            raise SystemExit(
                f"{path}: settings differ from {paths[0]}: {settings} vs {merged.settings}"
            )
        elif not np.array_equal(_score_matrix(base), merged.base, equal_nan=True):
            raise SystemExit(f"{path}: its base scores differ from {paths[0]}'s (same settings)")
        for target in targets:
            run_dir = Path(target["target"])
            if not re.fullmatch(r"seed_\d+", run_dir.name):
                raise SystemExit(
                    f"{path}: target {target['target']!r} is not a sweep run .../NAME/seed_N"
                )
            seed = int(run_dir.name.removeprefix("seed_"))
            merged.runs.setdefault(run_dir.parent.name, {})[seed] = _score_matrix(target)
    if merged is None:
        raise SystemExit("no eval.json given")
    return merged


def mean_gain(scores: np.ndarray, base: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Mean over valid images of scores - base (the same noise), over the prompts in ``rows``."""
    diff = scores - base
    return float(np.nanmean(diff if rows is None else diff[rows]))


def per_prompt_sem(diff: np.ndarray) -> float:
    """Standard error of the mean over prompts of each prompt's mean paired difference (images of
    one prompt are correlated, so prompts are the independent units)."""
    means = np.nanmean(diff, axis=1)
    means = means[~np.isnan(means)]
    return float(np.std(means, ddof=1) / math.sqrt(len(means)))


def broad_lines(broad: BroadScores, summary: dict) -> list[str]:
    """Markdown: per run the broad gain (all, seen, unseen) next to the run's own evaluation, then
    the paired comparisons on the broad gains with their evaluation noise next to their spread."""
    unseen = np.array([uses_unseen_combination(p) for p in broad.prompts])
    st = broad.settings
    gains = {
        n: {s: mean_gain(x, broad.base) for s, x in by.items()} for n, by in broad.runs.items()
    }

    def cell(values: list[float]) -> str:
        m, se = mean_sem(values)
        return f"{m:+.4f}" if se is None else f"{m:+.4f} ± {se:.4f}"

    lines = [
        (
            f"Every trained model and the base rescored on all {len(broad.prompts)} prompts of "
            f"`{st['prompts']}` ({int((~unseen).sum())} seen, {int(unseen.sum())} "
            "unseen combinations) x "
            f"{st['images_per_prompt']} images, with noise seed {st['seed']} (the "
            "runs' own evaluation: "
            f"96 of these prompts, other noise), {st['num_steps']} steps, eta {st['eta']}, CFG "
            f"{st['guidance_scale']}; base {np.nanmean(broad.base):.4f}. Gain = "
            "trained - base on the same "
            "noise, mean ± s.e. over seeds:"
        ),
        "",
        "| run | seeds | broad gain | seen | unseen | own evaluation's gain |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_seed in broad.runs.items():
        seeds = sorted(by_seed)
        own = per_seed(summary, name, gain)
        lines.append(
            f"| {name} | {len(seeds)} | {cell([gains[name][s] for s in seeds])} | "
            f"{cell([mean_gain(by_seed[s], broad.base, ~unseen) for s in seeds])} | "
            f"{cell([mean_gain(by_seed[s], broad.base, unseen) for s in seeds])} | "
            f"{cell([own[s] for s in seeds if s in own])} |"
        )
    lines += [
        "",
        (
            "Paired by seed on the broad gains; *evaluation noise* is the root mean "
            "square over seeds of "
            "one seed's standard error of the difference (over prompts), *spread* the "
            "standard deviation "
            "over seeds of the per-seed differences. Where the spread is close to the "
            "evaluation noise, "
            "most of the seed-to-seed variation is the evaluation's, not training's."
        ),
        "",
        "| claim (difference a − b) | difference | seeds | verdict | evaluation noise | spread |",
        "|---|---|---|---|---|---|",
    ]
    for a, b, what in COMPARISONS:
        if a not in broad.runs or b not in broad.runs:
            lines.append(f"| {what} | - | - | runs missing | | |")
            continue
        seeds = sorted(set(broad.runs[a]) & set(broad.runs[b]))
        noise = [per_prompt_sem(broad.runs[a][s] - broad.runs[b][s]) for s in seeds]
        result = paired_values(gains[a], gains[b])
        _, se, n = result
        spread = se * math.sqrt(n) if n > 1 else math.nan
        rms = math.sqrt(sum(x * x for x in noise) / len(noise))
        lines.append(f"{row(what, result)} {rms:.4f} | {spread:.4f} |")
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m diffloop.tools.claims", description=__doc__.splitlines()[0]
    )
    parser.add_argument("summary", type=Path, help="the sweep's summary.json")
    parser.add_argument(
        "variance", type=Path, nargs="?", help="a variance json (skipped if absent)"
    )
    parser.add_argument("runs_dir", type=Path, nargs="?", help="the sweep's output directory")
    parser.add_argument("--broad", type=Path, nargs="+", default=[], metavar="EVAL_JSON",
                        help="eval.json files of the broad check "
                             "(base model first in each)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    summary = json.loads(args.summary.read_text())
    has_variance = args.variance is not None and args.variance.exists()
    variance = json.loads(args.variance.read_text()) if has_variance else None
    final = gain
    budget = summary["budget"]
    lines = [
        "## Do the paper's claims hold here?",
        "",
        (
            "Paired by seed (same evaluation prompts and noise), mean ± standard error of "
            "the difference;"
        ),
        "verdicts by a two-sided paired t-test at 5%. Held-out reward gain = final - base.",
        "",
        "| claim (difference a − b) | difference | seeds | verdict |",
        "|---|---|---|---|",
        *(row(f"{what} ({matched(summary, a, b)})", paired(summary, a, b, final))
          for a, b, what in COMPARISONS),
        row(
            f"(a) AUC of loop K=4 − ppo ({matched(summary, 'loop_k4', 'ppo_k1')})",
            paired(summary, "loop_k4", "ppo_k1", lambda c: auc(c, budget["kind"])),
        ),
    ]  # fmt: skip
    # Equal reward queries: loop K=4's eval point at the queries a K=1 run spends in its whole
    # budget.
    k1_queries = budget["amount"] if budget["kind"] == "prompts" else None
    if k1_queries:

        def loop_at(c):
            r = reward_at(c, "reward_queries", k1_queries)
            return None if r is None else r - c["reward"][0]

        lines.append(
            row(
                f"equal reward queries ({k1_queries}): gain of loop K=4 (at "
                f"{k1_queries} queries) − ppo",
                paired(summary, "loop_k4", "ppo_k1", loop_at, final),
            )
        )
    if variance:
        lines += [
            "",
            (
                f"Gradient variance ({variance['parameters']}, {variance['estimates']} "
                "estimates each; "
                "Proposition 4.1 says LOOP's estimator has lower variance than PPO's):"
            ),
            "",
            "| quantity | values | ratio (first / second) | |",
            "|---|---|---|---|",
            *variance_rows(variance),
        ]
    if args.runs_dir is not None:
        lines += [
            "",
            "What each setting did (its runs' metrics.jsonl):",
            "",
            *update_rows(summary, args.runs_dir),
        ]
    if args.broad:
        lines += ["", "### The broad check", "", *broad_lines(load_broad(args.broad), summary)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
