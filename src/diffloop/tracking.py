"""Experiment trackers (``logging.report_to``) through accelerate's tracker classes.

metrics.jsonl is the run's record; trackers are copies of it. The run directory writes each row to
metrics.jsonl first, then hands it to :class:`Trackers`, where a tracker that raises is logged
(the first failure with its error) and counted (``Trackers.failures``; summed up at the end), and
never costs the row or the run. A tracker that cannot *start* is an error before training.

Which trackers (:func:`resolve_report_to`): ``logging.report_to`` is a list of accelerate's tracker
names (``diffloop.config.TRACKERS``), ``all`` (every one installed) or ``none``; the older
booleans ``logging.tensorboard`` / ``logging.wandb`` are aliases: true adds that tracker, false
removes it, null (their default) leaves report_to alone.

How each starts (:func:`init_arguments`, the arguments accelerate's ``Accelerator.init_trackers``
would pass): tensorboard writes under ``output_dir/tensorboard`` (events past the resumed epoch are
purged); wandb gets the run's own id (``run_id`` in the run directory, made once per run, so two
runs whose directories share a name never share a W&B run, and a resume continues its own),
``logging.wandb_project`` / ``wandb_entity`` / ``wandb_name`` (null: the directory's name) /
``wandb_tags`` and the resolved config; every other tracker gets the project name (and the run
directory if it needs one) and the flattened config. ``logging.tracker_kwargs.<name>`` is laid over
the arguments of tracker ``<name>`` (accelerate's ``init_kwargs``).

accelerate is imported here and in diffloop.distributed only.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffloop.config import Config, ConfigError, LoggingConfig, config_to_dict

logger = logging.getLogger(__name__)


def available_trackers() -> list[str]:
    """The names of the trackers whose package is installed (accelerate's own check)."""
    from accelerate.tracking import get_available_trackers

    return sorted(str(t) for t in get_available_trackers())


def resolve_report_to(
    logging_config: LoggingConfig, available: list[str] | None = None
) -> list[str]:
    """The tracker names a run starts, in report_to's order: ``all`` -> every available one (then
    the names also listed), ``none`` -> none, then the tensorboard / wandb aliases applied."""
    names: list[str] = []
    for name in logging_config.report_to:
        if name == "all":
            names += available if available is not None else available_trackers()
        elif name != "none":
            names.append(name)
    for alias in ("tensorboard", "wandb"):
        flag = getattr(logging_config, alias)
        if flag is True:
            names.append(alias)
        elif flag is False:
            names = [n for n in names if n != alias]
    return list(dict.fromkeys(names))  # first occurrence wins, order kept


def check_trackers(logging_config: LoggingConfig) -> None:
    """ConfigError unless every tracker asked for by name is installed (check-config time)."""
    available = available_trackers()
    missing = [n for n in resolve_report_to(logging_config, available) if n not in available]
    if missing:
        name = missing[0]
        extra = f"'diffloop[{name}]'" if name == "wandb" else name
        raise ConfigError(
            f"logging.report_to asks for {name} but the {name} package is not "
            "installed: pip install "
            f"{extra}, or remove {name} from logging.report_to (installed trackers: "
            f"{', '.join(available) or 'none'})"
        )


def flat_config(config: Config) -> dict[str, Any]:
    """The config as {dotted key: bool | int | float | str | None}: what hyperparameter tables
    take; lists and dicts become their JSON text."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping) and key not in (
                "kwargs",
                "scheduler_kwargs",
                "tracker_kwargs",
            ):
                walk(value, f"{prefix}{key}.")
            elif value is None or isinstance(value, (bool, int, float, str)):
                out[prefix + key] = value
            else:
                out[prefix + key] = json.dumps(value)

    walk(config_to_dict(config), "")
    return out


def init_arguments(
    name: str, config: Config, path: Path, run_id: str, start_epoch: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(positional, keyword) arguments of tracker ``name``'s class (module doc), with
    logging.tracker_kwargs[name] laid over the keywords."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    lg = config.logging
    if name == "tensorboard":
        args, kwargs = ("tensorboard", str(path)), {"purge_step": start_epoch}
    elif name == "wandb":
        args = (lg.wandb_project,)
        kwargs = {"id": run_id, "resume": "allow", "dir": str(path),
                  "name": lg.wandb_name or path.resolve().name,
                  "entity": lg.wandb_entity, "tags": list(lg.wandb_tags),
                  "config": config_to_dict(config)}  # fmt: skip
    elif LOGGER_TYPE_TO_CLASS[name].requires_logging_directory:
        args, kwargs = (lg.wandb_project, str(path)), {}
    else:
        args, kwargs = (lg.wandb_project,), {}
    return args, {**kwargs, **lg.tracker_kwargs.get(name, {})}


class Trackers:
    """The started trackers of a run (main process), failures logged and counted, never raised."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers
        self.failures: Counter[str] = Counter()

    @classmethod
    def start(cls, config: Config, path: Path, run_id: str, start_epoch: int) -> Trackers:
        """Start every tracker of logging.report_to; one that fails to start is an error naming it
        (those already started are finished first)."""
        names = resolve_report_to(config.logging)
        if not names:
            return cls([])
        from accelerate.state import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        PartialState()  # accelerate's trackers ask it which process is the main one
        started: list[Any] = []
        for name in names:
            args, kwargs = init_arguments(name, config, path, run_id, start_epoch)
            try:
                tracker = LOGGER_TYPE_TO_CLASS[name](*args, **kwargs)
                tracker.start()
                if name not in (
                    "tensorboard",
                    "wandb",
                ):  # wandb: given at init; tensorboard: config.yaml
                    tracker.store_init_configuration(flat_config(config))
            except Exception as exc:
                cls(started).finish()
                raise ConfigError(
                    f"logging.report_to: the {name} tracker could not start ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())}); fix it or remove {name} from logging.report_to"
                ) from exc
            started.append(tracker)
        return cls(started)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def _call(self, tracker: Any, what: str, fn, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (a tracker's outage must not stop the run: metrics.jsonl has the row)
            self.failures[tracker.name] += 1
            if self.failures[tracker.name] == 1:
                logger.warning(
                    "tracker %s failed to %s (%s: %s); metrics.jsonl still holds every "
                    "row, further "
                    "failures are counted",
                    tracker.name,
                    what,
                    type(exc).__name__,
                    exc,
                )

    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars {tag: value} at ``step`` to every tracker."""
        for tracker in self.trackers:
            self._call(tracker, "log metrics", tracker.log, values, step=step)

    def log_image(self, tag: str, image_hwc: Any, step: int) -> None:
        """An (H, W, 3) uint8 image to every tracker that takes images."""
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                self._call(tracker, "log an image", tracker.log_images, {tag: image_hwc[None]},
                           step=step,
                           dataformats="NHWC")  # fmt: skip
            elif hasattr(tracker, "log_images"):
                self._call(
                    tracker, "log an image", tracker.log_images, {tag: [image_hwc]}, step=step
                )

    def finish(self) -> None:
        """Finish every tracker (once; later calls do nothing) and sum up their failures."""
        if not self.trackers:
            return
        for tracker in self.trackers:
            self._call(tracker, "finish", tracker.finish)
        if self.failures:
            counts = ", ".join(f"{name} {n} time(s)" for name, n in sorted(self.failures.items()))
            logger.warning("trackers failed: %s; metrics.jsonl holds every row", counts)
        self.trackers = []
