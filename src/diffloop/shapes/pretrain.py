"""Pretrain the shapes-world text-to-image model on rendered scenes: ``diffloop shapes pretrain``.

Denoising objective (DDPM, epsilon or v prediction), with x0 (B, 3, 32, 32) in [-1, 1], c the
caption tokens (B, L), t ~ U{0, ..., 999}, eps ~ N(0, I):

    x_t    = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps
    target = eps                                             (epsilon)
           = sqrt(a_bar_t) eps - sqrt(1 - a_bar_t) x0        (v_prediction)
    loss   = mean || unet(x_t, t, text_encoder(c')) - target ||^2

where c' is the empty caption with probability ``--cond-dropout`` (so that classifier-free guidance
has an unconditional model). The UNet and the text encoder are trained jointly from scratch.

Outputs under ``--output DIR``:
    config.json         resolved arguments, model config, versions
    train_log.jsonl     {"step", "loss", "lr", "samples_per_s", "elapsed_s"} every --log-every
    eval.jsonl          {"step", "loss" (mean since the previous eval), "binding_val_pair",
                         "binding_train_single", "binding_val_unseen", "binding_val_seen",
                         "binding_train_pair"} at --eval-every / --milestones steps and the end
    eval_step_N.png     a grid of evaluation samples (rows: val_pair, train_single, train_pair)
    step_N/             snapshots in the diffusers layout of ``model.save_components``
    final/              the weights at the last step

Reproducibility: the data stream depends on (--seed, --num-workers, --batch-size); the learning
rate on (--lr, --warmup-steps, --schedule, and for cosine --decay-steps, default --steps), never
on --max-minutes; evals use their own generator. So with ``--schedule constant`` (or a fixed
--decay-steps) ``step_N/`` of a long run equals ``final/`` of a run with ``--steps N`` and the same
other arguments (up to GPU non-determinism).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffloop.errors import CommandParser
from diffloop.shapes import model as shapes_model
from diffloop.shapes import world


# ------------------------------------------------------------------------------------- args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``diffloop shapes pretrain``."""
    p = CommandParser(
        prog="diffloop shapes pretrain",
        description="Pretrain the shapes-world text-to-image diffusion model on rendered scenes "
        "(the model diffloop ships is one such run): the UNet and its text encoder are trained "
        "jointly from scratch on the denoising objective, with the empty caption now and then "
        "(--cond-dropout) so that classifier-free guidance works.",
        epilog="Writes to --output: config.json (the resolved arguments), train_log.jsonl, "
        "eval.jsonl (binding scores on the evaluation splits), eval_step_N.png grids, step_N/ "
        "snapshots and final/ (the weights at the last step, in diffusers' layout).",
    )
    p.add_argument("--output", required=True, help="run directory (snapshots, logs, evals)")
    p.add_argument("--steps", type=int, default=20000, help="optimiser steps (upper bound)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="also stop after this much wall-clock training time (a final snapshot is saved)",
    )
    p.add_argument(
        "--batch-size", type=int, default=128, help="scenes per step (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument(
        "--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)"
    )
    p.add_argument("--warmup-steps", type=int, default=200, help="linear warmup from 0 to --lr")
    p.add_argument(
        "--schedule",
        choices=["cosine", "constant"],
        default="cosine",
        help="after warmup: cosine decay to 10%% of --lr over --decay-steps, or constant",
    )
    p.add_argument(
        "--decay-steps",
        type=int,
        default=None,
        help="cosine horizon (default --steps); independent of --max-minutes",
    )
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument(
        "--cond-dropout",
        type=float,
        default=0.1,
        help="probability of training on the empty caption (for classifier-free guidance)",
    )
    p.add_argument(
        "--pair-prob", type=float, default=0.5, help="fraction of two-object training scenes"
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.999,
        help="EMA of UNet and text-encoder weights used for evals and snapshots (0 = off)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the data, the weights and the evaluations"
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ..."
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="render workers (default: 0 on CPU, min(14, cores - 2) on CUDA)",
    )
    p.add_argument(
        "--save-every", type=int, default=0, help="write DIR/step_N/ every N steps (0 = off)"
    )
    p.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N steps (0 = only at the end)"
    )
    p.add_argument(
        "--milestones",
        default="",
        help="comma-separated steps at which to snapshot and evaluate (besides the --*-every)",
    )
    p.add_argument(
        "--no-final-eval", action="store_true", help="skip the evaluation after the last step"
    )
    p.add_argument(
        "--eval-max-prompts",
        type=int,
        default=64,
        help="prompts per eval split (a fixed, seeded subset; 0 = all)",
    )
    p.add_argument(
        "--eval-images-per-prompt",
        type=int,
        default=1,
        help="images per evaluation prompt (default: %(default)s)",
    )
    # Eval sampler defaults = the RL sampler of configs/shapes.yaml: the base model's binding is
    # measured where RL starts from.
    p.add_argument("--eval-steps", type=int, default=10, help="DDIM steps of the eval sampler")
    p.add_argument("--eval-guidance", type=float, default=3.0, help="CFG scale of the eval sampler")
    p.add_argument("--eval-eta", type=float, default=1.0, help="DDIM eta of the eval sampler")
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=256,
        help="images sampled at once in evaluations (default: %(default)s)",
    )
    p.add_argument("--log-every", type=int, default=50, help="write train_log.jsonl every N steps")
    p.add_argument("--init-from", default=None, help="continue from a saved model directory")
    # Architecture (ignored with --init-from).
    p.add_argument(
        "--image-size", type=int, default=world.IMAGE_SIZE, help="render and model resolution"
    )
    p.add_argument("--channels", default="16,32,32", help="UNet block_out_channels")
    p.add_argument(
        "--layers-per-block",
        type=int,
        default=1,
        help="UNet layers per block (default: %(default)s)",
    )
    p.add_argument("--text-hidden", type=int, default=64, help="text width = cross_attention_dim")
    p.add_argument(
        "--text-layers", type=int, default=2, help="text-encoder layers (default: %(default)s)"
    )
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default="epsilon",
        help="what the UNet predicts: epsilon (the noise) or v_prediction, which learns "
        "faster on a "
        "CPU budget (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        p.error("--batch-size and --steps must be >= 1")
    if not 0.0 <= args.cond_dropout < 1.0:
        p.error("--cond-dropout must be in [0, 1)")
    if not 0.0 <= args.ema_decay < 1.0:
        p.error("--ema-decay must be in [0, 1)")
    try:
        args.milestones = sorted({int(m) for m in args.milestones.split(",") if m.strip()})
    except ValueError:
        p.error(f"--milestones must be comma-separated integers, got {args.milestones!r}")
    return args


