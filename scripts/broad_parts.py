"""The broad check's work list for scripts/make_results.sh (step 3).

    python scripts/broad_parts.py plan RUNS_DIR SHARDS      # one line per part: its run directories
    python scripts/broad_parts.py done EVAL_JSON TARGET...  # exit 0 iff the file lists exactly
                                                            # the base model and these targets

A part is a group of consecutive seeds: the finished runs of RUNS_DIR/summary.json (its "curves",
NAME/seed_S, in the summary's order) split into at most SHARDS groups of equal size, so that each
`diffloop eval` process evaluates the base once and then every run of its seeds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BASE_TARGET = "shapes"  # the base model, first target of every part


def plan(runs_dir: str, shards: int) -> list[list[str]]:
    """Run directories per part: consecutive seeds, ceil(seeds / shards) seeds a part."""
    keys = list(json.loads((Path(runs_dir) / "summary.json").read_text())["curves"])
    seed_of = {k: int(k.rsplit("/seed_", 1)[1]) for k in keys}
    seeds = sorted(set(seed_of.values()))
    size = -(-len(seeds) // max(1, shards))
    groups = [set(seeds[i : i + size]) for i in range(0, len(seeds), size)]
    return [[f"{runs_dir}/{k}" for k in keys if seed_of[k] in group] for group in groups]


def is_done(eval_json: Path, targets: list[str]) -> bool:
    """Whether eval_json (as `diffloop eval` writes it) has scored the base and exactly
    ``targets``."""
    if not eval_json.is_file():
        return False
    scored = [t["target"] for t in json.loads(eval_json.read_text())["targets"]]
    return scored == [BASE_TARGET, *targets]


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "plan":
        for part in plan(argv[1], int(argv[2])):
            print(" ".join(part))
        return 0
    if len(argv) >= 2 and argv[0] == "done":
        return 0 if is_done(Path(argv[1]), argv[2:]) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
