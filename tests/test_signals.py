"""SIGTERM (a scheduler's stop: SLURM, Kubernetes) ends `diffloop train` as Ctrl-C does: the same
one line saying what was kept and how to resume, the same exit status."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diffloop.checkpoint import resume_command
from diffloop.testing.processes import cli_env, wait_for
from diffloop.testing.runs import shapes_overrides

INTERRUPTED = 130  # diffloop.cli.INTERRUPTED: Ctrl-C's status (128 + SIGINT)


def start_train(out: Path, **extra) -> subprocess.Popen:
    """A long run (it is stopped by a signal) as a separate process, with SIGINT's default
    disposition even when the tests run in a background job (which ignores SIGINT)."""
    args = shapes_overrides(out, num_epochs=50, **extra)
    return subprocess.Popen(
        [sys.executable, "-m", "diffloop", "train", *args],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # (set between fork and exec; the test process starts no threads of its own)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )


def stopped(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    """Send ``sig``; the exit status and the last line of stderr."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err[-3000:]
    return proc.returncode, (err.strip().splitlines() or [""])[-1]


def kept_line(out: Path) -> str:
    from diffloop.checkpoint import latest_checkpoint

    latest = latest_checkpoint(out)
    done = int(latest.name.removeprefix("epoch_"))
    return (
        f"diffloop: interrupted; kept checkpoint {latest} ({done} epochs done); "
        f"resume with: {resume_command(out)}"
    )


@pytest.mark.slow
def test_sigterm_after_a_checkpoint_ends_the_run_as_ctrl_c_does(tmp_path):
    runs = {sig: tmp_path / sig.name for sig in (signal.SIGTERM, signal.SIGINT)}
    procs = {sig: start_train(out) for sig, out in runs.items()}  # side by side: half the wait
    results = {}
    for sig, proc in procs.items():
        done = runs[sig] / "checkpoints" / "epoch_000001" / "COMPLETE"
        wait_for(done.is_file, proc)
        results[sig] = stopped(proc, sig)
    for sig, (code, line) in results.items():
        assert code == INTERRUPTED, (sig, code, line)
        assert line == kept_line(runs[sig]), sig
    assert not list((runs[signal.SIGTERM] / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_sigterm_before_any_checkpoint_says_there_is_none(tmp_path):
    out = tmp_path / "run"
    proc = start_train(out, checkpoint_every=100)  # training, but no checkpoint for 50 epochs
    wait_for((out / "metrics.jsonl").is_file, proc)
    code, line = stopped(proc, signal.SIGTERM)
    assert code == INTERRUPTED
    assert line == (
        "diffloop: interrupted; no checkpoint yet (resuming restarts from epoch 0); "
        f"resume with: {resume_command(out)}"
    )
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_sigterm_handler_is_restored_after_train(tmp_path, capsys):
    """`diffloop train` called in-process leaves the caller's SIGTERM handler as it was."""
    from diffloop.cli import main

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert main(["train", "--help"]) == 0
        assert main(["train", *shapes_overrides(tmp_path / "run", num_epochs=0)]) == 2  # refused
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_the_ctrl_c_exception_once():
    import os

    from diffloop.cli import Terminated, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        with pytest.raises(KeyboardInterrupt) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert isinstance(stop.value, Terminated)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one (torchrun's, after SLURM's): ignored
    assert signal.getsignal(signal.SIGTERM) is before
