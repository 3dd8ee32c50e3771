"""Held-out reward before and after training for several run directories (e.g. one config, several
seeds).

    python scripts/summarize_seeds.py runs/shapes_seed0 runs/shapes_seed1 ...

Prints, per run, the eval_reward_mean before training (epoch -1 row of metrics.jsonl), at every
evaluation, the change, and the wall-clock (epochs + evaluations); then the mean change +- standard
error over runs.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from diffloop.run_dir import read_metrics


def main(run_dirs: list[str]) -> int:
    deltas = []
    for run in run_dirs:
        rows = read_metrics(Path(run) / "metrics.jsonl")
        evals = [r for r in rows if "eval_reward_mean" in r]
        if len(evals) < 2 or evals[0]["epoch"] != -1:
            print(f"{run}: no base and final evaluation", file=sys.stderr)
            return 1
        seconds = sum(r.get("epoch_time_s", 0.0) + r.get("eval_time_s", 0.0) for r in rows)
        delta = evals[-1]["eval_reward_mean"] - evals[0]["eval_reward_mean"]
        deltas.append(delta)
        curve = " ".join(f"{r['eval_reward_mean']:.4f}" for r in evals)
        print(f"{run}: eval {curve}  change {delta:+.4f}  ({seconds:.0f} s training + eval)")
    if len(deltas) > 1:
        sem = statistics.stdev(deltas) / len(deltas) ** 0.5
        print(
            f"mean change {statistics.mean(deltas):+.4f} +- {sem:.4f} (standard error, "
            f"{len(deltas)} runs)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
