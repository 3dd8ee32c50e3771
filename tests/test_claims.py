"""diffloop.tools.claims: paired-by-seed verdicts on synthetic sweep summaries with known
answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from diffloop.tools import claims


def curve(rewards: list[float]) -> dict:
    n = len(rewards)
    return {"prompts": [48.0 * i for i in range(n)],
            "reward_queries": [192.0 * i for i in range(n)],
            "time_s": [1.0 * i for i in range(n)], "reward": rewards}  # fmt: skip


def summary(curves: dict) -> dict:
    return {"budget": {"kind": "prompts", "amount": 192}, "curves": curves}


def test_paired_difference_and_verdicts_by_hand():
    # loop gains 0.10, 0.12, 0.08; ppo gains 0.02, 0.03, 0.01: d = 0.08, 0.09, 0.07 -> 0.08 +-
    # 0.01/sqrt(3)
    s = summary({
        **{f"loop_k4/seed_{i}": curve([0.2, 0.25, 0.2 + g])
           for i, g in enumerate([0.10, 0.12, 0.08])},
        **{f"ppo_k1/seed_{i}": curve([0.2, 0.21, 0.2 + g])
           for i, g in enumerate([0.02, 0.03, 0.01])},
    })  # fmt: skip
    m, se, n = claims.paired(s, "loop_k4", "ppo_k1", claims.gain)
    assert (m, n) == (pytest.approx(0.08, abs=1e-12), 3)
    assert se == pytest.approx(0.01 / math.sqrt(3), rel=1e-9)
    # t = 0.08 / 0.00577 = 13.9 > 4.303 (2 degrees of freedom)
    assert claims.verdict(m, se, n) == "**holds** (> 4.30 s.e.)"
    assert claims.verdict(-m, se, n).startswith("**contradicted**")
    assert claims.verdict(0.04, 0.01, 3).startswith("not resolved")  # t = 4 < 4.303
    assert claims.verdict(0.04, 0.01, 3).endswith(
        "(within ±4.30 s.e.: 95% interval -0.0030 to +0.0830)"
    )
    assert claims.verdict(0.04, 0.01, 5).startswith("**holds**")  # t = 4 > 2.776
    assert claims.verdict(0.5, math.nan, 1).startswith("one seed")
    assert claims.t_critical(12) == 2.228  # between table entries: the smaller dof's (conservative)
    # AUC by trapezoid over prompts 0, 48, 96, divided by 96: (0.2 + 0.25)/2/2 + (0.25 + 0.3)/2/2 =
    # 0.25
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


# The broad check: per-image scores of eval.json files, base first. Prompts 0 and 2 name only
# training combinations, 1 and 3 a held-out one (red triangle, blue circle).
BROAD_PROMPTS = ["a red circle and a blue square", "a red triangle and a blue square",
                 "a green square", "a blue circle and a yellow cross"]  # fmt: skip
BASE = [[0.1, 0.2], [0.3, 0.4], [0.0, 0.2], [0.5, 0.5]]


def eval_json(path: Path, targets: dict[str, list[list[float]]], seed: int = 777) -> Path:
    """An eval.json as ``diffloop eval`` writes it: the base model first, then run directories."""

    def entry(spec, kind, scores):
        rows = [
            {"prompt": p, "scores": s, "mean": sum(s) / len(s)}
            for p, s in zip(BROAD_PROMPTS, scores)
        ]
        return {"target": spec, "label": Path(spec).name, "kind": kind,
                "per_prompt": {"shapes_binding": rows}}  # fmt: skip

    settings = {"prompts": "shapes/val_pair", "images_per_prompt": 2, "seed": seed, "num_steps": 10,
                "eta": 1.0, "guidance_scale": 3.0, "device": "cpu", "batch_size": 16}  # fmt: skip
    data = {"targets": [entry("shapes", "model", BASE)]
            + [entry(spec, "run", scores) for spec, scores in targets.items()],
            "settings": settings}  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def shifted(per_prompt: list[float]) -> list[list[float]]:
    return [[x + d for x in row] for row, d in zip(BASE, per_prompt)]


def test_broad_check_gains_split_and_paired_differences_by_hand(tmp_path):
    # loop_k4 seed s: +0.1 on the seen prompts, +0.2 on the unseen ones, + 0.01 s everywhere
    # (gain 0.15 + 0.01 s); ppo_k1: +0.05 everywhere. Paired d_s = 0.10, 0.11, 0.12.
    loop = {s: shifted([0.1 + 0.01 * s, 0.2 + 0.01 * s] * 2) for s in range(3)}
    ppo = shifted([0.05] * 4)
    first = eval_json(tmp_path / "a.json", {f"r/loop_k4/seed_{s}": loop[s] for s in (0, 1)}
                      | {f"r/ppo_k1/seed_{s}": ppo for s in (0, 1)})  # fmt: skip
    second = eval_json(tmp_path / "b.json", {"r/loop_k4/seed_2": loop[2], "r/ppo_k1/seed_2": ppo})
    broad = claims.load_broad([first, second])
    assert sorted(broad.runs) == ["loop_k4", "ppo_k1"] and sorted(broad.runs["ppo_k1"]) == [0, 1, 2]
    assert claims.mean_gain(broad.runs["loop_k4"][1], broad.base) == pytest.approx(0.16, abs=1e-12)
    lines = claims.broad_lines(broad, summary({}))
    table = "\n".join(lines)
    # seen 0.11 +- 0.01/sqrt(3), unseen 0.21 +- the same; no own-evaluation curves in the summary
    assert "| loop_k4 | 3 | +0.1600 ± 0.0058 | +0.1100 ± 0.0058 | +0.2100 ± 0.0058 |" in table
    assert "| ppo_k1 | 3 | +0.0500 ± 0.0000 | +0.0500 ± 0.0000 | +0.0500 ± 0.0000 |" in table
    # loop - ppo per prompt: 0.05, 0.15, 0.05, 0.15 (+0.01 s): s.e. over prompts
    # std(ddof=1) / 2 = 0.057735 / 2 = 0.028868 every seed; spread = sd(0.10, 0.11, 0.12) = 0.01
    row = next(line for line in lines if line.startswith("| (a) gain of loop K=4 − ppo"))
    assert "+0.1100 ± 0.0058 | 3 | **holds** (> 4.30 s.e.) | 0.0289 | 0.0100 |" in row
    assert any(
        line.startswith(
            "| (a) more so as K grows: gain of loop K=4 − loop K=2 | - | - | runs missing"
        )
        for line in lines
    )


def test_broad_check_refuses_files_that_would_pair_unrelated_images(tmp_path):
    run = {"r/loop_k4/seed_0": shifted([0.1] * 4)}
    good = eval_json(tmp_path / "a.json", run)
    other_noise = eval_json(tmp_path / "b.json", run, seed=778)
    with pytest.raises(SystemExit, match="settings differ"):
        claims.load_broad([good, other_noise])
    moved = json.loads(good.read_text())
    moved["targets"][0]["per_prompt"]["shapes_binding"][0]["scores"] = [0.9, 0.9]
    (tmp_path / "c.json").write_text(json.dumps(moved))
    with pytest.raises(SystemExit, match="base scores differ"):
        claims.load_broad([good, tmp_path / "c.json"])
    not_a_sweep = eval_json(tmp_path / "d.json", {"runs/my_run": shifted([0.1] * 4)})
    with pytest.raises(SystemExit, match="not a sweep run"):
        claims.load_broad([not_a_sweep])
