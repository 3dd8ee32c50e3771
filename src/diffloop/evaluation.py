"""The held-out evaluation, written once for the trainer and ``diffloop eval``.

P prompts x K images from fixed noise: image j of prompt i at index i K + j (prompt-major), driven
by ``seeding.eval_image_seed(seed, i, j)`` (``evaluation_inputs``), sampled and scored by
``loops.score_fixed_noise``. For a run (``HeldOutEvaluation``, config.eval): the metrics of
``loops.eval_summary`` and the evaluation reward's breakdown (``diffloop.rewards.breakdown``),
the grid ``eval/<tag>.png``, for the base and the last evaluation every image and score in
``eval/<tag>.npz``, and at the end the verdict and the labelled before/after figure
(``diffloop.summary``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffloop import loops
from diffloop.config import Config
from diffloop.policies.base import DiffusionPolicy
from diffloop.rewards import build_reward
from diffloop.rewards.breakdown import (
    BreakdownValues,
    breakdown_means,
    evaluation_breakdown,
    summary_label,
    summary_sections,
)
from diffloop.rewards.registry import evaluated_with, evaluation_reward_name
from diffloop.summary import (
    FIGURE_ROWS,
    figure_images,
    save_eval_images,
    summary_lines,
    write_before_after,
    write_stacked_before_after,
)

if TYPE_CHECKING:
    from diffloop.distributed import Distributed
    from diffloop.prompts import PromptSource


def evaluation_inputs(
    prompts: Sequence[str], k: int, seed: int, fields: Sequence[dict[str, Any]] | None = None
) -> tuple[list[str], list[int], list[dict[str, Any]]]:
    """The P K evaluation images' prompts, seeds and metadata, prompt-major (image j of prompt i at
    i K + j): seed ``eval_image_seed(seed, i, j)``, metadata ``{**fields[i], "prompt_index": i,
    "image_index": j}`` (``fields``: each prompt's own fields, default none)."""
    p = len(prompts)
    fields = [{}] * p if fields is None else fields
    metadata = [
        {**fields[i], "prompt_index": i, "image_index": j} for i in range(p) for j in range(k)
    ]
    return loops.prompt_major(prompts, k), loops.eval_seeds(seed, p, k), metadata


def progress_bar(label: str, num_prompts: int, k: int, enabled: bool = True) -> loops.ProgressFn:
    """A bar over an evaluation's batches on stderr, saying what is evaluated ("evaluating base: 96
    prompts x 2 images"; before training it is the first long wait of a run), gone when done."""
    from tqdm.auto import tqdm

    what = f"evaluating {label}: {num_prompts} prompts x {k} image{'s' if k != 1 else ''}"
    return lambda batches, total: tqdm(
        batches, desc=what, total=total, leave=False, disable=not enabled
    )


def evaluation_reward(config: Config, training_reward: Callable[..., Any]) -> Callable[..., Any]:
    """eval.reward, else the training reward's declared counterpart (``evaluated_with``: the
    shapes default trains on the phrase mean, evaluates the product), else the reward itself."""
    e = config.eval
    if e.reward:
        return build_reward(e.reward, **e.reward_kwargs)
    counterpart = evaluated_with(config.reward.name)
    return build_reward(counterpart) if counterpart else training_reward


def gather_breakdown(
    breakdown: Mapping[str, BreakdownValues], n: int, dist: Distributed
) -> dict[str, BreakdownValues]:
    """Every process's breakdown of its ``n`` images, concatenated in rank order (the images'
    order), members explicit. A key that some process lacks has no members there."""
    keys = dict.fromkeys(k for part in dist.gather_objects(list(breakdown)) for k in part)
    out = {}
    for key in keys:
        part = breakdown.get(key)
        if part is None:
            values, members = torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool)
        else:
            values = part.values
            members = torch.ones(n, dtype=torch.bool) if part.members is None else part.members
        out[key] = BreakdownValues(
            dist.gather(values.to(dist.device)).cpu(),
            dist.gather(members.to(dist.device, torch.uint8)).cpu().bool(),
        )
    return out


