"""Training in other processes, for tests: the environment a child process gets, waiting on it,
and a multi-process launch through torchrun (gloo on CPU)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
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


def launch_nodes(worker: Path, nnodes: int, overrides: list[str], port: int) -> None:
    """Run ``worker`` with ``overrides`` as ``nnodes`` "nodes" of one process each on this machine:
    ``nnodes`` torchrun launchers meeting through the c10d rendezvous on 127.0.0.1:``port``, as
    ``torchrun --nnodes`` on several machines would (the first hosts the rendezvous store); assert
    that every launcher succeeded."""
    rendezvous = [f"--nnodes={nnodes}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint=127.0.0.1:{port}"]  # fmt: skip
    errors = []
    with contextlib.ExitStack() as stack:
        # each node's output in a file, not a pipe: a full pipe would block a node
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(nnodes)]
        procs = []
        for i in range(nnodes):
            node = [f"--node_rank={i}", f"--rdzv_conf=is_host={str(i == 0).lower()}"]
            command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, *node]
            procs.append(
                subprocess.Popen(
                    [*command, str(worker), *overrides],
                    env=cli_env(),
                    stdout=logs[i],  # where the node stopped, beside its errors
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        for i, (proc, log) in enumerate(zip(procs, logs)):
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode != 0:
                log.seek(0)
                errors.append(f"node {i} ({proc.returncode}): {log.read()[-3000:]}")
    assert not errors, "\n".join(errors)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
