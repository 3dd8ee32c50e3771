"""``diffloop eval``: score base models, LoRA runs and checkpoints on prompts, with fixed noise.

    diffloop eval TARGET [--compare TARGET2 ...] --prompts NAME --reward NAME [--reward NAME2 ...]
                  [--num-prompts N] [--images-per-prompt K] [--steps S] [--guidance-scale G]
                  [--eta E] [--seed 0] [--output DIR] [--device cpu|cuda] [--batch-size B]

A TARGET is a training run directory (config.yaml + checkpoints/: its newest checkpoint whose
weights verify; an older one, with a warning, when the newest is damaged), one
checkpoint directory of a run (``RUN/checkpoints/epoch_000012``), or a model (a diffusers directory,
a hub id, or ``shapes``). A checkpoint contributes only its safetensors weights (its EMA when the
run kept one; ``checkpoint.load_weights``): no pickled file of it is opened. ``--prompts`` takes a
prompt-source name (``diffloop.prompts``) or a text file (one prompt a line); the first N prompts
are used, in order.

Fixed noise: image j of prompt i starts from (and, with eta > 0, is driven by) a generator seeded
with ``seeding.eval_image_seed(seed, i, j)``, for every target (the rule of the trainer's own
evaluation too, whose ``eval.seed`` reproduces here). Base and fine-tuned models therefore see the
same initial noise, and the difference between two targets can be measured image by image (paired).

The sampler (steps, eta, guidance, negative prompt): each flag when given, else the first run (or
checkpoint) target's evaluation sampler (``loops.evaluation_sampler``: eval.num_steps / eval.eta,
null = the model's convention, e.g. SD3 40 and FLUX 28 steps at noise level 0;
sample.guidance_scale and sample.negative_prompt), so ``diffloop eval RUN`` scores as the run's own
evaluation did; with no run among the targets, the model's convention, else 50 steps, eta 0,
guidance 5.0. The model's convention is read from the first target's model. eta = 0 is
deterministic (DDIM with eta 0, the flow ODE): the image is a function of the model and the seed.

Outputs in ``--output``: ``eval.json`` (rewritten after each target, so that an interrupted
evaluation keeps the targets it finished), ``grid_<label>.png`` per target (rows = prompts,
columns = images; the first ``--grid-prompts`` prompts), and with several targets ``compare.png``
(per prompt, the targets side by side). Tiny images are upscaled (nearest neighbour) to be viewable.

eval.json::

    {"targets": [{"target", "label", "kind", "checkpoint", "grid",
                  "rewards": {name: {"mean", "std", "sem", "n", "n_invalid", "sem_over_prompts"}},
                  "per_prompt": {name: [{"prompt", "scores": [K values, null = invalid], "mean"}]},
                  "difference_vs_first": {name: {"mean", "std", "sem", "n"}}}],  (targets 2, ...)
     "settings": {...}}

Statistics over the n valid scores x_1..x_n of a reward (invalid = NaN, left out and counted):
    mean = 1/n sum x,  std = sqrt(1/(n-1) sum (x - mean)^2),  sem = std / sqrt(n)
``sem`` treats images as independent; images of one prompt are correlated, so
``sem_over_prompts`` (the same formula over the per-prompt means) is the more honest error bar when
prompts are few. ``difference_vs_first`` applies the formulas to the paired differences
d_ij = x_ij(target) - x_ij(first target), over images valid in both: same noise, same prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffloop import loops, seeding
from diffloop.config import check_output_dir
from diffloop.errors import CommandParser
from diffloop.evaluation import evaluation_inputs, progress_bar
from diffloop.images import make_grid

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
MIN_GRID_CELL_PX = 128  # images smaller than this are upscaled (nearest) in the grids
GRID_GAP_PX = 16  # white gap between targets in compare.png


@dataclass(frozen=True)
class EvalTarget:
    """What one TARGET argument names.

    Fields:
        spec:       the argument as given.
        kind:       "run" (newest checkpoint of a run), "checkpoint" (one checkpoint), or "model".
        run_dir:    the run directory for "run" and "checkpoint"; None for a model.
        checkpoint: the checkpoint directory for "checkpoint"; None otherwise (resolved on load).
        label:      a short file-name-safe name for tables and grid files.
    """

    spec: str
    kind: str
    run_dir: Path | None
    checkpoint: Path | None
    label: str


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("_") or "target"


def resolve_target(spec: str) -> EvalTarget:
    """Classify a TARGET argument (see module doc); nothing is loaded."""
    from diffloop.checkpoint import CHECKPOINT_RE

    path = Path(spec).expanduser()
    if (path / "config.yaml").is_file():
        return EvalTarget(spec, "run", path, None, _safe(path.resolve().name))
    run = path.parent.parent
    if (
        CHECKPOINT_RE.match(path.name)
        and path.parent.name == "checkpoints"
        and (run / "config.yaml").is_file()
    ):
        return EvalTarget(spec, "checkpoint", run, path, _safe(f"{run.resolve().name}@{path.name}"))
    return EvalTarget(spec, "model", None, None, _safe(path.name if path.is_dir() else spec))


def unique_labels(targets: list[EvalTarget]) -> list[EvalTarget]:
    """Targets with distinct labels: a repeated label gets "-2", "-3", ... appended."""
    seen: dict[str, int] = {}
    out = []
    for t in targets:
        seen[t.label] = seen.get(t.label, 0) + 1
        label = t.label if seen[t.label] == 1 else f"{t.label}-{seen[t.label]}"
        out.append(EvalTarget(t.spec, t.kind, t.run_dir, t.checkpoint, label))
    return out


def first_run_config(targets: list[EvalTarget]):
    """The config of the first run or checkpoint target, in any position (``shapes --compare RUN``
    samples as RUN was evaluated), or None when every target is a model."""
    from diffloop.config import load_config

    for target in targets:
        if target.run_dir is not None:
            return load_config(target.run_dir / "config.yaml")
    return None


def default_sampler(run_config: Any, policy: Any) -> loops.SamplerSettings:
    """The sampler when no flag overrides it: the run's evaluation sampler
    (``loops.evaluation_sampler``) when a run is among the targets, else the policy's
    convention (``eval_num_steps`` / ``eval_eta``), else 50 steps, eta 0, guidance 5.0."""
    if run_config is not None:
        return loops.evaluation_sampler(run_config, policy)
    steps = getattr(policy, "eval_num_steps", None)
    eta = getattr(policy, "eval_eta", None)
    return loops.SamplerSettings(
        steps if steps is not None else DEFAULT_STEPS,
        eta if eta is not None else 0.0,
        DEFAULT_GUIDANCE,
    )


def load_target(target: EvalTarget, device: torch.device):
    """(policy, run config or None, checkpoint path or None) for a target."""
    from diffloop.config import LoraConfig, ModelConfig
    from diffloop.policies.families import load_policy
    from diffloop.tools.sampling import load_run_policy

    if target.kind == "model":
        return (
            load_policy(
                ModelConfig(pretrained=target.spec), LoraConfig(enabled=False), device=device
            ),
            None,
            None,
        )
    from diffloop.performance import set_backend_flags

    # A run: its newest checkpoint whose weights verify (an older one, warned, if that is damaged).
    policy, config, path = load_run_policy(target.run_dir, device, target.checkpoint)
    set_backend_flags(config.performance, device)  # the run's TF32 setting: its numbers reproduce
    return policy, config, path


def load_prompts(prompts: str | Sequence[str], num_prompts: int | None) -> tuple[str, list[str]]:
    """(source name, its first num_prompts prompts in order, cycling) of a name, file or list.

    A string names a prompt source (``diffloop.prompts``), or a text file if it is a ``file:`` path
    or an existing file; a sequence is used as the prompts themselves. None: every prompt once.
    """
    from diffloop.prompts import PromptSource, build_prompt_source

    if isinstance(prompts, str):
        path = prompts.removeprefix("file:")
        if prompts.startswith("file:") or Path(path).is_file():
            source = build_prompt_source("file", path=path)
        else:
            source = build_prompt_source(prompts)
    else:
        source = PromptSource("list", list(prompts))
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    return source.name, source.iterate_fixed(num_prompts or len(source))


def build_rewards(
    names: Sequence[str], kwargs: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, Any]:
    """name -> reward, each built with its kwargs (``kwargs[name]``), before any model loads."""
    from diffloop.rewards import build_reward

    if not names:
        raise ValueError("give at least one --reward")
    if len(set(names)) != len(names):
        raise ValueError(f"a reward is named twice in {list(names)}")
    kwargs = dict(kwargs or {})
    unknown = set(kwargs) - set(names)
    if unknown:
        raise ValueError(
            f"reward kwargs for {sorted(unknown)}, which is not among the rewards {list(names)}"
        )
    return {name: build_reward(name, **dict(kwargs.get(name, {}))) for name in names}


@torch.no_grad()
def generate_and_score(
    policy: Any,
    prompts: list[str],
    images_per_prompt: int,
    rewards: Mapping[str, Any],
    *,
    seed: int,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    negative_prompt: str,
    batch_size: int,
    keep_prompts: int,
    progress: loops.ProgressFn | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sample P*K images in batches and score them with every reward: the evaluation of
    ``diffloop.evaluation`` (``evaluation_inputs``: the trainer's prompts, seeds and metadata).

    Returns ({reward: scores (P, K) float32, NaN = invalid}, images (min(P, keep_prompts) K, 3,
    H, W) uint8 of the first ``keep_prompts`` prompts for the grids; the rest are not kept).
    ``progress`` wraps the batches (``loops.score_fixed_noise``).
    """
    p, k = len(prompts), images_per_prompt
    flat, seeds, metadata = evaluation_inputs(prompts, k, seed)
    sampler = loops.SamplerSettings(num_steps, eta, guidance_scale, negative_prompt)
    scores, kept = loops.score_fixed_noise(
        policy, flat, seeds, rewards, sampler, batch_size, metadata=metadata,
        keep_images=keep_prompts * k, progress=progress,
    )  # fmt: skip
    images = (kept.clamp(0, 1) * 255).round().to(torch.uint8)
    return {name: v.view(p, k) for name, v in scores.items()}, images


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarise(values: torch.Tensor) -> dict[str, float | int | None]:
    """mean, std (n - 1), sem = std / sqrt(n), n over the valid (non-NaN) entries (module doc)."""
    x = values.flatten().double()
    x = x[~torch.isnan(x)]
    n = int(x.numel())
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(unbiased=True)) if n > 1 else (0.0 if n == 1 else math.nan)
    sem = std / math.sqrt(n) if n else math.nan
    return {"mean": _finite(mean), "std": _finite(std), "sem": _finite(sem), "n": n}


