"""scripts/claims.py: paired-by-seed verdicts on synthetic sweep summaries with known answers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "claims", Path(__file__).resolve().parents[1] / "scripts" / "claims.py"
)
claims = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(claims)


def curve(rewards: list[float]) -> dict:
    n = len(rewards)
    return {"prompts": [48.0 * i for i in range(n)], "reward_queries": [192.0 * i for i in range(n)],
            "time_s": [1.0 * i for i in range(n)], "reward": rewards}  # fmt: skip


def summary(curves: dict) -> dict:
    return {"budget": {"kind": "prompts", "amount": 192}, "curves": curves}


def test_paired_difference_and_verdicts_by_hand():
    # loop gains 0.10, 0.12, 0.08; ppo gains 0.02, 0.03, 0.01: d = 0.08, 0.09, 0.07 -> 0.08 +- 0.01/sqrt(3)
    s = summary({
        **{f"loop_k4/seed_{i}": curve([0.2, 0.25, 0.2 + g]) for i, g in enumerate([0.10, 0.12, 0.08])},
        **{f"ppo_k1/seed_{i}": curve([0.2, 0.21, 0.2 + g]) for i, g in enumerate([0.02, 0.03, 0.01])},
    })  # fmt: skip
    m, se, n = claims.paired(s, "loop_k4", "ppo_k1", claims.gain)
    assert (m, n) == (pytest.approx(0.08, abs=1e-12), 3)
    assert se == pytest.approx(0.01 / math.sqrt(3), rel=1e-9)
    # t = 0.08 / 0.00577 = 13.9 > 4.303 (2 degrees of freedom)
    assert claims.verdict(m, se, n) == "**holds** (> 4.30 s.e.)"
    assert claims.verdict(-m, se, n).startswith("**contradicted**")
    assert claims.verdict(0.04, 0.01, 3).startswith("not resolved")  # t = 4 < 4.303
    assert claims.verdict(0.04, 0.01, 5).startswith("**holds**")  # t = 4 > 2.776
    assert claims.verdict(0.5, math.nan, 1).startswith("one seed")
    assert claims.t_critical(12) == 2.228  # between table entries: the smaller dof's (conservative)
    # AUC by trapezoid over prompts 0, 48, 96, divided by 96: (0.2 + 0.25)/2/2 + (0.25 + 0.3)/2/2 = 0.25
    assert claims.auc(curve([0.2, 0.25, 0.3])) == pytest.approx(0.25, rel=1e-12)
    # Only seeds present in both runs are paired.
    del s["curves"]["ppo_k1/seed_2"]
    assert claims.paired(s, "loop_k4", "ppo_k1", claims.gain)[2] == 2


def test_report_marks_missing_runs_and_equal_query_point(tmp_path, capsys):
    s = summary(
        {"loop_k4/seed_0": curve([0.2, 0.3, 0.4]), "ppo_k1/seed_0": curve([0.2, 0.22, 0.25])}
    )
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(s))
    assert claims.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "reinforce_loo K=4 (PPO's clipped reuse vs one step) (equal prompts) | - | - | runs missing"
        in out
    )
    # loop K=4 at 192 queries is its first eval point after the base: gain 0.1 vs ppo's final 0.05.
    assert "equal reward queries (192): gain of loop K=4 (at 192 queries) − ppo | +0.0500" in out


def test_comparisons_name_what_the_two_runs_have_equal():
    runs = [{"name": "loop_k4", "prompts": 192, "reward_queries": 768},
            {"name": "grpo_k4", "prompts": 192, "reward_queries": 768},
            {"name": "ppo_k1", "prompts": 768, "reward_queries": 768},
            {"name": "reinforce_k1", "prompts": 192, "reward_queries": 192}]  # fmt: skip
    s = {"budget": {"kind": "reward_queries", "amount": 768}, "runs": runs}
    assert claims.matched(s, "loop_k4", "grpo_k4") == "equal prompts and reward queries"
    assert claims.matched(s, "loop_k4", "ppo_k1") == "equal reward queries"
    assert claims.matched(s, "loop_k4", "reinforce_k1") == "equal prompts"
    assert claims.matched(s, "ppo_k1", "reinforce_k1") == "unequal prompts and reward queries"
    # loop_k2 is not in runs: the budget's kind.
    assert claims.matched(s, "loop_k4", "loop_k2") == "equal reward queries"


def test_update_rows_reduce_each_key_by_its_schema_reduction(tmp_path):
    """Per run: optimizer_steps its last value (a counter), clipfrac its mean, onpolicy_logprob_err
    its max; over seeds: mean, mean, max. A key no run logged is "-", never a made-up 0."""
    seeds = {
        0: [{"epoch": -1, "eval_reward_mean": 0.1},
            {"epoch": 0, "optimizer_steps": 2, "clipfrac": 0.1, "onpolicy_logprob_err": 1e-7},
            {"epoch": 1, "optimizer_steps": 4, "clipfrac": 0.3, "onpolicy_logprob_err": 3e-7}],
        1: [{"epoch": 0, "optimizer_steps": 4, "clipfrac": 0.0, "onpolicy_logprob_err": 5e-7},
            {"epoch": 1, "optimizer_steps": 8, "clipfrac": 0.2, "onpolicy_logprob_err": 2e-7}],
    }  # fmt: skip
    for seed, rows in seeds.items():
        (tmp_path / "loop_k4" / f"seed_{seed}").mkdir(parents=True)
        (tmp_path / "loop_k4" / f"seed_{seed}" / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    (tmp_path / "reinforce_k1" / "seed_0").mkdir(parents=True)
    (tmp_path / "reinforce_k1" / "seed_0" / "metrics.jsonl").write_text(
        json.dumps({"epoch": 0, "optimizer_steps": 1}) + "\n"
    )
    # A seed still training (not in the summary's curves) is not counted.
    (tmp_path / "loop_k4" / "seed_2").mkdir(parents=True)
    (tmp_path / "loop_k4" / "seed_2" / "metrics.jsonl").write_text(
        json.dumps({"epoch": 0, "optimizer_steps": 100, "clipfrac": 0.9}) + "\n"
    )
    s = summary({"loop_k4/seed_0": {}, "loop_k4/seed_1": {}, "reinforce_k1/seed_0": {}})
    lines = claims.update_rows(s, tmp_path)
    # steps (4 + 8) / 2 = 6; clip ((0.1 + 0.3) / 2 + (0.0 + 0.2) / 2) / 2 = 0.15; err max 5e-7
    assert lines[2] == "| loop_k4 | 6 | 0.150 | 5.0e-07 |"
    assert lines[3] == "| reinforce_k1 | 1 | - | - |"
