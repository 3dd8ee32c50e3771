"""Two processes (gloo on CPU) must end with identical parameters, equal to the single-process
run."""

from __future__ import annotations

import pytest
import torch

from diffloop.run_dir import read_metrics


@pytest.mark.slow
def test_two_processes_match_one(tiny_sd, tmp_path, two_processes_and_one):
    # B=3 prompts x K=2 = 6 samples: on 2 processes prompt 1's two samples sit on different ranks,
    # so its leave-one-out baselines need the gathered rewards. Each rank accumulates 3 minibatches
    # of 1 into its step; the single process accumulates 6: the averaged gradients must agree.
    common = {
        "sample.prompts_per_epoch": 3,
        "sample.samples_per_prompt": 2,
        "sample.batch_size": 3,
        "train.batch_size": 1,
        "num_epochs": 2,
    }
    rank0, rank1, one = two_processes_and_one(tiny_sd, tmp_path, 3, **common)
    assert rank0.keys() == one.keys() and len(one) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"
        # Adam normalises each element, so float-order noise in near-zero gradient elements shows up
        # at ~1e-6; a missing sync or a baseline over local rewards only moves parameters by ~lr =
        # 1e-2.
        torch.testing.assert_close(
            rank0[name], one[name], rtol=0, atol=2e-5, msg=f"2 procs != 1 on {name}"
        )
    # Adam is blind to a gradient's scale; the logged pre-clip norm of the averaged gradient is not.
    two_rows, one_rows = (
        read_metrics(tmp_path / "two" / "metrics.jsonl"),
        read_metrics(tmp_path / "one" / "metrics.jsonl"),
    )
    for a, b in zip(two_rows, one_rows, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        assert a["advantage_abs_mean"] == pytest.approx(b["advantage_abs_mean"], rel=1e-3)