def model_config(args: argparse.Namespace) -> shapes_model.ShapesModelConfig:
    """The architecture the arguments ask for."""
    return shapes_model.ShapesModelConfig(
        image_size=args.image_size,
        block_out_channels=tuple(int(c) for c in args.channels.split(",")),
        layers_per_block=args.layers_per_block,
        text_hidden_size=args.text_hidden,
        text_layers=args.text_layers,
        text_intermediate_size=2 * args.text_hidden,
        prediction_type=args.prediction_type,
    )


# ------------------------------------------------------------------------------------- data
class RenderedBatches(torch.utils.data.IterableDataset):
    """An endless stream of rendered training batches: (images (B, H, W, 3) uint8, ids (B, L) long).

    Worker w of W draws from ``np.random.default_rng([seed, w])``; the DataLoader interleaves the
    workers' batches in a fixed order, so the stream is a function of (seed, W, batch size).
    """

    def __init__(
        self,
        tokenizer: Any,
        batch_size: int,
        seed: int,
        pair_prob: float = 0.5,
        image_size: int = world.IMAGE_SIZE,
    ) -> None:
        super().__init__()
        self.tokenizer, self.batch_size, self.seed = tokenizer, batch_size, seed
        self.pair_prob, self.image_size = pair_prob, image_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        while True:
            pairs = [
                world.sample_training_example(rng, self.image_size, self.pair_prob)
                for _ in range(self.batch_size)
            ]
            images = torch.from_numpy(np.stack([img for img, _ in pairs]))
            yield images, shapes_model.tokenize(self.tokenizer, [text for _, text in pairs])


