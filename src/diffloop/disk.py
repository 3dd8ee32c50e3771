"""Writing a run's files on a disk that may fill up: one line, and nothing half-written left as
final.

Checkpoints (``diffloop.checkpoint``) and the export (``diffloop.export.export_run``) are written
into a temporary directory beside their final place and renamed into it when complete.
:func:`written_aside` wraps such a write: when it fails (or is interrupted) the temporary directory
is removed, so what was complete before (the earlier checkpoints, an earlier export) is left as
it was, and a full disk becomes one :class:`DiskFullError` line naming the directory, about how
much space the write needs and how much is free, what was kept and how to go on.

Writers report a full disk in different ways: ``open().write`` raises OSError(ENOSPC) (EDQUOT for
a quota); safetensors raises ``SafetensorError("... No space left on device (os error 28)")``;
``torch.save``'s zip writer raises ``RuntimeError("... unexpected pos N vs M")``, its short
write, with the errno lost. :func:`is_disk_full` accepts the first two from the error alone and
the third when the directory has less free space than the write needs.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffloop.errors import DiffloopError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = (*(os.strerror(n) for n in DISK_FULL_ERRNOS), "StorageFull", "QuotaExceeded")
# torch.save's zip writer (caffe2 PyTorchStreamWriter) after a short write: the errno is lost.
SHORT_WRITE_TEXTS = ("unexpected pos", "iostream error", "file write failed")


class DiskFullError(DiffloopError, RuntimeError):
    """The disk (or quota) ran out while a run wrote its files; the message names the directory,
    the space needed and free, what was kept and how to go on."""


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def tree_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tensor_bytes(values: Iterable[Any]) -> int:
    """Bytes held by the tensors among ``values`` (nested dicts / lists, e.g. an optimizer
    state)."""
    total = 0
    for v in values:
        if isinstance(v, dict):
            total += tensor_bytes(v.values())
        elif isinstance(v, (list, tuple)):
            total += tensor_bytes(v)
        elif hasattr(v, "element_size") and hasattr(v, "numel"):
            total += v.element_size() * v.numel()
    return total


def free_bytes(directory: Path) -> int:
    """Free space for this user on the filesystem holding ``directory`` (or its nearest existing
    parent)."""
    existing = next(
        (p for p in (directory, *directory.absolute().parents) if p.exists()), Path("/")
    )
    return shutil.disk_usage(existing).free


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException, directory: Path, needed: int) -> bool:
    """Whether ``exc`` (or what caused it) means the disk or quota holding ``directory`` is full,
    while writing about ``needed`` bytes there (see the module doc for how writers say it)."""
    chain = list(_chain(exc))
    if any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in chain):
        return True
    texts = [str(e) for e in chain]
    if any(t in text for t in DISK_FULL_TEXTS for text in texts):
        return True
    short_write = any(t in text for t in SHORT_WRITE_TEXTS for text in texts)
    return short_write and free_bytes(directory) < needed


def disk_full_message(directory: Path, needed: int, what: str, kept: str, then: str) -> str:
    """One line: where the space ran out, how much is needed and free, what was kept, what to do."""
    return (
        f"no space left on device in {directory} while writing {what}: it needs about "
        f"{format_bytes(needed)}, {format_bytes(free_bytes(directory))} is free; {kept}. "
        f"Free some space there, then {then}"
    )


@contextmanager
def written_aside(
    tmp: Path | None, directory: Path, needed: int, *, what: str, kept: str, then: str
) -> Iterator[None]:
    """Wrap a write into the temporary directory ``tmp`` (None: this process removes nothing)
    whose result goes into ``directory`` and takes about ``needed`` bytes. On any failure or
    interrupt ``tmp`` is removed; a full disk is re-raised as one DiskFullError line
    (:func:`disk_full_message` with ``what``, ``kept`` and ``then``), anything else as it was."""
    try:
        yield
    except BaseException as e:
        # Tested before the partial files are removed: a full disk then has almost nothing free.
        full = isinstance(e, Exception) and is_disk_full(e, directory, needed)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        raise DiskFullError(disk_full_message(directory, needed, what, kept, then)) from None


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` to disk (before a rename makes them visible)."""
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def replace_dir(new: Path, final: Path) -> None:
    """Put the complete directory ``new`` at ``final`` (a sibling), replacing what was there.

    A directory cannot be renamed over a non-empty one, so the old one is first renamed aside
    (``.old-<name>``) and removed after: ``final`` is at every moment either the old complete
    directory, absent, or the new complete one, never a mixture or a truncated file."""
    fsync_tree(new)
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
