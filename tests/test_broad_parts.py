"""scripts/broad_parts.py: the broad check's parts (consecutive seeds) and its done test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "broad_parts", Path(__file__).resolve().parents[1] / "scripts" / "broad_parts.py"
)
broad_parts = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(broad_parts)


def write_summary(runs: Path, seeds: list[int]) -> None:
    curves = {f"{name}/seed_{s}": {} for s in seeds for name in ("loop_k4", "ppo_k1")}
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "summary.json").write_text(json.dumps({"curves": curves}))


def test_parts_are_consecutive_seeds_in_the_summary_order(tmp_path):
    write_summary(tmp_path, [0, 1, 2])
    r = str(tmp_path)
    assert broad_parts.plan(r, 2) == [
        [f"{r}/loop_k4/seed_0", f"{r}/ppo_k1/seed_0", f"{r}/loop_k4/seed_1", f"{r}/ppo_k1/seed_1"],
        [f"{r}/loop_k4/seed_2", f"{r}/ppo_k1/seed_2"],
    ]
    first, second = broad_parts.plan(r, 2)
    assert broad_parts.plan(r, 1) == [first + second]
    assert len(broad_parts.plan(r, 8)) == 3  # never an empty part


def test_a_part_is_done_only_when_it_scored_exactly_the_base_and_its_targets(tmp_path, capsys):
    path = tmp_path / "eval.json"
    targets = ["runs/loop_k4/seed_0", "runs/ppo_k1/seed_0"]
    assert not broad_parts.is_done(path, targets)  # not started
    path.write_text(json.dumps({"targets": [{"target": t} for t in ["shapes", targets[0]]]}))
    assert not broad_parts.is_done(path, targets)  # interrupted after one run
    path.write_text(json.dumps({"targets": [{"target": t} for t in ["shapes", *targets]]}))
    assert broad_parts.is_done(path, targets)
    assert not broad_parts.is_done(path, [*targets, "runs/loop_k4/seed_1"])  # a seed was added
    assert broad_parts.main(["done", str(path), *targets]) == 0
    assert broad_parts.main(["done", str(path), targets[0]]) == 1
    assert broad_parts.main(["plan"]) == 2 and "broad_parts.py plan" in capsys.readouterr().err