def reward_statistics(scores: torch.Tensor) -> dict[str, float | int | None]:
    """scores (P, K): summarise() over images, plus n_invalid and sem_over_prompts."""
    out = summarise(scores)
    out["n_invalid"] = int(torch.isnan(scores).sum())
    valid_prompts = ~torch.isnan(scores).all(dim=1)
    prompt_means = torch.nanmean(scores[valid_prompts].double(), dim=1)  # (P',)
    out["sem_over_prompts"] = summarise(prompt_means)["sem"]
    return out


def per_prompt(prompts: list[str], scores: torch.Tensor) -> list[dict[str, Any]]:
    """scores (P, K) -> [{"prompt", "scores": K values (None = invalid), "mean"}], prompt order."""
    return [
        {
            "prompt": prompt,
            "scores": [_finite(v) for v in row.tolist()],
            "mean": summarise(row)["mean"],
        }
        for prompt, row in zip(prompts, scores, strict=True)
    ]


def _grid_upscale(width: int) -> int:
    return max(1, math.ceil(MIN_GRID_CELL_PX / max(1, width)))


def save_target_grid(images_u8: torch.Tensor, images_per_prompt: int, path: Path) -> None:
    """(G*K, 3, H, W) uint8 -> PNG with one row per prompt, one column per image."""
    from diffloop.images import save_grid

    save_grid(
        images_u8.float() / 255,
        path,
        ncols=images_per_prompt,
        upscale=_grid_upscale(images_u8.shape[-1]),
    )


