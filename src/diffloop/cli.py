"""The ``diffloop`` command. ``main(argv) -> int`` is what tests call in-process.

    diffloop train [CONFIG.yaml] [key.sub=value ...]     fine-tune (no CONFIG: the shapes-world default)
    diffloop check-config [CONFIG.yaml] [key=value ...]  validate and print the resolved config
    diffloop sample MODEL_OR_RUN --prompt TEXT ...       generate images from a base model or a run
    diffloop shapes pretrain [...]                       pretrain the shapes-world model
    diffloop eval TARGET [--compare TARGET ...] ...      held-out rewards + image grids of models or runs
    diffloop report RUN_DIR [RUN_DIR ...]                self-contained HTML report of one or more runs
    diffloop compare SWEEP.yaml                          budget-matched algorithm x setting x seed sweep
    diffloop variance [CONFIG] --algorithms loop,ppo     gradient-estimator variance at fixed parameters
    diffloop serve-reward NAME [--port P ...]            serve a registry reward over HTTP (JSON + PNG)
    diffloop bench --shape tiny|sd15|sdxl --device cuda  sampling / training throughput vs the hardware floor
Multi-process: ``accelerate launch -m diffloop train CONFIG ...`` (or torchrun).
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

import yaml

DEFAULT_CONFIG = "shapes.yaml"


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("diffloop") / "configs" / name))


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [k=v ...]``: the first argument is a config file unless it is an override."""
    if args and "=" not in args[0]:
        path = args[0]
        if not Path(path).exists() and (packaged := packaged_config(path)).exists():
            path = str(packaged)  # `diffloop train sd15_aesthetic.yaml` finds shipped configs too
        return path, args[1:]
    return str(packaged_config(DEFAULT_CONFIG)), args


def cmd_train(args: list[str]) -> int:
    from diffloop.resume import run_training, train_config  # resume: the run's config; Ctrl-C

    return run_training(train_config(args), argv=["diffloop", "train", *args])


def cmd_check_config(args: list[str]) -> int:
    from diffloop.config import config_to_dict, derived_arithmetic, load_config

    path, overrides = _split_config_args(args)
    config = load_config(path, overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    for line in derived_arithmetic(config).lines():
        print("# " + line)
    print(f"# {path}: OK")
    return 0


def cmd_sample(argv: list[str]) -> int:
    from diffloop.sampling import sample_main

    return sample_main(argv)


def cmd_shapes(argv: list[str]) -> int:
    if not argv or argv[0] != "pretrain":
        print("usage: diffloop shapes pretrain [--help]", file=sys.stderr)
        return 2
    from diffloop.shapes.pretrain import main as pretrain_main

    return pretrain_main(argv[1:])


def cmd_serve_reward(argv: list[str]) -> int:
    from diffloop.rewards.server import serve_main

    return serve_main(argv)


def cmd_eval(argv: list[str]) -> int:
    from diffloop.evaluate import eval_main

    return eval_main(argv)


def cmd_report(argv: list[str]) -> int:
    from diffloop.report import report_main

    return report_main(argv)


def cmd_compare(argv: list[str]) -> int:
    from diffloop.sweep import compare_main

    return compare_main(argv)


def cmd_variance(argv: list[str]) -> int:
    from diffloop.variance import variance_main

    return variance_main(argv)


def cmd_bench(argv: list[str]) -> int:
    from diffloop.bench import bench_main

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
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from diffloop.checkpoint import CheckpointError
    from diffloop.config import ConfigError
    from diffloop.policies.diffusers_policy import ModelLoadError
    from diffloop.rewards import RewardError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, ModelLoadError, CheckpointError, RewardError) as e:
        print(f"diffloop: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