def batch_stream(
    tokenizer: Any, args: argparse.Namespace, image_size: int, num_workers: int, pin: bool
) -> Iterator:
    """Iterator over (images uint8 (B, H, W, 3), ids (B, L)) batches rendered by ``num_workers``."""
    dataset = RenderedBatches(tokenizer, args.batch_size, args.seed, args.pair_prob, image_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=num_workers,
        pin_memory=pin,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


# ------------------------------------------------------------------------------------- math
def diffusion_targets(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noised inputs x_t and regression targets, both (B, C, H, W).

    x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps; target = eps, or for v-prediction
    v = sqrt(a_bar_t) eps - sqrt(1 - a_bar_t) x0.
    ``alphas_cumprod`` (1000,), ``timesteps`` (B,) long.
    """
    a_bar = alphas_cumprod.to(x0.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    x_t = a_bar.sqrt() * x0 + (1.0 - a_bar).sqrt() * noise
    if prediction_type == "epsilon":
        return x_t, noise
    if prediction_type == "v_prediction":
        return x_t, a_bar.sqrt() * noise - (1.0 - a_bar).sqrt() * x0
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def learning_rate_factor(step: int, warmup_steps: int, decay_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` (0-based).

    warmup: (step + 1) / warmup_steps; then cosine: 0.1 + 0.9 * (1 + cos(pi * p)) / 2 with
    p = (step - warmup) / (decay_steps - warmup) clipped to [0, 1]; or constant 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live, parameter by parameter."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in live.parameters()], 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """Warmed-up EMA decay min(decay, (1 + step) / (10 + step)): early averages forget the init."""
    return min(decay, (1.0 + step) / (10.0 + step))


# ------------------------------------------------------------------------------------- eval
def eval_prompts(max_prompts: int, seed: int) -> dict[str, list[str]]:
    """Fixed prompt subsets (uniform, seeded; ``max_prompts`` 0 = all) of val_pair, train_single
    and train_pair."""
    splits = world.prompt_splits()
    rng = np.random.default_rng([seed, 12345])
    out = {}
    for name in ("val_pair", "train_single", "train_pair"):
        prompts = splits[name]
        if 0 < max_prompts < len(prompts):
            prompts = [
                prompts[i] for i in sorted(rng.choice(len(prompts), max_prompts, replace=False))
            ]
        out[name] = prompts
    return out


@torch.no_grad()
def evaluate(
    components: dict[str, Any], args: argparse.Namespace
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean binding reward of fresh samples per split, and a grid of samples (3, h, w) in [0, 1].

    Sampler: DDIM with ``--eval-steps``, ``--eval-guidance``, ``--eval-eta``, the same noise at
    every eval. binding_val_unseen / binding_val_seen split the val_pair samples by whether the
    caption uses a held-out (colour, shape) combination.
    """
    from diffloop.shapes.reward import BindingReward

    reward = BindingReward()
    device = next(components["unet"].parameters()).device
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    unseen = set(world.prompt_splits()["val_unseen"])
    metrics: dict[str, float] = {}
    grid_rows = []
    for split, prompts in eval_prompts(args.eval_max_prompts, args.seed).items():
        prompts = [p for p in prompts for _ in range(args.eval_images_per_prompt)]
        images = torch.cat(
            [
                shapes_model.generate(
                    components,
                    prompts[i : i + args.eval_batch_size],
                    num_steps=args.eval_steps,
                    guidance_scale=args.eval_guidance,
                    eta=args.eval_eta,
                    generator=generator,
                ).cpu()
                for i in range(0, len(prompts), args.eval_batch_size)
            ]
        )
        scores = reward(images, prompts)
        metrics[f"binding_{split}"] = float(scores.mean())
        if split == "val_pair":
            is_unseen = torch.tensor([p in unseen for p in prompts])
            metrics["binding_val_unseen"] = (
                float(scores[is_unseen].mean()) if is_unseen.any() else float("nan")
            )
            metrics["binding_val_seen"] = (
                float(scores[~is_unseen].mean()) if (~is_unseen).any() else float("nan")
            )
        grid_rows.append(images[:16])
    return metrics, image_grid(grid_rows)


def image_grid(rows: list[torch.Tensor], pad: int = 1) -> torch.Tensor:
    """Rows of (n_i, 3, H, W) images -> one (3, R (H + pad), 16 (W + pad)) grid, white padding."""
    _, _, h, w = rows[0].shape
    grid = torch.ones(3, len(rows) * (h + pad), 16 * (w + pad))
    for r, row in enumerate(rows):
        for c, img in enumerate(row[:16]):
            grid[:, r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = img
    return grid


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a (3, H, W) [0, 1] image as PNG."""
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


# ------------------------------------------------------------------------------------- loop
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def versions() -> dict[str, str]:
    """Versions of the stack, for config.json."""
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def default_workers(on_cuda: bool) -> int:
    """Render workers: none on CPU (the model is the bottleneck), all cores but two on CUDA."""
    import os

    return min(14, max(0, (os.cpu_count() or 2) - 2)) if on_cuda else 0


class LossMeter:
    """Running mean of the training loss, summed on the device: no per-step GPU sync."""

    def __init__(self, device: torch.device) -> None:
        self.total, self.count = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.count += 1

    def pop_mean(self) -> float:
        """The mean since the last pop (NaN if empty), then reset."""
        value = float(self.total) / self.count if self.count else float("nan")
        self.total.zero_()
        self.count = 0
        return value


class Pretrainer:
    """The pretraining run of ``args``: components, optimiser, EMA copies, data stream, outputs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.output)
        self.out.mkdir(parents=True, exist_ok=True)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = device = resolve_device(args.device)
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:
            # TF32 for the fp32 ops outside autocast; fixed shapes suit cudnn autotuning.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed)
        c = (
            shapes_model.load_components(args.init_from)
            if args.init_from
            else shapes_model.build_components(model_config(args))
        )
        self.unet = c["unet"].to(device).train()
        self.text_encoder = c["text_encoder"].to(device).train()
        self.tokenizer, self.scheduler = c["tokenizer"], c["scheduler"]
        # (1000,) on the device once: a per-step host-to-device copy would sync every step.
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.optimizer = torch.optim.AdamW(  # fused on CUDA: a tiny model is launch-bound
            self.params,
            lr=args.lr,
            weight_decay=args.weight_decay,
            betas=(0.9, 0.99),
            fused=self.on_cuda,
        )
        self.decay_steps = args.decay_steps or args.steps
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: learning_rate_factor(s, args.warmup_steps, self.decay_steps, args.schedule),
        )
        self.use_ema = args.ema_decay > 0
        # EMA copies serve evals and snapshots (under a million parameters: copies are cheap).
        self.ema_unet = (
            copy.deepcopy(self.unet).eval().requires_grad_(False) if self.use_ema else self.unet
        )
        self.ema_text = (
            copy.deepcopy(self.text_encoder).eval().requires_grad_(False)
            if self.use_ema
            else self.text_encoder
        )
        self.uncond_ids = shapes_model.tokenize(self.tokenizer, [""], device)  # (1, L)
        self.noise_gen = torch.Generator(device).manual_seed(args.seed)
        self.num_workers = (
            default_workers(self.on_cuda) if args.num_workers is None else args.num_workers
        )
        self.step = 0
        self.write_config()

    def write_config(self) -> None:
        """Write config.json (arguments, architecture, versions) and print a one-line summary."""
        args = self.args
        model = (
            shapes_model.config_dict(model_config(args))
            if not args.init_from
            else {"init_from": args.init_from}
        )
        n_unet, n_text = (shapes_model.count_parameters(m) for m in (self.unet, self.text_encoder))
        (self.out / "config.json").write_text(
            json.dumps(
                {
                    "argv": sys.argv,
                    "args": vars(args),
                    "model": model,
                    "num_workers": self.num_workers,
                    "decay_steps": self.decay_steps,
                    "device": str(self.device),
                    "versions": versions(),
                    "unet_parameters": n_unet,
                    "text_encoder_parameters": n_text,
                },
                indent=2,
            )
        )
        print(
            f"[pretrain] device={self.device} workers={self.num_workers} unet={n_unet:,} "
            f"text_encoder={n_text:,} parameters",
            flush=True,
        )

    def components(self) -> dict[str, Any]:
        """The weights that evals and snapshots use (EMA if enabled)."""
        return {
            "unet": self.ema_unet,
            "text_encoder": self.ema_text,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
        }

    def train_step(self, images_u8: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One optimiser step on images (B, H, W, 3) uint8 and ids (B, L); returns the loss."""
        device, gen = self.device, self.noise_gen
        x0 = shapes_model.to_model_space(images_u8.to(device, non_blocking=True))  # (B, 3, H, W)
        ids = ids.to(device, non_blocking=True)
        b = x0.shape[0]
        drop = torch.rand(b, device=device, generator=gen) < self.args.cond_dropout
        ids = torch.where(drop[:, None], self.uncond_ids, ids)  # empty caption: CFG's unconditional
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(
            0, int(self.scheduler.config.num_train_timesteps), (b,), device=device, generator=gen
        )
        x_t, target = diffusion_targets(
            x0, noise, t, self.alphas_cumprod, self.scheduler.config.prediction_type
        )
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_cuda):
            context = self.text_encoder(ids).last_hidden_state
            pred = self.unet(x_t, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        self.optimizer.step()
        self.lr_sched.step()
        if self.use_ema:
            decay = ema_decay_at(self.step, self.args.ema_decay)
            ema_update(self.ema_unet, self.unet, decay)
            ema_update(self.ema_text, self.text_encoder, decay)
        self.step += 1
        return loss

    def snapshot(self, name: str) -> None:
        """Save the (EMA) model to DIR/name with its provenance in diffloop_model.json."""
        provenance = {"pretrain": {"step": self.step, "ema": self.use_ema, "args": vars(self.args)}}
        shapes_model.save_components(self.components(), self.out / name, extra_info=provenance)

    def evaluate(self, loss: float) -> dict[str, Any]:
        """Score fresh samples (``evaluate``), append to eval.jsonl, write the image grid."""
        t0 = time.time()
        metrics, grid = evaluate(self.components(), self.args)
        record = {"step": self.step, "loss": loss, **metrics, "eval_s": round(time.time() - t0, 2)}
        write_jsonl(self.out / "eval.jsonl", record)
        save_png(grid, self.out / f"eval_step_{self.step}.png")
        print(f"[eval] {json.dumps(record)}", flush=True)
        return record

    def run(self) -> dict[str, Any]:
        """Train until --steps or --max-minutes, snapshot and evaluate; the last eval metrics."""
        args, milestones = self.args, set(self.args.milestones)
        size = int(self.unet.config.sample_size)
        batches = batch_stream(self.tokenizer, args, size, self.num_workers, pin=self.on_cuda)
        log_meter, eval_meter = LossMeter(self.device), LossMeter(self.device)
        last_eval: dict[str, Any] = {}
        start = t_log = time.time()
        evaluated_now = False
        while self.step < args.steps:
            loss = self.train_step(*next(batches))
            log_meter.add(loss)
            eval_meter.add(loss)
            if self.step % args.log_every == 0 or self.step == args.steps:
                n, dt = log_meter.count, time.time() - t_log
                write_jsonl(
                    self.out / "train_log.jsonl",
                    {
                        "step": self.step,
                        "loss": log_meter.pop_mean(),
                        "lr": self.lr_sched.get_last_lr()[0],
                        "samples_per_s": round(n * args.batch_size / max(dt, 1e-9), 1),
                        "elapsed_s": round(time.time() - start, 1),
                    },
                )
                t_log = time.time()
            out_of_time = (
                args.max_minutes is not None and time.time() - start >= 60.0 * args.max_minutes
            )
            milestone = self.step in milestones
            if milestone or (args.save_every and self.step % args.save_every == 0):
                self.snapshot(f"step_{self.step}")
            evaluated_now = milestone or bool(args.eval_every and self.step % args.eval_every == 0)
            if evaluated_now:
                last_eval = self.evaluate(eval_meter.pop_mean())
            if out_of_time:
                print(f"[pretrain] wall-clock limit reached at step {self.step}", flush=True)
                break
        self.snapshot("final")
        if not args.no_final_eval and not evaluated_now:
            last_eval = self.evaluate(eval_meter.pop_mean())
        print(
            f"[pretrain] done: {self.step} steps in {time.time() - start:.0f} s"
            f" -> {self.out / 'final'}",
            flush=True,
        )
        return last_eval


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``diffloop shapes pretrain``; returns the exit status."""
    Pretrainer(parse_args(argv)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