def compare_grid(
    per_target: list[torch.Tensor], images_per_prompt: int, gap: int = GRID_GAP_PX
) -> np.ndarray:
    """Targets side by side: each target's grid (rows = prompts, K columns), a white gap between.

    per_target: T tensors (G*K, 3, H, W) uint8 of the same prompts -> (rows, cols, 3) uint8, every
    grid upscaled like the per-target grids. Row i of every block is prompt i, same seeds.
    """
    scale = _grid_upscale(per_target[0].shape[-1])
    blocks = []
    for t, images in enumerate(per_target):
        grid = make_grid(images.float() / 255, ncols=images_per_prompt)
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest-neighbour upscale
        if t:
            blocks.append(np.full((grid.shape[0], gap, 3), 255, dtype=np.uint8))
        blocks.append(grid)
    return np.concatenate(blocks, axis=1)


def save_compare_grid(
    per_target: list[torch.Tensor], labels: list[str], images_per_prompt: int, path: Path
) -> None:
    """compare_grid() as a PNG, with each target's label above its block."""
    from PIL import Image, ImageDraw

    grid = compare_grid(per_target, images_per_prompt)
    header = 16
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
    canvas.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(canvas)
    block = (grid.shape[1] + GRID_GAP_PX) // len(labels)  # equal-width blocks and gaps
    for i, label in enumerate(labels):
        draw.text((i * block + 2, 2), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _paired_difference(scores: torch.Tensor, first: torch.Tensor) -> dict[str, float | int | None]:
    return summarise(scores.double() - first.double())  # NaN where either is invalid: left out


def evaluate_model(
    targets: str | Sequence[str],
    *,
    prompts: str | Sequence[str],
    rewards: Sequence[str],
    reward_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    num_prompts: int | None = None,
    images_per_prompt: int = 4,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    seed: int = 0,
    negative_prompt: str | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    output_dir: str | Path | None = None,
    grid_prompts: int = 8,
    progress_bars: bool = True,
) -> dict[str, Any]:
    """Evaluate each target on the same prompts and noise; returns (and writes) the eval.json dict.

    ``num_steps`` / ``eta`` / ``guidance_scale`` / ``negative_prompt`` default to the first run (or
    checkpoint) target's evaluation sampler, wherever it is among the targets (``default_sampler``;
    module doc): every target uses the same values (printed by the CLI).
    ``reward_kwargs``: reward name -> kwargs. With ``output_dir`` writes eval.json and the grids.
    ``progress_bars``: a progress bar on stderr per target, naming it.
    """
    specs = [targets] if isinstance(targets, str) else list(targets)
    if not specs:
        raise ValueError("give at least one target")
    if images_per_prompt < 1 or batch_size < 1 or grid_prompts < 1 or not 0 <= (eta or 0) <= 1:
        raise ValueError(
            "need images_per_prompt, batch_size, grid_prompts >= 1 and 0 <= eta <= 1; got "
            f"{images_per_prompt}, {batch_size}, {grid_prompts}, {eta}"
        )
    resolved = unique_labels([resolve_target(s) for s in specs])
    source_name, prompt_list = load_prompts(prompts, num_prompts)
    reward_fns = build_rewards(list(rewards), reward_kwargs)  # fails before any model loads
    device = torch.device(device)
    out_dir = Path(output_dir) if output_dir is not None else None
    settings: dict[str, Any] | None = None
    entries: list[dict[str, Any]] = []
    grid_images: list[torch.Tensor] = []
    first_scores: dict[str, torch.Tensor] = {}
    run_config = first_run_config(resolved)  # whatever the run's position among the targets
    for target in resolved:
        policy, _config, ckpt = load_target(target, device)
        if settings is None:  # fixed once, so that every target samples alike
            default = default_sampler(run_config, policy)
            settings = {
                "prompts": source_name,
                "num_prompts": len(prompt_list),
                "images_per_prompt": images_per_prompt,
                "rewards": list(reward_fns),
                "reward_kwargs": {k: dict(v) for k, v in (reward_kwargs or {}).items()},
                "num_steps": num_steps or default.num_steps,
                "guidance_scale": guidance_scale
                if guidance_scale is not None
                else default.guidance_scale,
                "eta": eta if eta is not None else default.eta,
                "negative_prompt": negative_prompt
                if negative_prompt is not None
                else default.negative_prompt,
                "seed": seed,
                "seed_rule": seeding.EVAL_RULE,
                "batch_size": batch_size,
                "device": str(device),
            }
        scores, images = generate_and_score(
            policy,
            prompt_list,
            images_per_prompt,
            reward_fns,
            seed=seed,
            num_steps=settings["num_steps"],
            guidance_scale=settings["guidance_scale"],
            eta=settings["eta"],
            negative_prompt=settings["negative_prompt"],
            batch_size=batch_size,
            keep_prompts=grid_prompts,
            progress=progress_bar(target.label, len(prompt_list), images_per_prompt)
            if progress_bars
            else None,
        )
        del policy  # one model in memory at a time
        entry: dict[str, Any] = {
            "target": target.spec,
            "label": target.label,
            "kind": target.kind,
            "checkpoint": str(ckpt) if ckpt is not None else None,
            "grid": f"grid_{target.label}.png" if out_dir is not None else None,
            "rewards": {name: reward_statistics(s) for name, s in scores.items()},
            "per_prompt": {name: per_prompt(prompt_list, s) for name, s in scores.items()},
        }
        if entries:
            entry["difference_vs_first"] = {
                n: _paired_difference(s, first_scores[n]) for n, s in scores.items()
            }
        else:
            first_scores = scores
        entries.append(entry)
        grid_images.append(images)
        if out_dir is not None:
            save_target_grid(images, images_per_prompt, out_dir / entry["grid"])
            if len(entries) < len(resolved):  # an interruption keeps the targets already scored
                _write_json(out_dir / "eval.json", {"targets": entries, "settings": settings})
    result = {"targets": entries, "settings": settings}
    if out_dir is not None:
        if len(entries) > 1:
            save_compare_grid(
                grid_images,
                [e["label"] for e in entries],
                images_per_prompt,
                out_dir / "compare.png",
            )
            result["compare_grid"] = "compare.png"
        _write_json(out_dir / "eval.json", result)
    return result


def _write_json(path: Path, result: Mapping[str, Any]) -> None:
    """Write through a temporary file, so that eval.json is never half written."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=False))
    tmp.replace(path)


def format_table(result: Mapping[str, Any]) -> str:
    """Text table: a row per target; per reward "mean +- sem (n)" and the paired difference."""
    names = result["settings"]["rewards"]
    rows = [["target", *names]]
    for entry in result["targets"]:
        cells = [entry["label"]]
        for name in names:
            r = entry["rewards"][name]
            cell = (
                "nan"
                if r["mean"] is None
                else f"{r['mean']:.4f} +- {r['sem'] or 0:.4f} (n={r['n']})"
            )
            diff = entry.get("difference_vs_first", {}).get(name)
            if diff and diff["mean"] is not None:
                cell += f" [{diff['mean']:+.4f} +- {diff['sem'] or 0:.4f} vs first]"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    pad = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
    lines = [pad(row).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse_reward_kwargs(text: str | None, rewards: list[str]) -> dict[str, dict[str, Any]]:
    """One reward: a JSON object of its kwargs. Several: a JSON object reward name -> kwargs."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--reward-kwargs is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"--reward-kwargs must be a JSON object, got {text!r}")  # noqa: TRY004
    if len(rewards) == 1:
        return {rewards[0]: value}
    bad = [k for k, v in value.items() if k not in rewards or not isinstance(v, dict)]
    if bad:
        raise ValueError(
            f"with several rewards, --reward-kwargs maps reward name -> kwargs object "
            f"(e.g. '{{\"{rewards[0]}\": {{...}}}}'); bad entries: {bad}"
        )
    return value


EVAL_EPILOG = """\
A TARGET is a training run directory (its newest checkpoint whose weights verify; an older one,
with a warning, when the newest is damaged), one checkpoint directory of a run
(RUN/checkpoints/epoch_000012), or a model (a diffusers directory, a hub id, or 'shapes'). Only a
checkpoint's safetensors weights are read: no pickled file of it is opened.

The sampler (steps, eta, guidance, negative prompt): each flag when given, else the first run
target's evaluation sampler (so `diffloop eval RUN` scores as the run's own evaluation did), else
the model's convention, else 50 steps, eta 0, guidance 5.0. Image j of prompt i starts from the
same noise for every target, the rule of the trainer's own evaluation (eval.seed = --seed).

Writes to --output: eval.json (per reward: mean, std, sem over images and over prompts, the
per-prompt scores, and the paired difference to the first target; rewritten after each target),
grid_<label>.png per target and, with several targets, compare.png.

example:
  diffloop eval runs/shapes_loop --compare shapes --prompts shapes/val_pair --reward shapes_binding
"""


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(
        prog="diffloop eval",
        description="Score base models, LoRA runs and checkpoints on prompts with one or more\n"
        "rewards, every target from the same fixed noise, so that two targets compare image by "
        "image.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("target", help="a run directory, a checkpoint directory of a run, or a model")
    ap.add_argument(
        "--compare", nargs="+", default=[], metavar="TARGET", help="more targets, side by side"
    )
    ap.add_argument(
        "--prompts", required=True, help="prompt source name (e.g. shapes/val_pair) or text file"
    )
    ap.add_argument("--num-prompts", type=int, default=None, help="first N prompts (default: all)")
    ap.add_argument(
        "--images-per-prompt", type=int, default=4, help="images per prompt (default: %(default)s)"
    )
    ap.add_argument("--reward", action="append", required=True, help="repeat for several rewards")
    ap.add_argument(
        "--reward-kwargs",
        default=None,
        help="JSON: the reward's kwargs; with several rewards {name: kwargs, ...}",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default: the first run's evaluation sampler, else the model's "
        "convention, else 50)",
    )
    ap.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the first run's, else 5.0)",
    )
    ap.add_argument(
        "--negative-prompt",
        default=None,
        help="negative prompt (default: the first run's, else '')",
    )
    ap.add_argument(
        "--eta",
        type=float,
        default=None,
        help="DDIM eta or flow noise level in [0, 1], 0 deterministic (default: the first run's "
        "evaluation sampler, else the model's convention, else 0)",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the fixed noise (default: %(default)s)"
    )
    ap.add_argument(
        "--output",
        type=Path,
        default=Path("eval"),
        help="directory for eval.json and the grids (default: %(default)s)",
    )
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device: cpu, cuda, cuda:N, ... (default: %(default)s)",
    )
    ap.add_argument(
        "--batch-size", type=int, default=16, help="images sampled at once (default: %(default)s)"
    )
    ap.add_argument("--grid-prompts", type=int, default=8, help="prompts (rows) shown in the grids")
    return ap


