"""The curve data of ``diffloop report``: lines, bands (std and standard error) and x positions,
checked against values computed by hand; and the report's modules spell metric keys only through
the schema."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from diffloop import metrics
from diffloop.tools.report import eval_image_count, plot_metric
from diffloop.tools.report_curves import band_label, metric_curve, standard_error

ROOT = Path(__file__).resolve().parents[1]
SCORES = {  # the held-out scores of n = 4 images at three evaluations
    -1: [0.1, 0.4, 0.2, 0.7],
    0: [0.3, 0.5, 0.6, 0.2],
    1: [0.9, 0.8, 0.4, 0.6],
}


def eval_rows() -> list[dict[str, float]]:
    """Rows as the trainer logs them: nanmean and population std (ddof 0) of the scores."""
    return [
        {"epoch": e, "eval_reward_mean": float(np.mean(s)), "eval_reward_std": float(np.std(s))}
        for e, s in SCORES.items()
    ]


def test_held_out_band_is_mean_plus_minus_standard_error() -> None:
    curve = metric_curve(eval_rows(), "eval_reward_mean", n=4)
    assert curve.x == curve.band_x == [0, 1, 2]  # epoch -1 is the base: 0 epochs completed
    for i, s in enumerate(SCORES.values()):
        mean, se = np.mean(s), np.std(s, ddof=1) / math.sqrt(len(s))  # sample std / sqrt(n)
        assert curve.y[i] == pytest.approx(mean, rel=1e-12)
        assert curve.lo[i] == pytest.approx(mean - se, rel=1e-12)
        assert curve.hi[i] == pytest.approx(mean + se, rel=1e-12)
    # by hand for the base row: scores 0.1 0.4 0.2 0.7, mean 0.35, sample std 0.2646, s.e. 0.1323
    assert (curve.lo[0], curve.hi[0]) == pytest.approx((0.35 - 0.13228757, 0.35 + 0.13228757))


def test_standard_error_needs_two_images() -> None:
    assert standard_error(0.3, 10) == pytest.approx(0.1)  # 0.3 / sqrt(9)
    assert standard_error(0.3, 1) is None and standard_error(0.3, None) is None
    curve = metric_curve(eval_rows(), "eval_reward_mean", n=None)
    assert curve.x == [0, 1, 2] and curve.band_x == [] and curve.lo == curve.hi == []
    rows = eval_rows()
    assert band_label("eval_reward_mean", 4, rows) == "n = 4 images"
    assert band_label("eval_reward_mean", None, rows) == "no s.e.: image count unknown"
    no_std = [{k: v for k, v in r.items() if k != "eval_reward_std"} for r in rows]
    assert band_label("eval_reward_mean", None, no_std) == ""  # nothing to make a band of
    assert band_label("reward_mean", 4, rows) == "" and band_label("approx_kl", 4, rows) == ""


def test_training_band_is_mean_plus_minus_std_where_logged() -> None:
    rows = [
        {"epoch": -1, "eval_reward_mean": 0.2},
        {"epoch": 0, "reward_mean": 0.5, "reward_std": 0.1},
        {"epoch": 1, "reward_mean": 0.7},  # no std logged: a point without a band
        {"epoch": 2, "reward_mean": 0.6, "reward_std": 0.25},
    ]
    curve = metric_curve(rows, "reward_mean", n=8)  # n does not matter for a std band
    assert (curve.x, curve.y) == ([0, 1, 2], [0.5, 0.7, 0.6])  # samples drawn before the update
    assert curve.band_x == [0, 2]
    assert curve.lo == pytest.approx([0.4, 0.35]) and curve.hi == pytest.approx([0.6, 0.85])


def test_policy_statistics_sit_after_their_update_without_a_band() -> None:
    rows = [{"epoch": e, "approx_kl": 0.01 * e, "clipfrac": 0.1, "kl_to_base": 0.5 * e,
             "ratio_mean": 1.0} for e in range(3)]  # fmt: skip
    for key, x in (("approx_kl", [1, 2, 3]), ("clipfrac", [1, 2, 3]), ("ratio_mean", [1, 2, 3]),
                   ("kl_to_base", [0, 1, 2])):  # fmt: skip
        curve = metric_curve(rows, key)
        assert curve.x == x and curve.band_x == [], key
    assert metric_curve(rows, "approx_kl").y == [0.0, 0.01, 0.02]


def test_eval_image_count_from_the_resolved_config() -> None:
    assert eval_image_count({"eval": {"num_prompts": 12, "samples_per_prompt": 3}}) == 36
    assert eval_image_count({"eval": {"num_prompts": 12}}) is None
    assert eval_image_count({"eval": None}) is None and eval_image_count({}) is None


def test_plot_metric_skips_a_key_no_run_logged(tmp_path) -> None:
    from diffloop.tools.report import RunData

    run = RunData("r", tmp_path, "", {}, eval_rows(), eval_images=4)
    assert not plot_metric([run], "kl_to_base", "KL", tmp_path / "kl.png")
    assert not (tmp_path / "kl.png").exists()
    assert plot_metric([run], "eval_reward_mean", "held-out", tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 1000


def test_schema_bands() -> None:
    assert metrics.get("eval_reward_mean").band_kind == "sem"
    assert metrics.get("reward_mean").band_kind == "std"
    with pytest.raises(ValueError, match="band_kind"):
        metrics.Metric("x", "m", "same", None, None, "eval", "eval", band_kind="var")
