"""``diffloop compare``: grid expansion, budget matching, resume of a half-finished sweep, summary
statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from diffloop.config import Config
from diffloop.run_dir import read_metrics
from diffloop.tools.sweep import (
    SweepError,
    compare_main,
    curve_from_metrics,
    load_sweep,
    mean_sem,
    plan,
    run_status,
    shard_runs,
    trapezoid_auc,
)


def write_sweep(tmp_path: Path, **fields) -> Path:
    data = {"base": "shapes.yaml", "budget": {"prompts": 8}, "seeds": [0, 1],
            "output_dir": str(tmp_path / "out"),
            "runs": [{"name": "loop_k2", "overrides": ["train.algorithm=loop",
                                                       "sample.samples_per_prompt=2",
                                                      "sample.prompts_per_epoch=4"]},
                     {"name": "reinforce", "overrides": ["train.algorithm=reinforce",
                                                         "sample.samples_per_prompt=1",
                                                         "sample.prompts_per_epoch=2"]}],
            "overrides": ["train.batch_size=2"]}  # fmt: skip
    data.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------- expansion and budgets


def test_grid_expands_seed_major_with_matched_prompts(tmp_path):
    grid_run = {
        "name": "loop",
        "overrides": ["train.algorithm=loop", "sample.prompts_per_epoch=2"],
        "grid": {"sample.samples_per_prompt": [2, 4], "train.num_inner_epochs": [1, 2]},
    }
    path = write_sweep(
        tmp_path, runs=[*yaml.safe_load(write_sweep(tmp_path).read_text())["runs"], grid_run]
    )
    runs = plan(load_sweep(path))
    names = ["loop_k2", "reinforce", "loop-samples_per_prompt2-num_inner_epochs1",
             "loop-samples_per_prompt2-num_inner_epochs2",
             "loop-samples_per_prompt4-num_inner_epochs1",
             "loop-samples_per_prompt4-num_inner_epochs2"]  # fmt: skip
    assert [(r.name, r.seed) for r in runs] == [(n, s) for s in (0, 1) for n in names]
    by = {r.name: r for r in runs if r.seed == 1}
    # Same 8 training prompts for every run; epochs = 8 / prompts_per_epoch; queries = prompts x K.
    assert {r.prompts for r in runs} == {8}
    assert (by["loop_k2"].num_epochs, by["loop_k2"].reward_queries) == (2, 16)
    assert (by["reinforce"].num_epochs, by["reinforce"].reward_queries) == (4, 8)
    assert by["loop-samples_per_prompt4-num_inner_epochs2"].reward_queries == 32
    assert by["loop_k2"].output_dir == tmp_path / "out" / "loop_k2" / "seed_1"
    assert by["loop_k2"].overrides[-3:] == (
        "seed=1",
        f"output_dir={tmp_path / 'out' / 'loop_k2' / 'seed_1'}",
        "num_epochs=2",
    )


def test_reward_query_budget_gives_fewer_epochs_to_larger_k(tmp_path):
    runs = plan(load_sweep(write_sweep(tmp_path, budget={"reward_queries": 16})))
    epochs = {r.name: r.num_epochs for r in runs}
    assert epochs == {"loop_k2": 2, "reinforce": 8}  # 16 / (4 x 2) and 16 / (2 x 1)
    assert {r.reward_queries for r in runs} == {16}
    assert {r.name: r.prompts for r in runs} == {"loop_k2": 8, "reinforce": 16}


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"budget": {"prompts": 6}},
            r"budget prompts=6 is not a whole number of epochs for run 'loop_k2'.*4 per epoch",
        ),
        (
            {"budget": {"reward_queries": 12}},
            r"not a whole number of epochs for run 'loop_k2'.*8 per epoch",
        ),
        ({"budget": {"tokens": 6}}, r"budget must be \{prompts: N\} or \{reward_queries: N\}"),
        ({"seed": [0]}, r"unknown key 'seed'.*Did you mean 'seeds'"),
        ({"runs": [{"name": "a", "overrides": ["num_epochs=3"]}]}, r"budget decides num_epochs"),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, r"unique; repeated: a"),
        ({"overrides": ["train.batch_size=2", "eval.prompts=null"]}, r"eval.prompts is null"),
        (
            {"runs": [{"name": "a", "overrides": ["train.algorithm=lop"]}]},
            r"run 'a' \(seed 0\).*unknown",
        ),
    ],
)
def test_invalid_sweeps_fail_before_training_naming_the_fix(tmp_path, fields, message):
    with pytest.raises(SweepError, match=message):
        plan(load_sweep(write_sweep(tmp_path, **fields)))


def test_dry_run_prints_the_grid(tmp_path, capsys):
    assert compare_main([str(write_sweep(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "every run trains on 8 prompt draws" in out
    assert (
        "reinforce                       1 reinforce       1    2      4        8        8  new"
        in out
    )
    assert "4 runs (2 settings x 2 seeds)" in out
    assert not (tmp_path / "out").exists()


def test_shipped_sweep_matches_reward_queries_and_updates():
    runs = plan(load_sweep("shapes_algorithms.yaml"))
    assert len(runs) == 48 and {r.reward_queries for r in runs} == {768}
    assert {(r.name, r.algorithm, r.samples_per_prompt, r.prompts) for r in runs} == {
        ("loop_k2", "loop", 2, 384), ("loop_k4", "loop", 4, 192), ("ppo_k1", "ppo", 1, 768),
        ("grpo_k4", "grpo", 4, 192), ("reinforce_k1", "reinforce", 1, 768),
        ("reinforce_loo_k4", "reinforce_loo", 4, 192)}  # fmt: skip
    # Equal samples per epoch (64) and train batch: every run makes the same 2 updates per epoch.
    assert {r.prompts_per_epoch * r.samples_per_prompt for r in runs} == {64}
    assert not any(o.startswith("train.batch_size") for r in runs for o in r.overrides)
    assert Config().train.batch_size == 32


def test_shards_partition_the_shipped_sweep_balanced_by_queries():
    runs = plan(load_sweep("shapes_algorithms.yaml"))
    shards = [shard_runs(runs, i, 2) for i in range(2)]
    keys = [[(r.name, r.seed) for r in s] for s in shards]
    # A partition: every run exactly once, grid order kept within a shard.
    assert sorted(keys[0] + keys[1]) == sorted((r.name, r.seed) for r in runs)
    assert all(k == sorted(k, key=[(r.name, r.seed) for r in runs].index) for k in keys)
    # Every run costs 768 queries: 24 runs each, and each shard finishes whole seeds in order.
    assert [sum(r.reward_queries for r in s) for s in shards] == [18432, 18432]
    assert all([r.seed for r in s] == sorted(r.seed for r in s) for s in shards)
    assert shard_runs(runs, 0, 1) == runs


# ----------------------------------------------------------------------------- summary statistics


def test_trapezoid_auc_and_mean_sem_by_hand():
    assert trapezoid_auc([0, 2, 8], [0.5, 0.5, 0.5], 8) == pytest.approx(0.5, abs=1e-15)
    assert trapezoid_auc([0, 4, 8], [0.1, 0.3, 0.5], 8) == pytest.approx(0.3, abs=1e-15)
    assert trapezoid_auc([0, 2, 8], [0.0, 1.0, 1.0], 8) == pytest.approx((1.0 + 6.0) / 8, abs=1e-15)
    with pytest.raises(ValueError, match="from 0 to x_end=8"):
        trapezoid_auc([0, 4, 6], [0.1, 0.2, 0.3], 8)
    mean, sem = mean_sem([0.5, 0.8])
    assert (mean, sem) == pytest.approx((0.65, 0.15), abs=1e-12)
    assert mean_sem([2.0]) == (2.0, None)


def fake_run(
    out: Path, evals: dict[int, float], epochs: int, prompts_per_epoch: int, k: int, finished: bool
) -> None:
    """metrics.jsonl as the trainer writes it (evaluations at epochs -1 and at ``evals``' keys)."""
    out.mkdir(parents=True)
    rows = [{"epoch": -1, "eval_reward_mean": evals[-1], "eval_time_s": 5.0}]
    for e in range(epochs if finished else epochs - 1):
        row = {
            "epoch": e,
            "reward_mean": 0.0,
            "prompts_seen": (e + 1) * prompts_per_epoch,
            "reward_queries": (e + 1) * prompts_per_epoch * k,
            "epoch_time_s": 1.5,
            "eval_time_s": 5.0,
        }
        if e in evals:
            row["eval_reward_mean"] = evals[e]
        rows.append(row)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (out / "lora").mkdir()


def test_summary_on_synthetic_metrics(tmp_path):
    # loop_k2: 4 prompts/epoch, 2 epochs, eval at the base, epoch 0 (4 prompts) and epoch 1 (8
    # prompts).
    path = write_sweep(tmp_path, seeds=[0, 1, 2])
    out = tmp_path / "out"
    fake_run(out / "loop_k2/seed_0", {-1: 0.1, 0: 0.3, 1: 0.5}, 2, 4, 2, finished=True)
    fake_run(out / "loop_k2/seed_1", {-1: 0.2, 0: 0.2, 1: 0.8}, 2, 4, 2, finished=True)
    fake_run(out / "loop_k2/seed_2", {-1: 0.9, 0: 0.9, 1: 0.9}, 2, 4, 2, finished=False)  # left out
    fake_run(out / "reinforce/seed_0", {-1: 0.1, 3: 0.4}, 4, 2, 1, finished=True)
    assert compare_main([str(path), "--summary-only"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"] == {"kind": "prompts", "amount": 8, "text": summary["budget"]["text"]}
    rows = {r["name"]: r for r in summary["runs"]}
    loop = rows["loop_k2"]
    assert loop["seeds"] == [0, 1] and loop["seeds_planned"] == 3
    # final 0.5, 0.8; AUC (4 (0.1 + 0.3)/2 + 4 (0.3 + 0.5)/2) / 8 = 0.3 and (0.8 + 2.0) / 8 = 0.35.
    assert (loop["final"], loop["final_sem"]) == pytest.approx((0.65, 0.15), abs=1e-12)
    assert (loop["auc"], loop["auc_sem"]) == pytest.approx((0.325, 0.025), abs=1e-12)
    assert (loop["gain"], loop["gain_sem"]) == pytest.approx((0.5, 0.1), abs=1e-12)
    assert (loop["base"], loop["wallclock_s"], loop["wallclock_s_sem"]) == pytest.approx(
        (0.15, 3.0, 0.0)
    )
    assert (loop["reward_queries"], rows["reinforce"]["reward_queries"]) == (16, 8)
    reinforce = rows["reinforce"]  # one seed: no standard error; AUC (8 x (0.1 + 0.4) / 2) / 8
    assert (reinforce["auc"], reinforce["auc_sem"], reinforce["wallclock_s"]) == pytest.approx(
        (0.25, None, 6.0)
    )

    md = (out / "summary.md").read_text()
    assert "every run trains on 8 prompt draws" in md
    assert "| loop_k2 | loop | 2 | 2 | 8 | 16 | 2/3 | 0.1500 ± 0.0500 | 0.6500 ± 0.1500 |" in md
    for name in ("eval_vs_prompts.png", "eval_vs_queries.png", "eval_vs_time.png"):
        assert (out / name).stat().st_size > 1000


def test_curve_accumulates_training_time_only():
    rows = [{"epoch": -1, "eval_reward_mean": 0.0}, {"epoch": 0, "prompts_seen": 2,
                                                     "reward_queries": 4,
            "epoch_time_s": 1.0}, {"epoch": 1, "prompts_seen": 4, "reward_queries": 8,
                                   "epoch_time_s": 2.0,
            "eval_reward_mean": 1.0, "eval_time_s": 50.0}]  # fmt: skip
    c = curve_from_metrics(rows)
    assert (c.prompts, c.reward_queries, c.time_s, c.reward) == (
        (0, 4),
        (0, 8),
        (0, 3.0),
        (0.0, 1.0),
    )


# --------------------------------------------------------------------------- resume (real training)

TINY = ["sample.num_steps=2", "sample.prompts_per_epoch=2", "sample.batch_size=4",
        "train.batch_size=2",
        "eval.num_prompts=1", "eval.samples_per_prompt=1", "logging.tensorboard=false",
        "logging.progress_bars=false"]  # fmt: skip


def test_half_finished_sweep_resumes(tmp_path, monkeypatch):
    from diffloop.testing.runs import killed_at_epoch
    from diffloop.trainer import Trainer

    path = write_sweep(tmp_path, overrides=TINY, seeds=[0], budget={"prompts": 4}, runs=[
        {"name": "a", "overrides": ["train.algorithm=loop", "sample.samples_per_prompt=2"]},
        {"name": "b", "overrides": ["train.algorithm=reinforce_loo",
                                    "sample.samples_per_prompt=2"]},
        {"name": "c", "overrides": ["train.algorithm=reinforce",
                                    "sample.samples_per_prompt=1"]}])  # fmt: skip
    with killed_at_epoch(1, run_dir_suffix="b/seed_0"):
        compare_main([str(path)])
    runs = plan(load_sweep(path))
    assert [run_status(r) for r in runs] == ["finished", "resume", "new"]

    started = []
    train = Trainer.train
    monkeypatch.setattr(
        Trainer,
        "train",
        lambda self: (
            started.append((Path(self.config.output_dir).parent.name, self.start_epoch))
            or train(self)
        ),
    )
    assert compare_main([str(path)]) == 0
    assert started == [("b", 1), ("c", 0)]  # a skipped, b continued from its checkpoint, c started
    assert [run_status(r) for r in runs] == ["finished"] * 3
    assert [r["epoch"] for r in read_metrics(runs[1].output_dir / "metrics.jsonl")] == [-1, 0, 1]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["name"], r["seeds"]) for r in summary["runs"]] == [
        ("a", [0]),
        ("b", [0]),
        ("c", [0]),
    ]
    assert all(math.isfinite(r["auc"]) for r in summary["runs"])

    # Finished runs with other settings are not silently reused.
    with pytest.raises(SweepError, match=r"holds a run with other settings \(train.learning_rate"):
        compare_main([str(path), "train.learning_rate=0.5"])
