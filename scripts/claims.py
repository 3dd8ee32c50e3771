"""Verdicts on the LOOP paper's claims from a finished sweep and a variance measurement (markdown).

    python scripts/claims.py SUMMARY.json [VARIANCE.json [RUNS_DIR]]
    e.g. runs/shapes_algorithms/summary.json runs/shapes_algorithms/variance_init.json runs/shapes_algorithms

With RUNS_DIR, a table of what each setting did per run (optimizer steps, mean clip fraction) is added:
the settings differ in how many gradient steps the same prompts buy, which the verdicts must be read with.

Every comparison is paired by seed (runs with the same seed share the evaluation prompts and noise):
d_s = metric_a(seed s) - metric_b(seed s), reported as mean +- standard error over seeds. Verdict by a
two-sided paired t-test at 5%: "holds" when mean > t * s.e., "contradicted" when mean < -t * s.e.
(t = 4.30, 3.18, 2.78 for 3, 4, 5 seeds), otherwise "not resolved at this budget" (the sign alone is
noise). scripts/make_results.sh appends the output to docs/results.md.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from diffloop import metrics
from diffloop.run_dir import read_metrics
from diffloop.tools.sweep import mean_sem, trapezoid_auc

# Two-sided 5% critical values of Student's t by degrees of freedom (seeds - 1).
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
              10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


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
    return f"not resolved at this budget (within ±{t:.2f} s.e.)"


def reward_at(curve: dict, axis: str, x: float) -> float | None:
    """Held-out reward at the eval point where ``axis`` equals ``x`` (None when not an eval point)."""
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
    """Area under the held-out reward curve against ``axis`` (the budget's kind), over its extent."""
    return trapezoid_auc(curve[axis], curve["reward"], curve[axis][-1])


def paired(summary: dict, a: str, b: str, metric, metric_b=None) -> tuple[float, float, int] | None:
    va, vb = per_seed(summary, a, metric), per_seed(summary, b, metric_b or metric)
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
             if "snr_unbiased_sem" in r and abs(r["snr_unbiased"]) < 2 * r["snr_unbiased_sem"]]  # fmt: skip
    if noisy:
        lines += ["", (f"SNR not distinguishable from 0 at this number of estimates (|SNR| < 2 s.e.): "
                       f"{', '.join(noisy)}; their SNR ratios are not evidence either way.")]  # fmt: skip
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
    ("loop_k4", "reinforce_loo_k4", "gain of loop K=4 − reinforce_loo K=4 (PPO's clipped reuse vs one step)"),
    ("loop_k4", "grpo_k4", "gain of loop K=4 − grpo K=4 (std-normalised advantages)"),
    ("loop_k4", "reinforce_k1", "gain of loop K=4 − reinforce K=1"),
)  # fmt: skip


def matched(summary: dict, a: str, b: str) -> str:
    """What two runs have equal: "equal prompts and reward queries", "equal reward queries" or "equal
    prompts", from the sweep summary's per-run totals (the budget's kind when they are absent)."""
    totals = {r["name"]: r for r in summary.get("runs", [])}
    if a not in totals or b not in totals:
        return "equal " + summary["budget"]["kind"].replace("_", " ")
    same = [what for key, what in (("prompts", "prompts"), ("reward_queries", "reward queries"))
            if totals[a][key] == totals[b][key]]  # fmt: skip
    return "equal " + " and ".join(same) if same else "unequal prompts and reward queries"


def main(argv: list[str]) -> int:
    summary = json.loads(Path(argv[0]).read_text())
    variance = (
        json.loads(Path(argv[1]).read_text()) if len(argv) > 1 and Path(argv[1]).exists() else None
    )
    final = gain
    budget = summary["budget"]
    lines = [
        "## Do the paper's claims hold here?",
        "",
        "Paired by seed (same evaluation prompts and noise), mean ± standard error of the difference;",
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
    # Equal reward queries: loop K=4's eval point at the queries a K=1 run spends in its whole budget.
    k1_queries = budget["amount"] if budget["kind"] == "prompts" else None
    if k1_queries:

        def loop_at(c):
            r = reward_at(c, "reward_queries", k1_queries)
            return None if r is None else r - c["reward"][0]

        lines.append(
            row(
                f"equal reward queries ({k1_queries}): gain of loop K=4 (at {k1_queries} queries) − ppo",
                paired(summary, "loop_k4", "ppo_k1", loop_at, final),
            )
        )
    if variance:
        lines += [
            "",
            (
                f"Gradient variance ({variance['parameters']}, {variance['estimates']} estimates each; "
                "Proposition 4.1 says LOOP's estimator has lower variance than PPO's):"
            ),
            "",
            "| quantity | values | ratio (first / second) | |",
            "|---|---|---|---|",
            *variance_rows(variance),
        ]
    if len(argv) > 2:
        lines += [
            "",
            "What each setting did (its runs' metrics.jsonl):",
            "",
            *update_rows(summary, Path(argv[2])),
        ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
