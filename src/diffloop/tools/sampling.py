"""``diffloop sample``: images from a base model, or from a training run's newest checkpoint
(whose weights verify: an older one, with a warning, when the newest is damaged).

Sampling settings (DDIM steps, eta, guidance scale, negative prompt): a run's ``sample.*`` from its
config.yaml, else the config defaults (``SampleConfig``); a flag given on the command line wins.

Where the images go (``sample_output``): ``--output DIR`` when given (a directory that holds no
earlier samples); else a new numbered directory ``RUN/samples/0001``, ``0002``, ... under the
run, or, for a base model (no run directory), ``./samples/0001``, ... under the current
directory, its full path printed. A numbered directory is never reused, so earlier samples stay.
Each holds one PNG per image, ``grid.png`` (a row per prompt, labelled with the prompt and the
settings, tiny images upscaled to >= 128 px) and ``samples.json`` (model, settings, prompt and
seed of each image).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields, replace
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


SAMPLES_DIR = "samples"  # numbered sample directories: under a run, or the current directory
SAMPLE_FILES = ("grid.png", "samples.json")  # in a directory: it holds earlier samples


class SampleUsageError(ValueError):
    """A flag of ``diffloop sample`` is out of range; the message names the flag."""


def sample_output(output: Path | None, target: Path, is_run: bool) -> tuple[Path, bool]:
    """(directory, numbered) for the samples: ``output`` itself when given (numbered False: it
    must hold no ``SAMPLE_FILES``), else the root that a new numbered directory goes under
    (``new_numbered_dir``): ``target/samples`` for a run, ``./samples`` for a base model.
    Raises SampleUsageError naming --output."""
    if output is not None:
        held = [name for name in SAMPLE_FILES if (output / name).exists()]
        if held:
            raise SampleUsageError(f"--output={output} already holds samples ({held[0]}); "
                                   "choose a new directory, or leave --output out for a new "
                                   "numbered one")  # fmt: skip
        return output, False
    return (target / SAMPLES_DIR if is_run else Path(SAMPLES_DIR)), True


def new_numbered_dir(root: Path) -> Path:
    """Create root/NNNN, one past the highest number there (0001 first), and return it: a new
    directory each call, so earlier samples are never overwritten (a name taken meanwhile by
    another process: the next number)."""
    root.mkdir(parents=True, exist_ok=True)
    n = max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0) + 1
    while True:
        try:
            (root / f"{n:04d}").mkdir()
            return root / f"{n:04d}"
        except FileExistsError:
            n += 1


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
    checked before the model loads. Prompt embeddings are read from (and written to) the run's
    prompts.embedding_cache_dir."""
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
    if config.prompts.embedding_cache_dir is not None:  # the run's cached prompt embeddings
        policy.use_embedding_cache_dir(config.prompts.embedding_cache_dir)
    return policy, config, path


def sample_main(argv: list[str]) -> int:
    from diffloop.config import LoraConfig, ModelConfig, check_output_dir, load_config
    from diffloop.loops import make_generators
    from diffloop.policies.families import load_policy
    from diffloop.seeding import sample_cli_seed

    ap = CommandParser(
        prog="diffloop sample",
        description="Generate images from a base model, or from a training run (its newest "
        "checkpoint whose weights verify; an older one, with a warning, when the newest is "
        "damaged). The sampling settings are the run's sample.* from its config.yaml, else the "
        "config defaults; a flag given here wins. Writes one PNG per image and grid.png (a row "
        "per prompt) to --output (default: a new RUN/samples/NNNN).",
    )
    ap.add_argument(
        "model", help="a training run directory, a diffusers model directory, a hub id, or 'shapes'"
    )
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument(
        "--num-per-prompt", type=int, default=4, help="images per prompt (default: %(default)s)"
    )
    default = {f.name: f.default for f in fields(SampleConfig)}
    for flag, field, kind, what in (
        ("--steps", "num_steps", int, "DDIM steps"),
        ("--eta", "eta", float, "DDIM eta >= 0 (0: deterministic)"),
        ("--guidance-scale", "guidance_scale", float, "classifier-free guidance scale"),
        ("--negative-prompt", "negative_prompt", str, "negative prompt"),
    ):
        help_text = f"{what} (default: the run's sample.{field}, else {default[field]!r})"
        ap.add_argument(flag, type=kind, default=None, help=help_text)
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the images' noise (default: %(default)s)"
    )
    ap.add_argument(
        "--checkpoint", type=Path, default=None, help="a specific checkpoint directory of the run"
    )
    ap.add_argument(
        "--output",
        type=Path,
        default=None,
        help="directory for the images, which must hold no earlier samples (default: a new "
        "numbered directory RUN/samples/NNNN for a run, ./samples/NNNN for a base model)",
    )
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device: cpu, cuda, cuda:N, ... (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    target = Path(args.model)
    run_sample = None
    if (target / "config.yaml").is_file():
        run_sample = load_config(target / "config.yaml").sample
    try:
        settings = sampling_settings(args, run_sample)
        out, numbered = sample_output(args.output, target, run_sample is not None)
    except SampleUsageError as e:
        ap.error(str(e))
    check_output_dir(str(out), "--output")  # before a model loads
    checkpoint = None
    if run_sample is not None:
        policy, _, checkpoint = load_run_policy(target, device, args.checkpoint)
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
    out = new_numbered_dir(out) if numbered else out
    out.mkdir(parents=True, exist_ok=True)
    described = (
        f"{settings.num_steps} steps, eta {settings.eta}, guidance {settings.guidance_scale}, "
        f"negative prompt {settings.negative_prompt!r}"
    )
    source = f"model: {args.model}" if checkpoint is None else f"run: {target}, {checkpoint.name}"
    title = [source, f"{described}, seed {args.seed}"]
    write_samples(out, traj.images, args.prompt, args.num_per_prompt, title)
    record = {
        "model": args.model,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "settings": asdict(settings),
        "seed": args.seed,
        "images": [
            {"file": f"{i:04d}.png", "prompt": p, "seed": seed}
            for i, (p, seed) in enumerate(zip(prompts, seeds, strict=True))
        ],
    }
    (out / "samples.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"wrote {len(prompts)} images, grid.png and samples.json to {out.absolute()} ({described})"
    )
    if numbered and run_sample is None:  # not a run: say that the current directory was used
        print("  a base model has no run directory: a new numbered directory under ./samples "
              "of the "
              "current directory; --output chooses another place")  # fmt: skip
    return 0


def write_samples(
    out: Path, images: torch.Tensor, prompts: list[str], per_prompt: int, title: list[str]
) -> None:
    """One PNG per image (0000.png, ...) and grid.png: a row per prompt, labelled with the prompt
    and the ``title`` lines (``diffloop.images.labelled_grid``, tiny images upscaled to >= 128 px).
    images: (len(prompts) per_prompt, 3, H, W) in [0, 1], prompt-major."""
    from PIL import Image

    from diffloop.images import labelled_grid

    Image.fromarray(labelled_grid(images, prompts, per_prompt, title=title)).save(out / "grid.png")
    as_uint8 = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, img in enumerate(as_uint8):
        Image.fromarray(img).save(out / f"{i:04d}.png")
