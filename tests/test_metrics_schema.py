"""The metrics schema (diffloop.metrics) is the only definition of metrics.jsonl keys.

A real tiny training run writes only declared keys (and every declared key but the ones other
features add), its TensorBoard tags are the schema's, the report / sweep / claims read nothing
undeclared, and the key table of docs/guide.md is the generated one.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path
from typing import ClassVar

import pytest

from diffloop import metrics
from diffloop.config import load_config
from diffloop.run_dir import TIME_KEYS, RunDirectory, read_metrics
from diffloop.testing.runs import tiny_overrides
from diffloop.tools import claims, report, sweep
from diffloop.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# shapes_binding reward only: tests/test_summary.py checks that they are written.
PENDING = set(metrics.SHAPES_EVAL_KEYS)
MULTI_REWARD = """reward:
  name: multi
  components:
    - {name: "reward_fns:brightness"}
    - {name: "reward_fns:brightness", weight: 0.5}
"""


@pytest.fixture(scope="module")
def run(tiny_sd, tmp_path_factory) -> Path:
    """2 epochs with every optional key switched on: a composite reward, K = 2 (group diversity),
    KL to the base model, evaluation every epoch, TensorBoard."""
    root = tmp_path_factory.mktemp("schema")
    (root / "multi.yaml").write_text(MULTI_REWARD)
    out = root / "run"
    extra = {"sample.num_steps": 2, "train.log_kl_to_base": "true",
             "eval.prompts": "shapes/val_pair",
             "eval.num_prompts": 1, "eval.samples_per_prompt": 2, "eval.every_n_epochs": 1,
             "logging.tensorboard": "true"}  # fmt: skip
    overrides = tiny_overrides(tiny_sd, out, **extra)
    overrides = [o for o in overrides if not o.startswith("reward.name=")]
    Trainer(load_config(root / "multi.yaml", overrides)).train()
    return out


def written_keys(run: Path) -> set[str]:
    return {k for row in read_metrics(run / "metrics.jsonl") for k in row}


def test_trainer_writes_only_declared_keys(run):
    assert metrics.undeclared(written_keys(run)) == []


def test_every_declared_key_is_written(run):
    """No phantom keys: what the schema declares, the trainer writes (patterns: at least once)."""
    written = written_keys(run)
    assert set(metrics.METRICS) - PENDING - written == set()
    for pattern in metrics.PATTERNS:
        assert any(metrics.lookup(k) is pattern for k in written), pattern.key
    assert {"reward_reward_fns:brightness_mean", "reward_reward_fns:brightness_1_mean"} <= written


def test_tensorboard_tags_are_the_schema_tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    rows = read_metrics(run / "metrics.jsonl")
    numeric = {
        k for r in rows for k, v in r.items() if k != "epoch" and isinstance(v, (int, float))
    }
    assert tags == {metrics.tensorboard_tag(k) for k in numeric}
    assert {metrics.canonical(t) for t in tags} == numeric  # every tag names its key back
    assert "reward/mean" in tags and "policy/approx_kl" in tags and "time/sample_time_s" in tags


def test_undeclared_key_is_refused(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "logging.tensorboard=false"])
    run_dir = RunDirectory(config, is_main=True, start_epoch=0)
    with pytest.raises(metrics.UnknownMetricError, match=r"'ratio_max_dev'.*diffloop/metrics.py"):
        run_dir.log({"epoch": 0, "reward_mean": 1.0, "ratio_max_dev": 0.1})


class RecordingRow(dict):
    """A metrics row that records every key read from it (by [], get or in)."""

    reads: ClassVar[set[str]] = set()

    def __getitem__(self, key):
        RecordingRow.reads.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        RecordingRow.reads.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        RecordingRow.reads.add(key)
        return super().__contains__(key)


def test_report_sweep_and_claims_read_only_declared_keys(run, tmp_path, monkeypatch):
    import diffloop.run_dir

    real_read, real_canonical = diffloop.run_dir.read_metrics, metrics.canonical_row

    def recording_read(path):
        return [RecordingRow(r) for r in real_read(path)]

    for module in (diffloop.run_dir, sweep, claims):
        monkeypatch.setattr(module, "read_metrics", recording_read)
    monkeypatch.setattr(metrics, "canonical_row", lambda r: RecordingRow(real_canonical(r)))
    RecordingRow.reads = set()

    report.write_report([run], tmp_path / "report.html")
    planned = sweep.PlannedRun(name="a", seed=0, output_dir=run, overrides=(), algorithm="loop",
                               prompts_per_epoch=2, samples_per_prompt=2, num_epochs=2)  # fmt: skip
    assert sweep.run_status(planned) == "finished"
    curve = sweep.curve_from_metrics(recording_read(run / "metrics.jsonl"))
    assert len(curve.reward) == 3  # base + 2 evaluated epochs
    (tmp_path / "runs" / "a" / "seed_0").mkdir(parents=True)
    shutil.copy(run / "metrics.jsonl", tmp_path / "runs" / "a" / "seed_0" / "metrics.jsonl")
    lines = claims.update_rows({"curves": {"a/seed_0": {}}}, tmp_path / "runs")
    assert lines[-1].startswith("| a | 4 |")  # 2 epochs x (4 samples / train.batch_size 2)

    assert RecordingRow.reads, "the readers read nothing: the recording is broken"
    assert metrics.undeclared(RecordingRow.reads) == []
    assert {"eval_reward_mean", "prompts_seen", "clipfrac", "reward_mean"} <= RecordingRow.reads


@pytest.mark.parametrize("module", ["report.py", "report_curves.py", "report_page.py"])
def test_report_spells_keys_only_through_the_schema(module: str):
    """Every string literal in the report's modules that is a metric key is the argument of
    metrics.key()."""
    tree = ast.parse((ROOT / "src" / "diffloop" / "tools" / module).read_text())
    through_key = {
        id(node.args[0])
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "key"
    }
    literals = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and metrics.lookup(node.value) is not None and id(node) not in through_key
    ]  # fmt: skip
    assert literals == []


def test_readme_key_table_is_generated_from_the_schema():
    readme = (ROOT / "docs" / "guide.md").read_text()  # the README links to the guide
    assert metrics.readme_block() in readme, (
        "regenerate it: python -m diffloop.metrics docs/guide.md"
    )
    assert metrics.replace_readme_block(readme) == readme


def test_wallclock_keys_are_the_schemas():
    assert set(TIME_KEYS) == {k for k, m in metrics.METRICS.items() if m.processes == "main"}


def test_exact_keys_win_over_patterns_and_aliases_map_back():
    assert metrics.lookup("reward_group_std_mean") is metrics.METRICS["reward_group_std_mean"]
    assert metrics.lookup("reward_clip_score_mean") is metrics.PATTERNS[0]
    assert metrics.lookup("reward_mean_typo") is None
    assert metrics.tensorboard_tag("reward_mean") == "reward/mean"
    assert metrics.tensorboard_tag("eval_time_s") == "eval/time_s"
    assert metrics.tensorboard_tag("reward_clip_score_mean") == "reward/clip_score_mean"
    assert metrics.tensorboard_tag("monitor_brightness") == "monitor/brightness"
    assert metrics.canonical("policy/clipfrac") == "clipfrac"
    assert metrics.canonical("reward/clip_score_mean") == "reward_clip_score_mean"
    assert metrics.canonical("policy/reward_mean") is None  # not reward_mean's tag
    row = {"reward/mean": 1.0, "reward_mean": 2.0, "train/lr": 0.1, "old_key": 3}
    assert metrics.canonical_row(row) == {"reward_mean": 2.0, "lr": 0.1, "old_key": 3}


def test_epoch_reductions():
    assert metrics.reduce_epochs("clipfrac", [0.1, 0.3]) == pytest.approx(0.2)
    assert metrics.reduce_epochs("optimizer_steps", [4, 8]) == 8  # cumulative: the last
    assert metrics.reduce_epochs("onpolicy_logprob_err", [1e-7, 3e-7, 2e-7]) == 3e-7
    assert metrics.reduce_epochs("reward_invalid", [1, 0, 2]) == 3
    with pytest.raises(ValueError, match="no reduction over epochs"):
        metrics.reduce_epochs("eval_reward_mean", [0.1])
    with pytest.raises(metrics.UnknownMetricError, match="not in the metrics schema"):
        metrics.get("ratio_max_dev")


def test_schema_entries_are_consistent():
    for m in (*metrics.METRICS.values(), *metrics.PATTERNS):
        if m.band is not None:
            assert m.band in metrics.METRICS and m.section is not None
    rows = metrics.markdown_table().splitlines()
    assert len(rows) == 2 + len(metrics.METRICS) + len(metrics.PATTERNS) + 1  # + EVAL_CATEGORY
    assert all(len(re.split(r"(?<!\\)\|", row)) == 8 for row in rows)  # 6 cells each, |A| escaped
    with pytest.raises(ValueError, match="processes='avg'"):
        metrics.Metric("x", "x", "avg", None, None, "samples", "train")
