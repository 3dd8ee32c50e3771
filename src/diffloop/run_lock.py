"""One training process per run directory: an exclusive lock on ``output_dir/.diffloop.lock``.

``diffloop train`` (and a ``Trainer``) takes the lock before it reads or writes anything in
output_dir (a resume's config.yaml, the checkpoints, the record) and holds it until it ends. A
second process on the same output_dir is refused with one line naming the holder: its pid, host,
start time and command, which the holder writes into the lock file. Only the main process of a
launch (rank 0 under torchrun / accelerate) takes it, one lock per run: the other ranks write
nothing there but their RNG states into the checkpoint directory the main process opened, and
they learn from it when it was refused (``Trainer``).

The lock is ``fcntl.flock`` on that file, which the kernel drops when the holder exits however it
exits (SIGKILL, the OOM killer), so a lock file left by a dead process never blocks: it is simply
locked again. A holder that ends normally removes the file (and output_dir, if it created it and
nothing else was written there). Since a holder may remove the file between another process's
open and flock, acquiring checks after flock that the path still names the file it locked, and
tries again if not: two processes can never both hold one run.

Within one process the lock is re-entrant (``diffloop train`` locks before it builds its Trainer,
which locks again); each :class:`RunLock` is released once, the file when the last one is.

Readers take no lock: ``diffloop eval RUN`` and ``diffloop sample RUN`` read only complete
checkpoints, which appear by an atomic rename, so they may read a run that is still training, and
a lock file, stale or live, never stops them. On a filesystem without flock (some network mounts)
a warning says the run is not locked, and it goes on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from diffloop.errors import DiffloopError

logger = logging.getLogger(__name__)

LOCK_NAME = ".diffloop.lock"
# flock is not supported on this filesystem: run unlocked, with a warning.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_COMMAND_CHARS = 200  # the holder's command line as shown in a refusal


class RunLockedError(DiffloopError, RuntimeError):
    """Another process holds the run directory (or it cannot be locked); the message names it."""


class _Held:
    """The flock this process holds on one run directory, and how many RunLocks share it."""

    def __init__(self, fd: int | None, path: Path, created: Path | None) -> None:
        self.fd, self.path, self.created, self.count = fd, path, created, 0


_HELD: dict[Path, _Held] = {}


def holder_info() -> dict[str, Any]:
    """What a refused process is told about this one: pid, host, start time, command."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m diffloop
        program = f"python -m {Path(sys.argv[0]).parent.name}"
    command = " ".join([program, shlex.join(sys.argv[1:])]).strip()
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 3] + "..."
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
    }


def describe_holder(info: dict[str, Any] | None) -> str:
    """``pid 123 on host h, started 2026-..., command: diffloop train ...`` (or "holder
    unknown")."""
    if not info or "pid" not in info:
        return "holder unknown: it has only just started"
    text = f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}"
    return text + (f", command: {info['command']}" if info.get("command") else "")


def read_holder(path: Path, attempts: int = 5) -> dict[str, Any] | None:
    """The holder's info in lock file ``path``; a holder that has just locked it may not have
    written it yet, so an empty or partial file is read again a few times."""
    for attempt in range(attempts):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            if attempt + 1 < attempts:
                time.sleep(0.05)
    return None


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None if it exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _lock_file(output_dir: str | Path, directory: Path) -> int | None:
    """Open and flock ``directory/LOCK_NAME``: its fd, or None if the filesystem has no flock.
    RunLockedError if another process holds it."""
    path = directory / LOCK_NAME
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a holder that ended removed the directory it had created
            continue
        except OSError as e:
            raise RunLockedError(
                f"output_dir={output_dir} cannot be locked ({path}: {e.strerror}); "
                "choose another output_dir"
            ) from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"output_dir={output_dir} is in use by another diffloop process "
                f"({describe_holder(read_holder(path))}); wait for it to end, or choose another "
                "output_dir"
            ) from None
        except (ImportError, OSError) as e:  # no fcntl (Windows) or no flock on this filesystem
            os.close(fd)
            if isinstance(e, OSError) and e.errno not in _NO_FLOCK:
                raise
            logger.warning(
                "output_dir=%s cannot be locked on this system (%s): nothing stops a second "
                "process from writing into this run at the same time",
                output_dir,
                e,
            )
            return None
        try:  # still the file at `path`? (its holder may have removed it before we locked it)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


class RunLock:
    """This process's hold on a run directory's lock (:func:`acquire`); release it once (or use
    it as a context manager). Releasing again does nothing."""

    def __init__(self, key: Path) -> None:
        self.key = key
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        held = _HELD[self.key]
        held.count -= 1
        if held.count == 0:
            del _HELD[self.key]
            _unlock(held)

    def __enter__(self) -> RunLock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(output_dir: str | Path) -> RunLock:
    """Lock run directory ``output_dir`` (created if missing) for this process.

    Raises RunLockedError (one line naming the holder's pid, host, start time and command) when
    another process holds it."""
    directory = Path(output_dir)
    key = directory.resolve()
    if key not in _HELD:
        created = _first_missing(directory.absolute())
        fd = _lock_file(output_dir, directory)
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        _HELD[key] = _Held(fd, directory.absolute() / LOCK_NAME, created)
    _HELD[key].count += 1
    return RunLock(key)


def is_held(output_dir: str | Path) -> bool:
    """Whether this process holds the lock of ``output_dir``."""
    return Path(output_dir).resolve() in _HELD


def _unlock(held: _Held) -> None:
    """Remove the lock file (still holding it, so nobody else is using it), the directories
    :func:`acquire` created if they are empty, then drop the flock."""
    if held.fd is None:
        return
    try:
        held.path.unlink(missing_ok=True)
        directory, created = held.path.parent, held.created
        while created is not None and (directory == created or created in directory.parents):
            directory.rmdir()  # OSError when not empty: something was written there
            directory = directory.parent
    except OSError:
        pass
    finally:
        os.close(held.fd)
