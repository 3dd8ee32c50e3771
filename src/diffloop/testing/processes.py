"""Training in other processes, for tests: the environment a child process gets, waiting on it,
and a multi-process launch through torchrun (gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def cli_env() -> dict[str, str]:
    """This process's environment, offline and on one thread (a child's hub lookup costs ~50 s)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``condition`` until it holds; fail with ``proc``'s stderr if it ends first, and kill it
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"process ended early ({proc.returncode}): {err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the process")
        time.sleep(0.05)


def launch(worker: Path, nproc: int, overrides: list[str]) -> None:
    """Run the script ``worker`` with ``overrides`` as ``nproc`` processes under torchrun
    (``torch.distributed.run --standalone``) and assert that the launch succeeded."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(worker),
        *overrides,
    ]
    result = subprocess.run(
        cmd, env=cli_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
