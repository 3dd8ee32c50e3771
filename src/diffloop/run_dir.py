"""The run directory: resolved config, versions and seed, metrics.jsonl, TensorBoard (and W&B) logs.

``metrics.jsonl`` holds one JSON object per epoch, flushed and fsynced as it is written. On resume it
is cut back to the epochs the checkpoint covers (a run killed after logging epoch e but before
checkpointing it repeats epoch e), so a resumed run's file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from diffloop.config import Config, config_to_dict, save_config
from diffloop.metrics import tensorboard_tag

TIME_KEYS = ("sample_time_s", "reward_time_s", "train_time_s", "epoch_time_s", "eval_time_s")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("diffloop", "torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl; a torn last line (killed mid-write) is dropped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunDirectory:
    def __init__(self, config: Config, *, is_main: bool, start_epoch: int, argv: list[str] | None = None):
        self.path = Path(config.output_dir)
        self.is_main = is_main
        self.metrics_path = self.path / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(config, self.path / "config.yaml")
        info = {"seed": config.seed, "argv": argv or sys.argv, "versions": versions()}
        (self.path / "run_info.json").write_text(json.dumps(info, indent=2))
        self._truncate_metrics(start_epoch)
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged past its checkpoint.
            self._tb = SummaryWriter(str(self.path / "tensorboard"), purge_step=start_epoch)
        if config.logging.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb=true needs `pip install wandb`") from e
            self._wandb = wandb.init(
                project=config.logging.wandb_project,
                dir=str(self.path),
                config=config_to_dict(config),
                resume="allow",
                id=self.path.resolve().name,
            )

    def _truncate_metrics(self, start_epoch: int) -> None:
        # From scratch (start_epoch 0) the base evaluation (epoch -1) is redone too, so nothing is kept.
        kept = [r for r in read_metrics(self.metrics_path) if start_epoch > 0 and r.get("epoch", -1) < start_epoch]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics_path)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        step = metrics["epoch"]
        # Tags come from the metrics schema; an undeclared key raises here (diffloop.metrics).
        tags = {k: tensorboard_tag(k) for k in metrics if k != "epoch"}
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(tags[key], value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({tags[k]: v for k, v in metrics.items() if k != "epoch"}, step=step)

    def log_image(self, tag: str, image_hwc, step: int) -> None:
        """An (H, W, 3) uint8 grid, to TensorBoard / W&B."""
        if self._tb is not None:
            self._tb.add_image(tag, image_hwc, step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image_hwc)}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

