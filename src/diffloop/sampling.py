"""``diffloop sample``: images from a base model, or from a training run's newest checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def load_run_policy(run_dir: Path, device: torch.device, checkpoint_path: Path | None = None):
    """The policy of a run: its config.yaml's model and LoRA, with the newest (or given) checkpoint."""
    from diffloop import checkpoint
    from diffloop.config import load_config
    from diffloop.policies.diffusers_policy import load_policy

    config = load_config(run_dir / "config.yaml")
    policy = load_policy(config.model, config.lora, device=device, logprob_reduction=config.train.logprob_reduction)
    path = checkpoint_path or checkpoint.latest_checkpoint(run_dir)
    if path is None:
        raise checkpoint.CheckpointError(f"run directory '{run_dir}' has no complete checkpoint")
    policy.load_trainable_state_dict(checkpoint.load(path, rank=0)["trainable"])
    return policy, config


def sample_main(argv: list[str]) -> int:
    from diffloop.config import LoraConfig, ModelConfig, check_output_dir
    from diffloop.images import save_grid
    from diffloop.policies.diffusers_policy import load_policy
    from diffloop.trainer import derive_seed, make_generators

    ap = argparse.ArgumentParser(prog="diffloop sample", description=__doc__)
    ap.add_argument("model", help="a training run directory, a diffusers model directory, a hub id, or 'shapes'")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--num-per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's, else 50)")
    ap.add_argument("--guidance-scale", type=float, default=None)
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (> 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", type=Path, default=None, help="a specific checkpoint directory of the run")
    ap.add_argument("--output", type=Path, default=Path("samples"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    check_output_dir(str(args.output), "--output")  # before a model loads
    device = torch.device(args.device)
    target = Path(args.model)
    steps, guidance = 50, 5.0
    if (target / "config.yaml").is_file():
        policy, config = load_run_policy(target, device, args.checkpoint)
        steps, guidance = config.sample.num_steps, config.sample.guidance_scale
    else:
        policy = load_policy(ModelConfig(pretrained=args.model), LoraConfig(enabled=False), device=device)
    prompts = [p for p in args.prompt for _ in range(args.num_per_prompt)]
    seeds = [derive_seed(args.seed, i) for i in range(len(prompts))]
    policy.train(False)
    traj = policy.sample(
        prompts,
        make_generators(device, seeds),
        num_steps=args.steps or steps,
        eta=args.eta,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else guidance,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    save_grid(traj.images, args.output / "grid.png", ncols=args.num_per_prompt)
    from PIL import Image

    for i, img in enumerate((traj.images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()):
        Image.fromarray(img).save(args.output / f"{i:04d}.png")
    print(f"wrote {len(prompts)} images and grid.png to {args.output}")
    return 0
