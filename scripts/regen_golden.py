"""Rewrite tests/fixtures/golden/*.jsonl from the current code (after a deliberate behaviour
change).

    PYTHONPATH=src OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/regen_golden.py

Runs the same two configurations as tests/test_golden.py (the shapes world; the tiny SD pipeline of
diffloop.testing.tiny with the committed CLIP BPE tokenizer, as the tests' ``tiny_sd`` fixture) and
writes their metrics without timing keys. Commit the result separately, saying which change moved
the numbers.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(
    0, str(TESTS)
)  # test_golden (the run definitions), reward_fns (the tiny SD's reward)


def main() -> int:
    import torch

    torch.set_num_threads(1)  # as tests/conftest.py
    from test_golden import fixture_path, golden_run

    from diffloop.testing.tiny import make_tiny_sd

    with tempfile.TemporaryDirectory(prefix="diffloop-golden-") as tmp:
        model = make_tiny_sd(Path(tmp) / "tiny_sd")
        for name in ("shapes", "tiny_sd"):
            rows = golden_run(name, Path(tmp) / name, model)
            path = fixture_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"wrote {path} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
