"""``diffloop sample``: images from a base model, or from a training run's newest checkpoint
(whose weights verify: an older one, with a warning, when the newest is damaged).

Sampling settings (DDIM steps, eta, guidance scale, negative prompt): a run's ``sample.*`` from its
config.yaml, else the config defaults (``SampleConfig``); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

import torch

from diffloop.config import SampleConfig
from diffloop.errors import CommandParser

# Command-line flag -> the sample.* field it overrides.
SETTING_FLAGS = {
    "steps": "num_steps",
    "eta": "eta",
    "guidance_scale": "guidance_scale",
    "negative_prompt": "negative_prompt",
}


class SampleUsageError(ValueError):
    """A flag of ``diffloop sample`` is out of range; the message names the flag."""


def sampling_settings(args: argparse.Namespace, run_sample: SampleConfig | None) -> SampleConfig:
    """The settings to sample with: ``run_sample`` (a run's sample.*; None: the defaults) with every
    flag of SETTING_FLAGS that was given (not None) replacing its field."""
    base = run_sample if run_sample is not None else SampleConfig()
    given = {f: getattr(args, flag) for flag, f in SETTING_FLAGS.items()}
    settings = replace(base, **{f: v for f, v in given.items() if v is not None})
    if settings.num_steps < 1:
        raise SampleUsageError(f"--steps={settings.num_steps} must be >= 1")
    if settings.eta < 0:
        raise SampleUsageError(f"--eta={settings.eta} must be >= 0 (0: deterministic DDIM)")
    return settings


def load_run_policy(run_dir: Path, device: torch.device, checkpoint_path: Path | None = None):
    """(policy, run config, checkpoint) of a run: its config.yaml's model and LoRA, with the given
    checkpoint's weights, or those of the newest checkpoint whose weights verify (an older one when
    the newest is damaged, with a warning: ``checkpoint.load_newest_valid_weights``); its EMA when
    the run kept one; the frozen weights in the run's train.mixed_precision dtype, as it trained
    and evaluated. Only safetensors weights are read: nothing is unpickled. The weights are
    checked before the model loads."""
    from diffloop import checkpoint
    from diffloop.config import load_config
    from diffloop.policies.families import load_policy
    from diffloop.policies.loading import WEIGHT_DTYPES

    config = load_config(run_dir / "config.yaml")
    if checkpoint_path is not None:
        path, (weights, _) = checkpoint_path, checkpoint.load_weights(checkpoint_path)
    else:
        path, weights, _ = checkpoint.load_newest_valid_weights(run_dir)
    policy = load_policy(
        config.model,
        config.lora,
        device=device,
        weight_dtype=WEIGHT_DTYPES[config.train.mixed_precision],
        logprob_reduction=config.train.logprob_reduction,
        sample=config.sample,
    )
    policy.load_trainable_state_dict(weights)
    return policy, config, path


def sample_main(argv: list[str]) -> int:
    from diffloop.config import LoraConfig, ModelConfig, check_output_dir, load_config
    from diffloop.images import save_grid
    from diffloop.loops import make_generators
    from diffloop.policies.families import load_policy
    from diffloop.seeding import sample_cli_seed

    ap = CommandParser(prog="diffloop sample", description=__doc__)
    ap.add_argument(
        "model", help="a training run directory, a diffusers model directory, a hub id, or 'shapes'"
    )
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--num-per-prompt", type=int, default=4)
    default = {f.name: f.default for f in fields(SampleConfig)}
    for flag, field, kind, what in (
        ("--steps", "num_steps", int, "DDIM steps"),
        ("--eta", "eta", float, "DDIM eta >= 0 (0: deterministic)"),
        ("--guidance-scale", "guidance_scale", float, "classifier-free guidance scale"),
        ("--negative-prompt", "negative_prompt", str, "negative prompt"),
    ):
        help_text = f"{what} (default: the run's sample.{field}, else {default[field]!r})"
        ap.add_argument(flag, type=kind, default=None, help=help_text)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--checkpoint", type=Path, default=None, help="a specific checkpoint directory of the run"
    )
    ap.add_argument("--output", type=Path, default=Path("samples"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    check_output_dir(str(args.output), "--output")  # before a model loads
    device = torch.device(args.device)
    target = Path(args.model)
    run_sample = None
    if (target / "config.yaml").is_file():
        run_sample = load_config(target / "config.yaml").sample
    try:
        settings = sampling_settings(args, run_sample)
    except SampleUsageError as e:
        ap.error(str(e))
    if run_sample is not None:
        policy, _, _ = load_run_policy(target, device, args.checkpoint)
    else:
        policy = load_policy(
            ModelConfig(pretrained=args.model), LoraConfig(enabled=False), device=device
        )
    prompts = [p for p in args.prompt for _ in range(args.num_per_prompt)]
    seeds = [sample_cli_seed(args.seed, i) for i in range(len(prompts))]
    policy.train(False)
    traj = policy.sample(
        prompts,
        make_generators(device, seeds),
        num_steps=settings.num_steps,
        eta=settings.eta,
        guidance_scale=settings.guidance_scale,
        negative_prompt=settings.negative_prompt,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    save_grid(traj.images, args.output / "grid.png", ncols=args.num_per_prompt)
    from PIL import Image

    for i, img in enumerate((traj.images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()):
        Image.fromarray(img).save(args.output / f"{i:04d}.png")
    print(
        f"wrote {len(prompts)} images and grid.png to {args.output} ({settings.num_steps} steps, "
        f"eta {settings.eta}, guidance {settings.guidance_scale}, "
        f"negative prompt {settings.negative_prompt!r})"
    )
    return 0
