"""Any evaluation reward may break the held-out evaluation down (``diffloop.rewards.breakdown``):
its categories are logged beside eval_reward_mean and shown in the end-of-run summary, with no
knowledge of the reward in the trainer."""

from __future__ import annotations

import pytest
import torch

from diffloop import metrics
from diffloop.config import load_config
from diffloop.run_dir import read_metrics
from diffloop.trainer import Trainer

# The shipped shapes model, one epoch, 2 eval prompts x 2 images.
RUN = {
    "model.pretrained": "shapes",
    "num_epochs": 1,
    "cpu_threads": 1,
    "sample.num_steps": 2,
    "sample.prompts_per_epoch": 2,
    "sample.samples_per_prompt": 2,
    "sample.batch_size": 4,
    "train.batch_size": 4,
    "eval.prompts": "shapes/val_pair",
    "eval.num_prompts": 2,
    "eval.samples_per_prompt": 2,
    "logging.progress_bars": False,
    "logging.tensorboard": False,
}


class BrightnessByParity:
    """Mean brightness, broken down GenEval-style by a category each image's metadata gives (here
    the parity of its prompt's index)."""

    name = "brightness_by_parity"

    def __call__(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    def eval_breakdown(self, images, prompts, metadata, scores):
        from diffloop.rewards.breakdown import category_breakdown

        parity = ["even" if m["prompt_index"] % 2 == 0 else "odd" for m in metadata]
        return category_breakdown(scores, parity)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(metrics rows, what train() printed, run directory) of a tiny shapes run evaluated by
    BrightnessByParity."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("breakdown") / "run"
    config = load_config(None, [f"{k}={v}" for k, v in {**RUN, "output_dir": out}.items()])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        Trainer(config, reward=BrightnessByParity()).train()
    return read_metrics(out / "metrics.jsonl"), printed.getvalue(), out


def test_a_rewards_categories_are_logged_at_every_evaluation(finished):
    rows, _, _ = finished
    evaluations = [r for r in rows if "eval_reward_mean" in r]
    assert [r["epoch"] for r in evaluations] == [-1, 0]
    for row in evaluations:
        assert {"eval_reward_even_mean", "eval_reward_odd_mean"} <= set(row)
        assert metrics.undeclared(row) == []
        # one prompt (2 images) each: the category means recombine into the overall mean
        both = (row["eval_reward_even_mean"] + row["eval_reward_odd_mean"]) / 2
        assert both == pytest.approx(row["eval_reward_mean"], abs=1e-6)
        assert not set(metrics.SHAPES_EVAL_KEYS) & set(row)  # nothing of the shapes reward's


def test_the_summary_shows_the_categories_base_to_trained(finished):
    rows, printed, _ = finished
    base, last = rows[0], rows[-1]
    lines = printed.splitlines()
    heading = lines.index("  by category (python:brightness_by_parity reward):")
    for offset, category in enumerate(("even", "odd"), start=1):
        b, t = base[f"eval_reward_{category}_mean"], last[f"eval_reward_{category}_mean"]
        expected = f"    {category:<30} base {b:.4f} -> trained {t:.4f} ({t - b:+.4f})"
        assert lines[heading + offset] == expected


def test_the_report_shows_the_categories(finished, tmp_path):
    from diffloop.tools import report

    _, _, run = finished
    report.write_report([run], tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "Held-out breakdown" in html and "reward, even" in html and "reward, odd" in html


def test_means_are_over_each_keys_members_leaving_invalid_scores_out():
    from diffloop.rewards.breakdown import breakdown_means, category_breakdown

    scores = torch.tensor([0.2, float("nan"), 0.6, 1.0])
    out = breakdown_means(category_breakdown(scores, ["a", "a", "b", None]))
    assert out == pytest.approx({"eval_reward_a_mean": 0.2, "eval_reward_b_mean": 0.6})
    nothing = breakdown_means(category_breakdown(scores, ["a", "a", None, None], ["a", "b"]))
    assert nothing == pytest.approx({"eval_reward_a_mean": 0.2})  # b has no member: left out


def test_a_key_that_is_not_a_breakdown_key_is_one_line_naming_the_reward():
    from diffloop.rewards import RewardError
    from diffloop.rewards.breakdown import (
        BreakdownValues,
        category_breakdown,
        evaluation_breakdown,
    )

    class Clobbers(BrightnessByParity):
        def eval_breakdown(self, images, prompts, metadata, scores):
            return {"eval_reward_std": BreakdownValues(scores)}

    images = torch.zeros(2, 3, 4, 4)
    with pytest.raises(RewardError, match="'brightness_by_parity'.*eval_reward_<category>_mean"):
        evaluation_breakdown(Clobbers(), images, ["a", "b"], [{}, {}], torch.zeros(2))
    with pytest.raises(RewardError, match="letters, digits"):
        category_breakdown(torch.zeros(1), ["two words"])