def eval_main(argv: list[str]) -> int:
    """``diffloop eval``; returns the exit code (2 on a usage error, with the message on stderr)."""
    import sys

    args = build_parser().parse_args(argv)
    try:
        check_output_dir(str(args.output), "--output")  # ConfigError, a ValueError
        reward_kwargs = _parse_reward_kwargs(args.reward_kwargs, args.reward)
        result = evaluate_model(
            [args.target, *args.compare],
            prompts=args.prompts,
            rewards=args.reward,
            reward_kwargs=reward_kwargs,
            num_prompts=args.num_prompts,
            images_per_prompt=args.images_per_prompt,
            num_steps=args.steps,
            guidance_scale=args.guidance_scale,
            eta=args.eta,
            seed=args.seed,
            negative_prompt=args.negative_prompt,
            batch_size=args.batch_size,
            device=args.device,
            output_dir=args.output,
            grid_prompts=args.grid_prompts,
        )
    except ValueError as e:  # bad prompts, reward names or kwargs, settings: a usage error
        print(f"diffloop: error: eval: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    st = result["settings"]
    print(
        f"sampled with {st['num_steps']} steps, guidance {st['guidance_scale']}, eta {st['eta']}, "
        f"seed {st['seed']} (flags, else the first run's evaluation sampler, else the model's "
        "convention / 50 steps, guidance 5.0, eta 0)"
    )
    print(f"wrote {args.output / 'eval.json'} and image grids")
    return 0
