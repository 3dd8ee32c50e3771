"""The ``diffloop`` command: ``main(argv) -> int`` runs one subcommand (the console script calls it,
the tests call it in-process). ``USAGE`` is ``diffloop --help``: text for users, built without
importing torch; each subcommand's ``--help`` is its own parser's (plain text, see
``diffloop.errors.plain_text``), or, for train and check-config, the config key list.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Iterator

from diffloop.config import Config, split_config_args
from diffloop.errors import DiffloopError, did_you_mean, plain_text

HELP = ("-h", "--help")

# One line per command, in the order `diffloop --help` lists them (COMMANDS below runs them).
COMMAND_SUMMARIES = {
    "train": "fine-tune a model with RL (no CONFIG: the shapes-world default)",
    "check-config": "check a config or a compare sweep as train would; print it resolved",
    "sample": "generate images from a base model or from a training run",
    "eval": "score models, runs or checkpoints on prompts with fixed noise; image grids",
    "report": "write one self-contained HTML page about one or more runs",
    "compare": "train a budget-matched sweep of algorithms x settings x seeds and compare them",
    "variance": "measure the gradient variance of each algorithm's estimator",
    "bench": "measure sampling and training throughput against the hardware's floor",
    "serve-reward": "serve a reward over HTTP, for training on another machine",
    "shapes": "pretrain the shapes-world model (diffloop shapes pretrain)",
}
USAGE = "\n".join(
    [
        "usage: diffloop COMMAND [ARGS ...]",
        "       diffloop train [CONFIG.yaml] [key.sub=value ...]",
        "       diffloop COMMAND --help",
        "       diffloop --version",
        "",
        *textwrap.wrap(
            "diffloop fine-tunes text-to-image diffusion models (Stable Diffusion 1.x / 2.x, SDXL, "
            "SD3, FLUX.1) with reinforcement learning against a reward: it samples images, scores "
            "them and updates a LoRA (or the whole model) with LOOP, PPO, GRPO or REINFORCE. With "
            "no config, `diffloop train` fine-tunes a small shapes-world model shipped with "
            "diffloop to draw the colours and shapes its prompts ask for, in minutes on a CPU.",
            width=96,
        ),
        "",
        "commands:",
        *(f"  {name:<14}{line}" for name, line in COMMAND_SUMMARIES.items()),
        "",
        "`diffloop COMMAND --help` describes a command's arguments; `diffloop train --help` lists",
        "every config key with its default and meaning. Several processes or GPUs:",
        "`accelerate launch -m diffloop train CONFIG.yaml` (or torchrun).",
    ]
)
INTERRUPTED = 130  # exit status of `diffloop train` stopped by Ctrl-C or SIGTERM (128 + SIGINT)


def checked_config(args: list[str]) -> tuple[str | None, Config]:
    """``[CONFIG] [k=v ...]`` -> (path, config) after every check train makes before a model loads
    (with ``resume=true``: the run's own config and the resume rules, as train resolves it)."""
    from diffloop.preflight import check_before_loading
    from diffloop.resume import train_config

    path, _ = split_config_args(args)
    config = train_config(args)
    check_before_loading(config)
    return path, config


def config_help(command: str, summary: str) -> str:
    """Usage of a ``[CONFIG] [key=value ...]`` command and every config key with its default and doc
    (from the config dataclasses' attribute docstrings; imports nothing heavy)."""
    from diffloop.config import field_docs

    lines = [f"usage: diffloop {command} [CONFIG.yaml] [key.sub=value ...]", "",
             *textwrap.wrap(summary, width=96), "", "config keys (key = default):"]  # fmt: skip
    for key, default, allowed, doc in field_docs():
        lines.append(f"  {key} = {default}" + (f"   ({allowed})" if allowed else ""))
        lines += textwrap.wrap(
            plain_text(doc), width=96, initial_indent=" " * 6, subsequent_indent=" " * 6
        )
    return "\n".join(lines)


_LAYERS = (
    "Values: defaults < CONFIG.yaml < key.sub=value overrides (values are YAML). With "
    "no CONFIG the "
    "packaged shapes.yaml is used; a bare file name is also looked up among the shipped configs."
)


_RUN_DIRECTORY = (
    "output_dir receives the resolved config, metrics.jsonl, checkpoints and evaluation grids and, "
    "at the end, the LoRA (output_dir/lora/, or output_dir/model/ with lora.enabled=false) with a "
    "model card; the last lines printed say which file loads where. Ctrl-C keeps the last "
    "checkpoint: resume=true continues the run."
)


def is_main_process(trainer) -> bool:
    """The trainer's main rank; before a trainer exists, the launcher's RANK (accelerate,
    torchrun)."""
    if trainer is not None:
        return trainer.dist.is_main
    return os.environ.get("RANK", "0") == "0"


class Terminated(KeyboardInterrupt):
    """SIGTERM, which schedulers (SLURM, Kubernetes, torchrun) send to stop a job: during
    ``diffloop train`` it is handled exactly as Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread,
    so a scheduler's stop ends a run as Ctrl-C does: the line saying what was kept and how to
    resume, the same exit status. Further SIGTERMs are ignored meanwhile (under ``srun torchrun``
    each worker gets one from SLURM and one from torchrun; the second must not cut the first's
    clean-up short: the scheduler's SIGKILL remains the hard stop). The previous handler is
    restored on leaving. Outside the main thread (no handler can be set there) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def cmd_train(args: list[str]) -> int:
    if any(a in HELP for a in args):
        summary = "Fine-tune a text-to-image diffusion model with RL. " + _LAYERS
        print(config_help("train", f"{summary} {_RUN_DIRECTORY}"))
        return 0
    from diffloop import run_lock
    from diffloop.config import check_output_dir
    from diffloop.resume import interrupted_message, stated_output_dir

    output_dir, trainer = stated_output_dir(args), None
    check_output_dir(output_dir)  # as validation words it (a file, not writable), before locking
    # One process per run: output_dir is locked before anything in it is read (a resume's
    # config.yaml), by the main process of a launch only (diffloop.run_lock).
    lock = run_lock.acquire(output_dir) if is_main_process(None) else contextlib.nullcontext()
    with lock, sigterm_as_interrupt():
        try:
            from diffloop.preflight import check_before_loading
            from diffloop.resume import train_config  # resume: the run's own config
            from diffloop.trainer import Trainer

            config = train_config(args)
            output_dir = config.output_dir
            check_before_loading(config)  # the Trainer checks again (library use); this fails first
            trainer = Trainer(config, argv=["diffloop", "train", *args])
            trainer.train()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: one line saying what was kept, how to resume
            if trainer is not None:
                trainer.run.close()  # flush TensorBoard / W&B
            if is_main_process(trainer):  # Ctrl-C reaches every rank of a launch: one line, not N
                print(interrupted_message(output_dir), file=sys.stderr)
            return INTERRUPTED
    return 0


def cmd_check_config(args: list[str]) -> int:
    """Validate a config (or every run of a ``diffloop compare`` sweep file) exactly as train
    would."""
    if any(a in HELP for a in args):
        print(config_help("check-config", "Check a config as train would before loading a model, "
                          "then print it resolved with its per-epoch arithmetic and its memory "
                          "plan per process (arithmetic, not measured); --gpu-memory 24GB says "
                          "whether it fits such a card and which settings would make it fit, "
                          "--processes N plans N processes (fsdp.enabled divides by it). A sweep "
                          "file (with runs:) has every run checked. " + _LAYERS))  # fmt: skip
        return 0
    args, gpu_memory, processes = _memory_flags(args)
    if args and _is_sweep_file(args[0]):
        return _check_sweep(args[0], args[1:])
    import yaml

    from diffloop.config import config_to_dict, derived_arithmetic
    from diffloop.memory import parse_size, plan_lines

    if gpu_memory is not None:
        parse_size(gpu_memory)  # a bad size is one line before anything else
    path, config = checked_config(args)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    for line in derived_arithmetic(config).lines():
        print("# " + line)
    if config.model.pretrained != "shapes":  # the model is not loaded here
        print(
            "# (timesteps and evaluations by the DDIM rules, exact for SD and SDXL; "
            "`diffloop train` "
            "prints the loaded model's: a flow-matching model stores its SDE window's "
            "steps, FLUX.1 "
            "runs one evaluation per step)"
        )
    for line in plan_lines(config, gpu_memory, processes):
        print("# " + line)
    print(f"# {path}: OK")
    return 0


def _memory_flags(args: list[str]) -> tuple[list[str], str | None, int]:
    """``--gpu-memory SIZE`` and ``--processes N`` (the memory plan's card and process count;
    N defaults to WORLD_SIZE, else 1) taken out of ``args``; a missing or bad value is one line."""
    rest, gpu, processes = [], None, int(os.environ.get("WORLD_SIZE", "1"))
    it = iter(args)
    for a in it:
        flag, eq, value = a.partition("=")
        if flag not in ("--gpu-memory", "--processes"):
            rest.append(a)
            continue
        value = value if eq else next(it, "")
        if not value:
            raise DiffloopError(f"{flag} needs a value, e.g. {flag} " +
                                ("24GB" if flag == "--gpu-memory" else "8"))  # fmt: skip
        if flag == "--gpu-memory":
            gpu = value
        elif not value.isdigit() or int(value) < 1:
            raise DiffloopError(f"--processes={value!r} must be a whole number >= 1, e.g. 8")
        else:
            processes = int(value)
    return rest, gpu, processes


def _is_sweep_file(arg: str) -> bool:
    """A YAML mapping with a ``runs`` key (a ``diffloop compare`` sweep, by path or packaged
    name)."""
    from importlib import resources
    from pathlib import Path

    import yaml

    from diffloop.config import load_yaml

    packaged = Path(str(resources.files("diffloop") / "sweeps" / arg))
    path = Path(arg) if Path(arg).is_file() else packaged
    if "=" in arg or not path.is_file():
        return False
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False  # not a sweep; load_config reports what is wrong with it as a config
    return isinstance(data, dict) and "runs" in data


def _check_sweep(path: str, overrides: list[str]) -> int:
    from diffloop.tools.sweep import load_sweep, plan

    runs = plan(load_sweep(path), overrides)  # checks every (run, seed) as train would
    print(f"# {path}: OK ({len(runs)} runs: {', '.join(sorted({r.name for r in runs}))})")
    return 0


def cmd_sample(argv: list[str]) -> int:
    from diffloop.tools.sampling import sample_main

    return sample_main(argv)


SHAPES_HELP = """\
usage: diffloop shapes pretrain [ARGS ...]

The shapes world: 32x32 scenes of coloured shapes, described by prompts such as "a red
circle and a striped blue square". Its small text-to-image model ships with diffloop
(model.pretrained=shapes, the default of diffloop train) and trains on a CPU.

commands:
  pretrain      pretrain the shapes-world model from scratch (diffloop shapes pretrain --help)"""


def cmd_shapes(argv: list[str]) -> int:
    usage = "usage: diffloop shapes pretrain [--help]   (pretrain the shapes-world model)"
    if argv and argv[0] in HELP:
        print(SHAPES_HELP)
        return 0
    if not argv or argv[0] != "pretrain":
        got = f"unknown shapes command '{argv[0]}'" if argv else "missing shapes command"
        return _error(f"{got}; {usage}")
    from diffloop.shapes.pretrain import main as pretrain_main

    return pretrain_main(argv[1:])


def cmd_serve_reward(argv: list[str]) -> int:
    from diffloop.rewards.server import serve_main

    return serve_main(argv)


def cmd_eval(argv: list[str]) -> int:
    from diffloop.tools.evaluate import eval_main

    return eval_main(argv)


def cmd_report(argv: list[str]) -> int:
    from diffloop.tools.report import report_main

    return report_main(argv)


def cmd_compare(argv: list[str]) -> int:
    from diffloop.tools.sweep import compare_main

    return compare_main(argv)


def cmd_variance(argv: list[str]) -> int:
    from diffloop.tools.variance import variance_main

    return variance_main(argv)


def cmd_bench(argv: list[str]) -> int:
    from diffloop.tools.bench import bench_main

    return bench_main(argv)


COMMANDS = {
    "train": cmd_train,
    "check-config": cmd_check_config,
    "sample": cmd_sample,
    "shapes": cmd_shapes,
    "serve-reward": cmd_serve_reward,
    "eval": cmd_eval,
    "report": cmd_report,
    "compare": cmd_compare,
    "variance": cmd_variance,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a user error (:class:`~diffloop.errors.DiffloopError`) is one line
    ``diffloop: error: ...`` on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in HELP:
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from diffloop import __version__

        print(f"diffloop {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        return _error(
            f"unknown command '{argv[0]}'.{did_you_mean(argv[0], list(COMMANDS))} "
            f"Commands: {', '.join(COMMANDS)} (diffloop --help)"
        )
    try:
        status = COMMANDS[argv[0]](argv[1:])
    except DiffloopError as e:
        return _error(str(e))
    if status == 0 and "torch.distributed" in sys.modules:  # a launch's process group, if any
        from diffloop.distributed import end_processes

        end_processes()
    return status


def _error(message: str) -> int:
    print("diffloop: error: " + " ".join(message.split()), file=sys.stderr)  # one line
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
