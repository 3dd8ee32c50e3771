"""The run directory: resolved config, versions and seed, metrics.jsonl, TensorBoard (and W&B) logs.

The record of a run is only ever appended to, and only once set-up has succeeded (the Trainer makes
its RunDirectory last), so a resume that fails early leaves it untouched:

    config.yaml      the resolved config of the first session (never rewritten)
    run_id           this run's id (written once): its W&B run id, so two runs whose directories
                     share a name never write into one W&B run
    run_info.json    seed, argv and versions of the first session (never rewritten)
    sessions.jsonl   one line per session: start epoch, argv, versions, time, and the config keys it
                     changed (``config_changes``; see diffloop.resume for what a resume may change)
    metrics.jsonl    one JSON object per epoch, flushed and fsynced as it is written; a resumed
                     session first appends ``{"session": n, "resume_from_epoch": e}``
    .diffloop.lock   while a process trains here: its lock, naming it (diffloop.run_lock); a
                     second process on this directory is refused, before it reads anything here

Trackers (``logging.report_to``: TensorBoard under tensorboard/, W&B, ...) get each row after
metrics.jsonl has it (diffloop.tracking): a tracker failure is logged and counted, never loses a
row.

A run killed after logging epoch e but before checkpointing it repeats epoch e; :func:`read_metrics`
resolves the markers (rows of epochs >= e logged before the marker are superseded; with e = 0 all
are, the base evaluation included), so a resumed run reads exactly as an uninterrupted one.
``overwrite=true`` (a new run in the same place) removes the old record (:func:`remove_run`).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from diffloop.config import Config, save_config
from diffloop.metrics import tensorboard_tag
from diffloop.tracking import Trackers

TIME_KEYS = ("sample_time_s", "reward_time_s", "train_time_s", "epoch_time_s", "eval_time_s")
# What a run writes into its output_dir: a directory holding any of the first six holds a run.
RUN_RECORD = ("checkpoints", "lora", "model", "metrics.jsonl", "config.yaml", "sessions.jsonl",
              "run_info.json", "tensorboard", "eval", "run_id")  # fmt: skip
RESUME_MARKER = "resume_from_epoch"


def existing_run(output_dir: str | Path) -> list[str]:
    """The entries of ``output_dir`` that show a run was there (an empty checkpoints/ does not)."""
    path = Path(output_dir)
    found = [name for name in RUN_RECORD[:6] if (path / name).exists()]
    if "checkpoints" in found and not any((path / "checkpoints").iterdir()):
        found.remove("checkpoints")
    return found


def remove_run(output_dir: str | Path) -> None:
    """(overwrite=true) Delete the record a run wrote into ``output_dir``; other files stay."""
    import shutil

    for name in RUN_RECORD:
        p = Path(output_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line, flushed and fsynced; a torn last line (killed mid-write) is ended."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def run_id(output_dir: str | Path) -> str:
    """The run's id, made (16 random hex digits) and stored in ``output_dir/run_id`` the first
    time: the same for every session of the run, different for every run (overwrite=true too)."""
    path = Path(output_dir) / "run_id"
    if path.is_file() and (existing := path.read_text(encoding="utf-8").strip()):
        return existing
    new = secrets.token_hex(8)
    path.write_text(new + "\n", encoding="utf-8")
    return new


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("diffloop", "torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The epochs of metrics.jsonl as the run stands: resume markers applied, torn lines dropped."""
    from diffloop.resume import read_jsonl

    rows: list[dict[str, Any]] = []
    for row in read_jsonl(Path(path)):
        if RESUME_MARKER in row and "epoch" not in row:
            start = row[RESUME_MARKER]
            rows = [r for r in rows if start > 0 and r.get("epoch", -1) < start]
        else:
            rows.append(row)
    return rows


class RunDirectory:
    def __init__(
        self, config: Config, *, is_main: bool, start_epoch: int, argv: list[str] | None = None
    ):
        self.path = Path(config.output_dir)
        self.is_main = is_main
        self.metrics_path = self.path / "metrics.jsonl"
        self.trackers = Trackers([])
        self.run_id: str | None = None
        if not is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id(self.path)
        # Trackers start before the session is recorded: one that cannot start leaves no record.
        self.trackers = Trackers.start(config, self.path, self.run_id, start_epoch)
        self._record_session(config, start_epoch, argv or sys.argv)

    def _record_session(self, config: Config, start_epoch: int, argv: list[str]) -> None:
        """Append this launch of the run to its record (a new run first writes config.yaml and
        run_info.json)."""
        from diffloop.resume import SESSIONS, config_changes, load_run_config, read_jsonl

        self.path.mkdir(parents=True, exist_ok=True)
        run = load_run_config(self.path) if config.resume else None
        if run is None:
            save_config(config, self.path / "config.yaml")
            info = {"seed": config.seed, "argv": argv, "versions": versions()}
            (self.path / "run_info.json").write_text(json.dumps(info, indent=2))
        session = len(read_jsonl(self.path / SESSIONS)) + 1
        changes = (
            {k: new for k, (_, new) in config_changes(run, config).items()}
            if run is not None
            else {}
        )
        append_jsonl(self.path / SESSIONS, {
            "session": session, "start_epoch": start_epoch,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": argv, "versions": versions(), "config_changes": changes,
        })  # fmt: skip
        if config.resume:
            append_jsonl(self.metrics_path, {"session": session, RESUME_MARKER: start_epoch})

    def log(self, metrics: dict[str, Any]) -> None:
        """metrics.jsonl first (the record), then the trackers (failures counted, not raised)."""
        if not self.is_main:
            return
        append_jsonl(self.metrics_path, metrics)
        # Tags come from the metrics schema; an undeclared key raises here (diffloop.metrics).
        tags = {k: tensorboard_tag(k) for k in metrics if k != "epoch"}
        scalars = {
            tags[k]: v for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float))
        }
        self.trackers.log(scalars, step=metrics["epoch"])

    def log_image(self, tag: str, image_hwc, step: int) -> None:
        """An (H, W, 3) uint8 grid, to the trackers that take images."""
        self.trackers.log_image(tag, image_hwc, step)

    def close(self) -> None:
        self.trackers.finish()
