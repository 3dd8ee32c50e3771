"""One training process per run directory: a second `diffloop train` (fresh or resume=true) on the
same output_dir is refused in one line naming the first, whose run stays intact; a lock left by a
dead process never blocks; readers (`diffloop sample RUN`) are never blocked; in a launch only the
main rank locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diffloop.cli import main
from diffloop.testing.processes import cli_env, wait_for
from diffloop.testing.runs import shapes_overrides

LOCK = ".diffloop.lock"  # diffloop.run_lock.LOCK_NAME


def start_train(args: list[str]) -> subprocess.Popen:
    """``python -m diffloop train ARGS`` as a separate process (its pid is the lock holder's)."""
    cmd = [sys.executable, "-m", "diffloop", "train", *args]
    return subprocess.Popen(
        cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


HOLDER = (
    "import sys, time\n"
    "from diffloop.run_lock import acquire\n"
    "lock = acquire(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def hold_lock(directory: Path) -> subprocess.Popen:
    """A light process (no torch) holding ``directory``'s run lock until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # as the OOM killer would: no clean-up runs
    proc.wait()


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("diffloop: error: ")
    return lines[0]


# ------------------------------------------------------------------------ two real `diffloop train`


@pytest.mark.slow
def test_second_train_on_a_running_run_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = start_train(shapes_overrides(out))
    # The first holds the lock from before it reads or writes anything in output_dir.
    wait_for(lambda: (out / LOCK).exists() or (out / "config.yaml").exists(), first)
    for extra in ([], ["resume=true"]):  # a fresh start and a resume are both refused
        second = subprocess.run(
            [sys.executable, "-m", "diffloop", "train", *shapes_overrides(out), *extra],
            env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        line = one_line_error(second.stderr)
        assert f"output_dir={out} is in use by another diffloop process (pid {first.pid} " in line
        assert "started 20" in line and "command: python -m diffloop train" in line
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    # The first run is intact: its own record, one session, each epoch once, its checkpoint.
    from diffloop import checkpoint
    from diffloop.resume import read_jsonl
    from diffloop.run_dir import read_metrics

    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(read_jsonl(out / "sessions.jsonl")) == 1
    argv = json.loads((out / "run_info.json").read_text())["argv"]
    assert argv == ["diffloop", "train", *shapes_overrides(out)]  # its own, not the second's
    path = checkpoint.latest_checkpoint(out)
    assert path.name == "epoch_000002"
    assert checkpoint.load(path, rank=0)["state"].epochs_completed == 2
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / LOCK).exists()  # removed when the run ended


# --------------------------------------------------------------------------- a light holder process


def test_refusal_names_the_holder_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        code = main(["train", *shapes_overrides(out)])
        line = one_line_error(capsys.readouterr().err)
        assert code == 2
        assert f"output_dir={out} is in use by another diffloop process (pid {holder.pid} " in line
        assert "wait for it to end, or choose another output_dir" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing read or written
    finally:
        stop(holder)


@pytest.mark.slow
def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path, capsys):
    from diffloop import run_lock

    out = tmp_path / "run"
    stop(hold_lock(out))  # killed: its lock file stays behind, naming it
    assert json.loads((out / LOCK).read_text())["pid"] > 0
    assert main(["train", *shapes_overrides(out, num_epochs=1)]) == 0
    assert (out / "checkpoints" / "epoch_000001" / "COMPLETE").is_file()
    assert not (out / LOCK).exists() and not run_lock.is_held(out)


def test_acquire_is_reentrant_in_a_process_and_refused_in_another(tmp_path):
    from diffloop.run_lock import RunLockedError, acquire, is_held

    out = tmp_path / "new" / "run"
    outer = acquire(out)
    inner = acquire(out)  # diffloop train locks, then its Trainer locks again
    info = json.loads((out / LOCK).read_text())
    assert info["pid"] == os.getpid() and {"host", "started", "command"} <= set(info)
    inner.release()
    inner.release()  # a second release of one hold does nothing
    assert is_held(out) and (out / LOCK).exists()
    outer.release()
    assert not is_held(out)
    assert not (tmp_path / "new").exists()  # it created them and nothing else was written
    holder = hold_lock(out)
    try:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
            acquire(out)
    finally:
        stop(holder)
    with acquire(out):  # the holder died: free again
        assert is_held(out)


def test_only_the_main_rank_locks_and_every_rank_learns_of_a_refusal(tmp_path):
    """In a launch the main process holds the one lock; the other ranks never try (so they are
    not refused by it) but raise the main process's refusal, so all end together."""
    from diffloop.run_lock import RunLockedError, is_held
    from diffloop.trainer import Trainer

    class Rank:
        _run_lock = None

        def __init__(self, is_main: bool, told: str | None = None) -> None:
            self.config = type("C", (), {"output_dir": str(tmp_path / "run")})()
            self.dist = type("D", (), {"is_main": is_main})()
            self.dist.broadcast_object = lambda obj: obj if is_main else told

    Trainer._hold_run_lock(Rank(is_main=False))  # rank 1 of a run nobody holds: no lock taken
    assert not is_held(tmp_path / "run")
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} ") as refused:
            Trainer._hold_run_lock(Rank(is_main=True))
        with pytest.raises(RunLockedError) as told:
            Trainer._hold_run_lock(Rank(is_main=False, told=str(refused.value)))
        assert str(told.value) == str(refused.value)
    finally:
        stop(holder)


@pytest.mark.slow
def test_sample_reads_a_run_whose_lock_is_held(tmp_path, capsys):
    """Readers take no lock: `diffloop sample RUN` works on a run that is training."""
    out = tmp_path / "run"
    assert main(["train", *shapes_overrides(out, num_epochs=1)]) == 0
    holder = hold_lock(out)  # as if the run were being resumed right now
    try:
        samples = tmp_path / "samples"
        argv = ["sample", str(out), "--prompt", "a red circle", "--num-per-prompt", "1",
                "--steps", "2", "--output", str(samples), "--device", "cpu"]  # fmt: skip
        assert main(argv) == 0
        assert (samples / "grid.png").is_file()
    finally:
        stop(holder)
