"""Numbers derived from a config: the per-epoch arithmetic the run prints, the trained
timesteps, and the CPU thread count ``cpu_threads`` resolves to."""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass

from diffloop.config.schema import Config, require


def largest_divisor(n: int, at_most: int) -> int:
    """The largest d <= at_most that divides n (1 if none larger)."""
    for d in range(min(n, at_most), 0, -1):
        if n % d == 0:
            return d
    return 1


@dataclass(frozen=True)
class Arithmetic:
    """Per-epoch numbers derived from the config (printed at start; users rely on them)."""

    samples_per_epoch: int
    samples_per_process: int
    reward_queries_per_epoch: int
    trained_timesteps_per_sample: int
    gradient_updates_per_epoch: int
    unet_evals_per_sample: int
    trained_window: str = ""
    denoiser: str = "UNet"

    def lines(self) -> list[str]:
        return [
            (
                f"samples per epoch:             {self.samples_per_epoch} "
                f"({self.samples_per_process} per process)"
            ),
            f"reward queries per epoch:      {self.reward_queries_per_epoch}",
            (
                f"trained timesteps per sample:  {self.trained_timesteps_per_sample}"
                f"{self.trained_window}"
            ),
            f"gradient updates per epoch:    {self.gradient_updates_per_epoch}",
            (
                f"{self.denoiser + ' evaluations per sample:':<31}{self.unet_evals_per_sample} "
                "(sampling)"
            ),
        ]


def cfg_evaluations_per_step(guidance_scale: float) -> int:
    """Denoiser evaluations per sample per step under classifier-free guidance: 1 at scale 1 (one
    branch), else 2 (conditional and unconditional, one doubled batch), as every CFG policy runs
    it."""
    return 1 if guidance_scale == 1.0 else 2


def derived_arithmetic(
    config: Config,
    num_processes: int = 1,
    *,
    stored_steps: int | None = None,
    evaluations_per_step: int | None = None,
    denoiser: str = "UNet",
) -> Arithmetic:
    """The per-epoch numbers. The model-dependent ones come from the loaded policy when given
    (``policy.stored_steps`` / ``policy.evaluations_per_step``: the trainer's header); without a
    model they follow the DDIM rules: every step stored, 2 evaluations per step with CFG."""
    from diffloop.algorithms import ALGORITHMS

    s, t = config.sample, config.train
    if stored_steps is None:
        stored_steps = s.num_steps
    if evaluations_per_step is None:
        evaluations_per_step = cfg_evaluations_per_step(s.guidance_scale)
    total = s.prompts_per_epoch * s.samples_per_prompt
    local = total // num_processes
    minibatches = local // t.batch_size
    if ALGORITHMS[t.algorithm].one_update_per_batch:
        updates = 1
    else:
        updates = t.num_inner_epochs * minibatches // t.gradient_accumulation_steps
    return Arithmetic(
        samples_per_epoch=total,
        samples_per_process=local,
        reward_queries_per_epoch=total,
        trained_timesteps_per_sample=trained_steps(config, stored_steps)[1],
        gradient_updates_per_epoch=updates,
        unet_evals_per_sample=s.num_steps * evaluations_per_step,
        trained_window=_window_words(config),
        denoiser=denoiser,
    )


def _window_words(config: Config) -> str:
    """' (of steps a-b: ...)' for the header when a window restricts the trained steps."""
    window = effective_timestep_window(config)
    if window is None:
        return ""
    why = "train.timestep_window" if config.train.timestep_window else "the shapes model's default"
    return f" (of steps {window[0]}-{window[1] - 1}: {why})"


def num_trained_timesteps(num_steps: int, timestep_fraction: float) -> int:
    """Steps of each trajectory trained on: max(1, int(T * timestep_fraction)) (DDPO's rule), T
    the length of the trained window (``trained_step_range``)."""
    return max(1, int(num_steps * timestep_fraction))


def effective_timestep_window(config: Config) -> list[int] | None:
    """``train.timestep_window``, or when it is null the model's default: [0, ceil(T / 2)) for the
    packaged shapes model (its 10-step DDPM sampler; docs/method.md "Which steps to train"),
    None (every stored step) for every other model."""
    window = config.train.timestep_window
    if window is not None or config.model.pretrained != "shapes":
        return window
    return [0, math.ceil(config.sample.num_steps / 2)]


def trained_steps(config: Config, stored_steps: int) -> tuple[range, int]:
    """(the stored steps training draws from, how many each trajectory trains) for trajectories of
    ``stored_steps`` steps: the one rule the trainer, ``diffloop variance`` and the header share."""
    window = trained_step_range(effective_timestep_window(config), stored_steps)
    return window, num_trained_timesteps(len(window), config.train.timestep_fraction)


def trained_step_range(timestep_window: list[int] | None, stored_steps: int) -> range:
    """The stored steps training draws from: a window [start, stop) (``effective_timestep_window``),
    or all ``stored_steps`` when it is None (validated: stop <= stored steps)."""
    return range(stored_steps) if timestep_window is None else range(*timestep_window)


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (taskset, cgroup cpusets), else
    os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity masks
        return os.cpu_count() or 1


def resolve_cpu_threads(
    setting: int | str | None,
    environ: typing.Mapping[str, str] | None = None,
    cores: int | None = None,
) -> int | None:
    """The torch thread count of ``cpu_threads`` (None: leave torch's own setting alone).

    ``auto`` = OMP_NUM_THREADS when it is set (its first entry), as GNU ``nproc`` reads it and as
    launchers (torchrun, ``diffloop compare --jobs``) set it to give each process its share; else
    max(1, cores // LOCAL_WORLD_SIZE): the cores of the affinity mask split between the processes
    of this machine, so that processes never ask for more threads than there are cores.
    An integer is used as given. A malformed OMP_NUM_THREADS is an error, not ignored.
    """
    if setting is None or isinstance(setting, int):
        return setting
    env = os.environ if environ is None else environ
    cores = available_cores() if cores is None else cores
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        first = omp.split(",")[0].strip()
        require(
            first.isdigit() and int(first) >= 1,
            f"cpu_threads=auto reads OMP_NUM_THREADS={omp!r}, which is not a positive integer; "
            "unset OMP_NUM_THREADS or set cpu_threads=N",
        )
        return int(first)
    local = env.get("LOCAL_WORLD_SIZE", "1").strip()
    processes = int(local) if local.isdigit() and int(local) >= 1 else 1
    return max(1, cores // processes)
