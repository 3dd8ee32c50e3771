"""``diffloop eval``: eval.json statistics, the fixed-noise rule, targets, compare, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffloop.cli import main as cli_main
from diffloop.prompts import build_prompt_source
from diffloop.seeding import eval_image_seed
from diffloop.tools.evaluate import (
    _parse_reward_kwargs,
    eval_main,
    resolve_target,
    summarise,
    unique_labels,
)

STEPS = ["--steps", "3", "--guidance-scale", "3.0"]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """A 2-epoch LoRA run of the shipped shapes model, with checkpoints after epochs 1 and 2."""
    out = tmp_path_factory.mktemp("eval") / "run_a"
    overrides = {
        "output_dir": out,
        "num_epochs": 2,
        "sample.num_steps": 3,
        "sample.prompts_per_epoch": 2,
        "sample.samples_per_prompt": 2,
        "sample.batch_size": 4,
        "train.batch_size": 4,
        "train.learning_rate": 0.05,
        "train.clip_range": 0.2,
        "eval.prompts": "null",
        "keep_checkpoints": 2,
        "logging.progress_bars": False,
        "logging.tensorboard": False,
    }
    assert cli_main(["train", *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    return out


def run_eval(
    out: Path, *targets: str, extra: list[str] = (), rewards=("reward_fns:brightness",)
) -> dict:
    argv = [targets[0]]
    if len(targets) > 1:
        argv += ["--compare", *targets[1:]]
    argv += [
        "--prompts",
        "shapes/val_pair",
        "--num-prompts",
        "2",
        "--images-per-prompt",
        "2",
        "--output",
        str(out),
        "--device",
        "cpu",
        *STEPS,
        *extra,
    ]
    for r in rewards:
        argv += ["--reward", r]
    assert eval_main(argv) == 0
    return json.loads((out / "eval.json").read_text())


def test_summarise_hand_values() -> None:
    s = summarise(torch.tensor([[1.0, 2.0], [3.0, float("nan")]]))
    # valid 1, 2, 3: mean 2, sample std 1, sem 1/sqrt(3)
    assert s == pytest.approx({"mean": 2.0, "std": 1.0, "sem": 1 / math.sqrt(3), "n": 3}, abs=1e-12)
    assert summarise(torch.tensor([5.0])) == {"mean": 5.0, "std": 0.0, "sem": 0.0, "n": 1}
    assert summarise(torch.tensor([float("nan")])) == {
        "mean": None,
        "std": None,
        "sem": None,
        "n": 0,
    }


def test_eval_of_a_run_writes_valid_eval_json(shapes_run, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    result = run_eval(out, str(shapes_run), rewards=("reward_fns:brightness", "shapes_binding"))
    (target,) = result["targets"]
    assert target["kind"] == "run" and target["label"] == "run_a"
    assert target["checkpoint"].endswith("epoch_000002")  # the newest checkpoint
    # no --eta: the run's evaluation sampler, which for a DDIM model is its training sampler (eta 1)
    assert result["settings"]["num_steps"] == 3 and result["settings"]["eta"] == 1.0
    # --num-prompts 2 of val_pair: its prompts 0 and 158 (spread over the split, as training's eval)
    prompts = [
        "a red circle and a yellow cross",
        build_prompt_source("shapes/val_pair").prompts[158],
    ]
    assert prompts == build_prompt_source("shapes/val_pair").iterate_fixed(2)
    for name in ("reward_fns:brightness", "shapes_binding"):
        rows = target["per_prompt"][name]
        assert [r["prompt"] for r in rows] == prompts
        values = [v for r in rows for v in r["scores"]]
        assert len(values) == 4 and all(isinstance(v, float) for v in values)
        for r in rows:
            assert r["mean"] == pytest.approx(sum(r["scores"]) / 2, abs=1e-9)
        mean = sum(values) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
        stats = target["rewards"][name]
        assert stats["n"] == 4 and stats["n_invalid"] == 0
        assert stats["mean"] == pytest.approx(mean, abs=1e-9)
        assert stats["std"] == pytest.approx(std, abs=1e-9)
        assert stats["sem"] == pytest.approx(std / 2, abs=1e-9)
    # rows = prompts, columns = images; 32 px images upscaled x4: (2 (32 + 2) + 2) x 4 = 280
    with Image.open(out / target["grid"]) as grid:
        assert grid.size == (280, 280)
    assert "run_a" in capsys.readouterr().out


def test_seed_rule_and_determinism(shapes_run, tiny_sd, tmp_path) -> None:
    """Image j of prompt i uses eval_image_seed(seed, i, j) whatever K, batch size or target."""
    from diffloop.config import LoraConfig, ModelConfig
    from diffloop.loops import eval_seeds, make_generators
    from diffloop.policies.families import load_policy

    assert eval_seeds(7, 2, 3) == [eval_image_seed(7, i, j) for i in range(2) for j in range(3)]
    model = str(tiny_sd)  # a diffusers directory (latent model with a VAE) as target
    a = run_eval(tmp_path / "a", model, extra=["--batch-size", "4"])
    entry = a["targets"][0]
    assert entry["kind"] == "model" and entry["checkpoint"] is None
    # by hand: deterministic DDIM from the documented seeds, scored with the same reward
    policy = load_policy(
        ModelConfig(pretrained=model), LoraConfig(enabled=False), device=torch.device("cpu")
    )
    prompts = [r["prompt"] for r in entry["per_prompt"]["reward_fns:brightness"] for _ in range(2)]
    seeds = [eval_image_seed(0, i, j) for i in range(2) for j in range(2)]
    traj = policy.sample(
        prompts,
        make_generators(torch.device("cpu"), seeds),
        num_steps=3,
        eta=0.0,
        guidance_scale=3.0,
    )
    expected = traj.images.mean(dim=(1, 2, 3)).tolist()
    got = [v for r in entry["per_prompt"]["reward_fns:brightness"] for v in r["scores"]]
    assert got == pytest.approx(expected, abs=1e-6)
    # batch size 1 and 3 images per prompt: the first two images of each prompt are unchanged
    b = run_eval(tmp_path / "b", model, extra=["--batch-size", "1", "--images-per-prompt", "3"])
    got3 = [r["scores"][:2] for r in b["targets"][0]["per_prompt"]["reward_fns:brightness"]]
    assert [v for pair in got3 for v in pair] == pytest.approx(expected, abs=1e-6)
    # stochastic sampling (eta > 0): reproducible, and different from eta = 0
    c1 = run_eval(tmp_path / "c1", model, extra=["--eta", "1.0"])["targets"][0]["rewards"]
    c2 = run_eval(tmp_path / "c2", model, extra=["--eta", "1.0"])["targets"][0]["rewards"]
    assert (
        c1 == c2
        and c1["reward_fns:brightness"]["mean"] != entry["rewards"]["reward_fns:brightness"]["mean"]
    )


def test_compare_targets_side_by_side(shapes_run, tmp_path, capsys) -> None:
    ckpt2 = shapes_run / "checkpoints" / "epoch_000002"
    ckpt1 = shapes_run / "checkpoints" / "epoch_000001"
    result = run_eval(tmp_path / "cmp", "shapes", str(ckpt2), str(shapes_run), str(ckpt1))
    labels = [t["label"] for t in result["targets"]]
    assert labels == ["shapes", "run_a@epoch_000002", "run_a", "run_a@epoch_000001"]
    assert [t["kind"] for t in result["targets"]] == ["model", "checkpoint", "run", "checkpoint"]
    per_image = {
        t["label"]: [v for r in t["per_prompt"]["reward_fns:brightness"] for v in r["scores"]]
        for t in result["targets"]
    }
    # the run dir is its newest checkpoint: same weights, same noise -> the same images exactly
    assert per_image["run_a"] == per_image["run_a@epoch_000002"]
    assert per_image["run_a@epoch_000001"] != per_image["run_a"]  # training changed the model
    assert per_image["shapes"] != per_image["run_a"]  # the LoRA changed the base
    # paired differences against the first target, by hand
    for label in labels[1:]:
        d = [x - y for x, y in zip(per_image[label], per_image["shapes"], strict=True)]
        mean = sum(d) / 4
        sem = math.sqrt(sum((v - mean) ** 2 for v in d) / 3) / 2
        diff = next(t for t in result["targets"] if t["label"] == label)["difference_vs_first"]
        assert diff["reward_fns:brightness"]["mean"] == pytest.approx(mean, abs=1e-9)
        assert diff["reward_fns:brightness"]["sem"] == pytest.approx(sem, abs=1e-9)
    assert "difference_vs_first" not in result["targets"][0]
    # one grid per target plus compare.png: 4 blocks of 280 px and 3 gaps of 16 px, a 16 px header
    for t in result["targets"]:
        assert (tmp_path / "cmp" / t["grid"]).is_file()
    with Image.open(tmp_path / "cmp" / "compare.png") as grid:
        assert grid.size == (4 * 280 + 3 * 16, 280 + 16)
    table = capsys.readouterr().out
    assert all(label in table for label in labels) and "vs first" in table


def test_prompt_file_and_reward_kwargs(shapes_run, tmp_path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    argv = [
        str(shapes_run),
        "--prompts",
        str(prompts),
        "--images-per-prompt",
        "1",
        "--reward",
        "shapes_binding",
        "--reward-kwargs",
        '{"aggregate": "mean"}',
        "--output",
        str(tmp_path / "o"),
        "--device",
        "cpu",
        *STEPS,
    ]
    assert eval_main(argv) == 0
    result = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert result["settings"]["prompts"] == f"file:{prompts}"
    assert [r["prompt"] for r in result["targets"][0]["per_prompt"]["shapes_binding"]] == [
        "a red circle",
        "a blue square",
    ]
    assert result["settings"]["reward_kwargs"] == {"shapes_binding": {"aggregate": "mean"}}


def test_reward_kwargs_parsing() -> None:
    assert _parse_reward_kwargs('{"a": 1}', ["r"]) == {"r": {"a": 1}}
    assert _parse_reward_kwargs('{"r2": {"a": 1}}', ["r1", "r2"]) == {"r2": {"a": 1}}
    with pytest.raises(ValueError, match="maps reward name -> kwargs"):
        _parse_reward_kwargs('{"a": 1}', ["r1", "r2"])
    with pytest.raises(ValueError, match="not valid JSON"):
        _parse_reward_kwargs("{a: 1", ["r"])


def test_target_resolution(shapes_run, tmp_path) -> None:
    assert resolve_target(str(shapes_run)).kind == "run"
    ckpt = resolve_target(str(shapes_run / "checkpoints" / "epoch_000001"))
    assert (ckpt.kind, ckpt.run_dir, ckpt.label) == ("checkpoint", shapes_run, "run_a@epoch_000001")
    hub = resolve_target("stabilityai/stable-diffusion-2-base")
    assert (hub.kind, hub.label) == ("model", "stabilityai_stable-diffusion-2-base")
    labels = [t.label for t in unique_labels([resolve_target("shapes")] * 3)]
    assert labels == ["shapes", "shapes-2", "shapes-3"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts", "shapes/val_pairs"], "Did you mean 'val_pair'"),
        (["--prompts", "EMPTY"], "contains no prompts"),
        (["--prompts", "shapes/val_pair", "--reward", "no_such_reward"], "unknown reward"),
        (["--prompts", "shapes/val_pair", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    ],
)
def test_usage_errors_exit_2_before_loading_a_model(tmp_path, capsys, extra, message) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    extra = [str(empty) if e == "EMPTY" else e for e in extra]
    rewards = [] if "--reward" in extra else ["--reward", "shapes_binding"]
    code = eval_main(["no/such/model", *extra, *rewards, "--output", str(tmp_path / "o")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_of_a_run_reproduces_its_final_evaluation_exactly(tmp_path) -> None:
    """The trainer's evaluation and ``diffloop eval`` are one loop with one seed rule (the run
    trains on the default shapes_binding_mean, so equality also shows it evaluated with
    shapes_binding)."""
    from diffloop.loops import eval_summary
    from diffloop.run_dir import read_metrics

    run = tmp_path / "run"
    overrides = {
        "output_dir": run, "num_epochs": 1, "sample.num_steps": 3, "sample.prompts_per_epoch": 2,
        "sample.samples_per_prompt": 2, "sample.batch_size": 4, "train.batch_size": 4,
        "train.learning_rate": 0.05, "train.clip_range": 0.2, "eval.prompts": "shapes/val_pair",
        "eval.num_prompts": 2, "eval.samples_per_prompt": 2, "eval.seed": 7, "eval.batch_size": 3,
        "logging.progress_bars": False, "logging.tensorboard": False,
    }  # fmt: skip
    assert cli_main(["train", *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    final = read_metrics(run / "metrics.jsonl")[-1]
    argv = ["eval", str(run), "--prompts", "shapes/val_pair", "--num-prompts", "2",
            "--images-per-prompt", "2", "--reward", "shapes_binding", "--eta", "1.0", "--seed", "7",
            "--batch-size", "3",
            "--output", str(tmp_path / "eval"), "--device", "cpu"]  # fmt: skip
    assert cli_main(argv) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    rows = result["targets"][0]["per_prompt"]["shapes_binding"]
    scores = torch.tensor([v for r in rows for v in r["scores"]], dtype=torch.float32)
    assert eval_summary(scores)["eval_reward_mean"] == final["eval_reward_mean"]
    assert result["targets"][0]["rewards"]["shapes_binding"]["mean"] == pytest.approx(
        final["eval_reward_mean"], rel=1e-6
    )  # the same scores, averaged in float64


def test_base_model_first_still_samples_as_the_run(shapes_run, tmp_path, capsys) -> None:
    # `eval shapes --compare RUN` once used 50 steps / guidance 5 (the first target has no config):
    # the defaults now come from the first run whatever its position, and the CLI prints them.
    argv = ["shapes", "--compare", str(shapes_run), "--prompts", "shapes/val_pair", "--num-prompts",
            "1", "--images-per-prompt", "1", "--output", str(tmp_path / "e"), "--device", "cpu",
            "--reward", "reward_fns:brightness"]  # fmt: skip
    assert eval_main(argv) == 0
    settings = json.loads((tmp_path / "e" / "eval.json").read_text())["settings"]
    assert (settings["num_steps"], settings["guidance_scale"]) == (3, 3.0)  # the run's sample.*
    assert "sampled with 3 steps, guidance 3.0" in capsys.readouterr().out


def test_an_interrupted_eval_keeps_the_targets_it_finished(shapes_run, tmp_path, monkeypatch):
    from diffloop.tools import evaluate

    real_load = evaluate.load_target

    def load_or_stop(target, device):
        if target.kind == "run":
            raise KeyboardInterrupt  # as a user's Ctrl-C on the second target
        return real_load(target, device)

    monkeypatch.setattr(evaluate, "load_target", load_or_stop)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_model(
            ["shapes", str(shapes_run)],
            prompts="shapes/val_pair",
            rewards=["reward_fns:brightness"],
            num_prompts=2,
            images_per_prompt=2,
            num_steps=3,
            output_dir=out,
        )
    kept = json.loads((out / "eval.json").read_text())
    assert [t["label"] for t in kept["targets"]] == ["shapes"]
    assert len(kept["targets"][0]["per_prompt"]["reward_fns:brightness"]) == 2
    assert kept["settings"]["num_steps"] == 3
    assert not list(out.glob("*.tmp"))
