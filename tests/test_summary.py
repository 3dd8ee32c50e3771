"""The end-of-run summary of a shapes run: held-out reward, per attribute, seen vs unseen; labelled
grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffloop import metrics
from diffloop.config import load_config
from diffloop.prompts import build_prompt_source
from diffloop.run_dir import read_metrics
from diffloop.shapes import reward, world
from diffloop.summary import summary_lines, write_before_after
from diffloop.testing.runs import SHORT_SHAPES_RUN
from diffloop.trainer import Trainer


def render(captions: list[str], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    imgs = [world.render(world.parse_caption(t), rng) for t in captions]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0


def test_attribute_scores_separate_colour_from_shape_binding():
    text = "a solid red circle and a striped yellow cross"
    right = world.parse_caption(text)
    swapped = [
        world.ObjectSpec("yellow", "circle", "solid"),
        world.ObjectSpec("red", "cross", "striped"),
    ]
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack([world.render(right, rng), world.render(swapped, rng)]))
    x = x.permute(0, 3, 1, 2).float() / 255.0
    scores = reward.BindingReward().attribute_scores(x, [text, text])
    assert all(v[0] > 0.95 for v in scores.values())  # a clean render: every attribute bound
    # colours swapped: whichever pairing the best assignment picks, one attribute fails
    assert min(scores["colour"][1], scores["shape"][1]) < 0.05 and scores["texture"][1] > 0.95
    unspecified = reward.BindingReward().attribute_scores(
        render(["a red circle"]), ["a red circle"]
    )
    assert math.isnan(unspecified["texture"][0])  # no texture named: not counted as 0 or 1


def test_breakdown_splits_seen_and_unseen():
    seen, unseen = world.prompt_splits()["val_seen"][0], world.prompt_splits()["val_unseen"][0]
    assert not world.uses_unseen_combination(seen) and world.uses_unseen_combination(unseen)
    rewards = torch.tensor([0.2, 0.4, 0.9])
    attrs = {"colour": torch.tensor([1.0, 0.0, 0.5]), "texture": torch.tensor([float("nan")] * 3)}
    out = reward.eval_breakdown(rewards, attrs, [seen, seen, unseen])
    assert out == pytest.approx(
        {
            "eval_binding_colour_mean": 0.5,
            "eval_reward_seen_mean": 0.3,
            "eval_reward_unseen_mean": 0.9,
        }
    )  # texture all NaN: left out


def test_summary_lines_say_base_trained_and_the_difference():
    base = {
        "eval_reward_mean": 0.25,
        "eval_binding_colour_mean": 0.5,
        "eval_binding_shape_mean": 0.6,
        "eval_reward_seen_mean": 0.3,
    }
    trained = {
        "eval_reward_mean": 0.35,
        "eval_binding_colour_mean": 0.7,
        "eval_binding_shape_mean": 0.6,
        "eval_reward_seen_mean": 0.4,
    }
    seen = world.prompt_splits()["val_seen"][:2]
    lines = summary_lines(base, trained, "binding reward", "shapes/val_pair", 2, 2,
                         reward.breakdown_sections(seen))  # fmt: skip
    text = "\n".join(lines)
    assert "base 0.2500 -> trained 0.3500" in lines[0]
    assert "colour" in text and "base 0.5000 -> trained 0.7000 (+0.2000)" in text
    assert "texture                        n/a" in text
    assert (
        "seen (2 prompts)" in text
        and "unseen (0 prompts)" in text
        and "no eval prompt names" in text
    )


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("summary") / "run"
    # val_pair's seen prompts come first: shapes/val cycles singles (unseen) then seen pairs
    config = load_config(None, [f"output_dir={out}", "num_epochs=1", "eval.prompts=shapes/val",
                                "eval.num_prompts=14", *SHORT_SHAPES_RUN])  # fmt: skip
    Trainer(config).train()
    return out


def test_tiny_shapes_run_logs_and_prints_the_breakdown(shapes_run, capsys):
    rows = read_metrics(shapes_run / "metrics.jsonl")
    base, last = rows[0], rows[-1]
    assert base["epoch"] == -1
    for row in (base, last):
        assert set(metrics.SHAPES_EVAL_KEYS) <= set(row)
        assert metrics.undeclared(row) == []
        for key in metrics.SHAPES_EVAL_KEYS:
            assert 0.0 <= row[key] <= 1.0
    prompts = build_prompt_source("shapes/val").iterate_fixed(14)  # the trainer's eval prompts
    unseen = [world.uses_unseen_combination(p) for p in prompts]
    assert any(unseen) and not all(unseen)
    # the seen / unseen means recombine into the overall mean (2 images per prompt)
    n_unseen = sum(unseen)
    mixed = (
        base["eval_reward_seen_mean"] * (14 - n_unseen) + base["eval_reward_unseen_mean"] * n_unseen
    ) / 14
    assert mixed == pytest.approx(base["eval_reward_mean"], abs=1e-6)


def test_labelled_before_after_uses_the_eval_scores(shapes_run):
    from PIL import Image

    saved = np.load(shapes_run / "eval" / "base.npz")
    assert saved["images"].shape == (28, 3, 32, 32) and len(saved["prompts"]) == 14
    # the row labels are the prompts' text, in evaluation order
    assert saved["prompts"].tolist() == build_prompt_source("shapes/val").iterate_fixed(14)
    rows = read_metrics(shapes_run / "metrics.jsonl")
    assert float(np.mean(saved["scores"])) == pytest.approx(rows[0]["eval_reward_mean"], abs=1e-6)
    grid = np.asarray(Image.open(shapes_run / "eval" / "before_after.png"))
    assert (
        grid.shape[0] >= 14 * 128 and grid.shape[1] >= 4 * 128
    )  # 14 prompts x (2 before | 2 after), 4x
    # the labels under the images are the saved eval scores: other scores draw other pixels
    changed = dict(saved)
    changed["scores"] = saved["scores"][::-1].copy()
    np.savez(tmp := shapes_run / "eval" / "changed.npz", **changed)
    last = max((shapes_run / "eval").glob("epoch_*.npz"))
    write_before_after(tmp, last, shapes_run / "eval" / "changed.png", 2)
    other = np.asarray(Image.open(shapes_run / "eval" / "changed.png"))
    assert other.shape == grid.shape and (other != grid).any()