class HeldOutEvaluation:
    """A run's held-out evaluation (config.eval): the fixed prompts of ``source``, scored by
    ``reward`` from fixed noise (eval.seed, the rule ``diffloop eval`` uses), sampled with
    ``sampler`` (``loops.evaluation_sampler``), each process scoring an equal share."""

    def __init__(
        self,
        config: Config,
        source: PromptSource,
        reward: Callable[..., Any],
        sampler: loops.SamplerSettings,
        dist: Distributed,
    ) -> None:
        self.config, self.source, self.reward, self.sampler, self.dist = (
            config, source, reward, sampler, dist,
        )  # fmt: skip
        self.indices = source.fixed_indices(config.eval.num_prompts)
        self.prompts = [source.prompts[i] for i in self.indices]  # P, the same every time
        self.reward_name = evaluation_reward_name(config.reward.name, config.eval.reward)
        self.eval_dir = Path(config.output_dir) / "eval"

    def header_lines(self, policy: DiffusionPolicy) -> list[str]:
        """What the run header says of the evaluation."""
        sampler = loops.describe_evaluation_sampler(self.config, policy)
        return [
            f"held-out evaluation reward:    {self.reward_name}",
            f"held-out evaluation sampler:   {sampler}",
        ]

    @torch.no_grad()
    def run(
        self,
        policy: DiffusionPolicy,
        tag: str,
        *,
        keep_figure: bool,
        progress: loops.ProgressFn | None = None,
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        """(eval_reward_mean, eval_reward_std, the reward's breakdown and eval_time_s; the grid
        written to eval/<tag>.png, on the main process, else None). ``keep_figure``: also write
        every image and score to eval/<tag>.npz (the base and the last evaluation: the
        before/after figure's rows are chosen once both are known)."""
        e, dist = self.config.eval, self.dist
        t0 = time.perf_counter()
        fields = [self.source.fields(i) for i in self.indices]
        prompts, seeds, metadata = evaluation_inputs(
            self.prompts, e.samples_per_prompt, e.seed, fields
        )
        # An equal share per process; when the images do not divide, the main process scores all.
        gathered = not len(prompts) % dist.world_size
        local = dist.local_slice(len(prompts))
        if not gathered:
            local = slice(0, len(prompts)) if dist.is_main else slice(0, 0)
        scores, images = loops.score_fixed_noise(
            policy, prompts[local], seeds[local], {"reward": self.reward}, self.sampler,
            e.batch_size, metadata=metadata[local], progress=progress,
        )  # fmt: skip
        local_scores = scores["reward"]
        rewards = dist.gather(local_scores) if gathered else local_scores
        breakdown = {}
        if len(images):
            breakdown = evaluation_breakdown(
                self.reward, images, prompts[local], metadata[local], local_scores
            )
        if gathered:
            breakdown = gather_breakdown(breakdown, len(images), dist)
        out = {
            **loops.eval_summary(rewards),
            **breakdown_means(breakdown),
            "eval_time_s": time.perf_counter() - t0,
        }
        if keep_figure:
            kept = figure_images(images)  # uint8, longest side <= FIGURE_SIDE
            kept = dist.gather(kept) if gathered else kept  # every process, in prompt order
            if dist.is_main and len(kept):
                save_eval_images(self.eval_dir / f"{tag}.npz", kept, rewards, self.prompts)
        return out, self._write_grid(images, tag) if dist.is_main and len(images) else None

    def _write_grid(self, images: torch.Tensor, tag: str) -> np.ndarray:
        """eval/<tag>.png: K images per prompt, up to 4 prompts a row; tiny images upscaled."""
        from diffloop.images import save_grid

        e = self.config.eval
        return save_grid(
            images,
            self.eval_dir / f"{tag}.png",
            ncols=e.samples_per_prompt * max(1, min(4, e.num_prompts)),
            upscale=max(1, 128 // images.shape[-1]),
        )

    def summary(self, metrics: list[dict[str, Any]]) -> list[str]:
        """The end of a run (main process): the verdict (base -> trained held-out reward, and the
        reward's breakdown) from the evaluation rows of ``metrics``, and the labelled before/after
        figure eval/before_after.png it writes; [] unless the base and a later evaluation are
        there."""
        evals = [r for r in metrics if "eval_reward_mean" in r]
        if len(evals) < 2 or evals[0]["epoch"] != -1:
            return []
        e = self.config.eval
        label = summary_label(self.reward, self.reward_name)
        sections = summary_sections(self.reward, self.prompts, {*evals[0], *evals[-1]}, label)
        lines = summary_lines(
            evals[0], evals[-1], label, e.prompts, e.num_prompts, e.samples_per_prompt, sections
        )
        epochs = evals[-1]["epoch"] + 1
        before, after = self.eval_dir / "base", self.eval_dir / f"epoch_{epochs:04d}"
        out = self.eval_dir / "before_after.png"
        if before.with_suffix(".npz").is_file() and after.with_suffix(".npz").is_file():
            layout = write_before_after(
                before.with_suffix(".npz"), after.with_suffix(".npz"), out, e.samples_per_prompt,
                f"after {epochs} epoch{'s' * (epochs != 1)}", FIGURE_ROWS, self.reward_name,
            )  # fmt: skip
            lines.append(
                f"  {out}: before (left) | after (right), each image's {self.reward_name} "
                "score under it"
            )
            lines += [f"    {line}" for line in (layout.rows_sentence(), *layout.means_sentences())]
        elif before.with_suffix(".png").is_file() and after.with_suffix(".png").is_file():
            write_stacked_before_after(
                before.with_suffix(".png"), after.with_suffix(".png"), out, e.samples_per_prompt,
                e.num_prompts, f"after epoch {epochs}",
            )  # fmt: skip
        return lines
