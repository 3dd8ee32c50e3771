"""Golden metrics: two short fixed-seed runs must reproduce their recorded metrics.jsonl exactly.

The fixtures (tests/fixtures/golden/{shapes,tiny_sd}.jsonl) were written by
``scripts/regen_golden.py`` from the code before the policy/loop refactor, so a refactor that
changes any number fails here.
A deliberate change of behaviour (e.g. new seed streams) regenerates them in its own commit.

Comparison is exact (``==`` on the floats read back from JSON, which round-trip float64 exactly):
both runs use one CPU thread and deterministic kernels, so the same operations in the same order
give the same bits. Timing keys (``run_dir.TIME_KEYS``) are left out.

``train.adv_clip_max=5`` is set explicitly so that a change of that default does not move these
runs; so are the LoRA size, the shapes run's guidance and the tiny run's timestep fraction, which
the fixtures were recorded with before the defaults became the shapes-world run's
(diffloop.config).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "golden"

COMMON = {
    "num_epochs": 2,
    "seed": 0,
    "cpu_threads": 1,
    "train.adv_clip_max": 5,
    "lora.rank": 4,
    "lora.alpha": 4.0,
    "train.clip_range": 0.2,
    "logging.progress_bars": False,
    "logging.tensorboard": False,
}

# The shapes world (the shipped pixel-space model), LOOP K=2, with evaluation every epoch.
SHAPES = {
    **COMMON,
    "model.pretrained": "shapes",
    "sample.num_steps": 3,
    "sample.guidance_scale": 5.0,
    "sample.prompts_per_epoch": 2,
    "sample.samples_per_prompt": 2,
    "sample.batch_size": 4,
    "train.batch_size": 2,
    "train.learning_rate": 0.003,
    "train.timestep_fraction": 0.67,
    "reward.name": "shapes_binding",
    "prompts.source": "shapes/train_pair",
    "eval.prompts": "shapes/val_pair",
    "eval.num_prompts": 2,
    "eval.samples_per_prompt": 1,
    "eval.every_n_epochs": 1,
}

# A tiny random-weight SD 1.x pipeline (diffloop.testing.tiny with the committed CLIP BPE
# tokenizer) with the KL-to-base logged.
TINY_SD = {
    **COMMON,
    "sample.num_steps": 3,
    "sample.guidance_scale": 3.0,
    "sample.prompts_per_epoch": 2,
    "sample.samples_per_prompt": 2,
    "sample.batch_size": 4,
    "train.batch_size": 2,
    "train.learning_rate": 0.01,
    "train.log_kl_to_base": True,
    "train.timestep_fraction": 1.0,
    "reward.name": "reward_fns:brightness",
    "prompts.source": "list",
    "prompts.prompts": "[a cat, a dog on a bench, a red ball]",
    "eval.prompts": None,
}


def golden_run(name: str, out: Path, model_dir: Path | None = None) -> list[dict]:
    """Run golden configuration ``name`` ("shapes" or "tiny_sd") into ``out``; its metrics rows
    without timing keys."""
    from diffloop.config import load_config
    from diffloop.run_dir import TIME_KEYS, read_metrics
    from diffloop.trainer import Trainer

    settings = dict(SHAPES if name == "shapes" else TINY_SD, output_dir=out)
    if name == "tiny_sd":
        settings["model.pretrained"] = model_dir
    overrides = [f"{k}={'null' if v is None else v}" for k, v in settings.items()]
    Trainer(load_config(None, overrides)).train()
    return [
        {k: v for k, v in row.items() if k not in TIME_KEYS}
        for row in read_metrics(out / "metrics.jsonl")
    ]


def fixture_path(name: str) -> Path:
    return FIXTURES / f"{name}.jsonl"


def read_fixture(name: str) -> list[dict]:
    return [json.loads(line) for line in fixture_path(name).read_text().splitlines() if line]


@pytest.mark.parametrize("name", ["shapes", "tiny_sd"])
def test_metrics_equal_the_recorded_ones(name, tiny_sd, tmp_path):
    got = golden_run(name, tmp_path / name, tiny_sd)
    expected = read_fixture(name)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
    for row, want in zip(got, expected, strict=True):
        assert set(row) == set(want), f"epoch {row['epoch']}: keys differ"
        diffs = {k: (row[k], want[k]) for k in want if row[k] != want[k]}
        assert not diffs, f"epoch {row['epoch']}: (got, recorded) {diffs}"
