"""The training loop: each epoch is sample -> score -> advantages -> optimise.

The algorithm (advantage and loss) is a row of ``diffloop.algorithms.ALGORITHMS``; processes are
handled by ``diffloop.distributed``; the model by a ``DiffusionPolicy``; the inner loops are
``diffloop.loops``. Randomness is a pure function of (seed, epoch, sample index or rank), one named
stream of ``diffloop.seeding`` per use: sample g of epoch e always gets the same noise,
whichever process draws it and whether or not the run was resumed in between.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffloop import checkpoint, export, loops, run_lock, seeding
from diffloop.algorithms import ALGORITHMS, make_stat_tracker
from diffloop.config import (
    Config,
    ConfigError,
    PerformanceConfig,
    TrainConfig,
    derived_arithmetic,
    resolve_cpu_threads,
    trained_steps,
)
from diffloop.config.validation import check_kl_form_supported
from diffloop.distributed import Distributed
from diffloop.ema import EMA, maybe_applied
from diffloop.guards import NonFiniteGuard, onpolicy_error_ok
from diffloop.monitors import image_statistics
from diffloop.policies.base import DiffusionPolicy, Trajectories, iter_chunks
from diffloop.policies.families import detect_family, load_policy
from diffloop.policies.loading import WEIGHT_DTYPES
from diffloop.preflight import check_before_loading
from diffloop.prompts import (
    PromptSource,
    eval_prompt_source,
    rows_to_source,
    training_prompt_source,
)
from diffloop.resume import check_resume
from diffloop.rewards import RewardScores, build_reward, register_reward, reward_name, score
from diffloop.rewards.composite import build_reward_from_config
from diffloop.rewards.registry import (
    PYTHON_REWARD_PREFIX,
    evaluated_with,
    evaluation_reward_name,
)
from diffloop.rewards.remote import check_servers
from diffloop.run_dir import RunDirectory, existing_run, remove_run
from diffloop.summary import (
    FIGURE_ROWS,
    figure_images,
    save_eval_images,
    summary_lines,
    write_before_after,
    write_stacked_before_after,
)

logger = logging.getLogger(__name__)

MAX_LABELLED_ROWS = FIGURE_ROWS  # prompts (rows) the labelled eval/before_after.png shows


def set_backend_flags(
    performance: PerformanceConfig, device: torch.device, cpu_threads: int | str | None = None
) -> int | None:
    """Process-wide backend settings: TF32 matmuls/convolutions on CUDA (``performance.allow_tf32``)
    and the number of CPU threads (``cpu_threads``: an int, "auto" = the available cores, see
    ``config.resolve_cpu_threads``, or None = unchanged). Set here, once, not by building a policy.
    Returns the thread count set (None: unchanged)."""
    threads = resolve_cpu_threads(cpu_threads)
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = performance.allow_tf32
        torch.backends.cudnn.allow_tf32 = performance.allow_tf32
    return threads


def check_timestep_window(policy, config: Config) -> None:
    """ConfigError unless ``train.timestep_window`` ends within the steps the policy stores (every
    DDIM step; a flow-matching model stores num_steps - 1: its last step is an ODE step)."""
    window = config.train.timestep_window  # the shapes model's default always fits
    if window is None:
        return
    stored = policy.stored_steps(config.sample.num_steps)
    if window[1] > stored:
        raise ConfigError(
            f"train.timestep_window={window}: this model stores {stored} steps per trajectory at "
            f"sample.num_steps={config.sample.num_steps}; set its stop to at most {stored}"
        )


def check_kl_form(policy, config: Config) -> None:
    """ConfigError unless the loaded model can compute train.kl_form (check-config checks it too
    when model.pretrained is local; a hub id's family is known once it loads)."""
    flow = loops.supports_kl_form(policy, "flow_grpo")
    check_kl_form_supported(config, flow, type(policy).__name__)


def _releases_run_lock_on_failure(init: Callable[..., None]) -> Callable[..., None]:
    """(Trainer.__init__) A set-up that fails releases the run directory's lock it took."""

    @functools.wraps(init)
    def wrapper(self: Trainer, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            self.close()
            raise

    return wrapper


def _holding_run_lock(train: Callable[..., Any]) -> Callable[..., Any]:
    """(Trainer.train) Holds the run directory's lock (again, for a second call) while training,
    and releases it when training ends, however it ends."""

    @functools.wraps(train)
    def wrapper(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        if self._run_lock_released:  # the same on every rank (a rank other than 0 holds none)
            self._hold_run_lock()
        try:
            return train(self, *args, **kwargs)
        finally:
            self.close()

    return wrapper


class Trainer:
    policy: DiffusionPolicy
    _run_lock: run_lock.RunLock | None = None  # the main process's hold on output_dir
    _run_lock_released = False  # by close(), on every rank

    @_releases_run_lock_on_failure
    def __init__(
        self,
        config: Config,
        dist: Distributed | None = None,
        argv: list[str] | None = None,
        *,
        reward: Callable[..., Any] | None = None,
        prompts: Iterable[str | dict[str, Any]] | None = None,
    ):
        """``reward``: a scoring function ``(images, prompts, metadata) -> scores`` used instead of
        config.reward; ``prompts``: strings, or dicts with the prompt under prompts.prompt_column
        and their other fields as metadata, used instead of config.prompts. The run's config.yaml
        then records ``reward.name=python:<function name>`` and ``prompts.source=list`` (the
        metadata is not in it): use config fields for a run to resume from the command line."""
        config, user_source = _with_python_arguments(config, reward, prompts)
        self.dist = dist or Distributed()
        self.dist.check_mixed_precision(config.train.mixed_precision)
        set_backend_flags(config.performance, self.dist.device, config.cpu_threads)
        # Exactly what check-config checks (config, prompt files, reward names), before a model
        # loads.
        check_before_loading(config, num_processes=self.dist.world_size)
        self.config = config
        self._hold_run_lock()  # before anything in output_dir is read: one process per run
        check_resume(config)  # a resume continues its run's own config (diffloop.resume)
        self.algorithm = ALGORITHMS[config.train.algorithm]
        # Cheap, likely-to-fail parts first: a bad prompt file or reward name fails before a model
        # loads.
        self.prompt_source = user_source or training_prompt_source(config.prompts)
        self.eval_source = eval_prompt_source(config)
        self.reward = build_reward_from_config(config.reward)
        check_servers(
            self.reward
        )  # a remote reward's server answers now, not after the first sampling
        self.eval_reward = self._evaluation_reward()
        self._reward_pool = ThreadPoolExecutor(1, "reward") if config.reward.asynchronous else None
        t = config.train
        self.sampler = loops.SamplerSettings.from_config(config.sample)
        self.loss_settings = loops.LossSettings(
            self.algorithm.loss_fn, t.clip_range, kl_coef=t.kl_coef, log_kl=t.log_kl_to_base,
            kl_form=t.kl_form,
        )  # fmt: skip
        # The LoRA initialisation draws from the global RNG: same seed, same start, on every
        # process.
        torch.manual_seed(seeding.lora_init_seed(config.seed))
        self.policy = load_policy(
            config.model,
            config.lora,
            device=self.dist.device,
            weight_dtype=WEIGHT_DTYPES[t.mixed_precision],
            logprob_reduction=t.logprob_reduction,
            gradient_checkpointing=t.gradient_checkpointing,
            performance=config.performance,
            sample=config.sample,
        )
        self.policy.check_sampling(config.sample.num_steps, config.sample.eta)
        check_timestep_window(self.policy, config)
        self.eval_sampler = loops.evaluation_sampler(config, self.policy)
        if self.eval_source is not None:
            loops.check_evaluation_sampler(self.policy, self.eval_sampler)
        check_kl_form(self.policy, config)
        self.arithmetic = derived_arithmetic(
            config,
            self.dist.world_size,
            stored_steps=self.policy.stored_steps(config.sample.num_steps),
            evaluations_per_step=self.policy.evaluations_per_step(config.sample.guidance_scale),
            denoiser="UNet" if self.policy.lora_component == "unet" else "transformer",
        )
        self.params = self.policy.trainable_parameters()
        export.check_exportable(self.policy, config.lora.enabled)  # now, not after training
        self.optimizer = build_optimizer(self.params, t, self.dist.device)
        self.ema = self._new_ema()
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            t.lr_scheduler,
            self.optimizer,
            num_warmup_steps=t.lr_warmup_steps,
            num_training_steps=config.num_epochs * self.arithmetic.gradient_updates_per_epoch,
        )
        self.grad_scaler = torch.amp.GradScaler(
            self.dist.device.type, enabled=t.mixed_precision == "fp16"
        )
        self.stat_tracker = make_stat_tracker(self.algorithm, t)
        self.nonfinite = NonFiniteGuard(t.max_consecutive_nonfinite)
        self.start_epoch = 0
        self.optimizer_steps = 0
        if config.resume:
            self._resume()
        else:
            self._refuse_to_clobber()
        self.run = RunDirectory(
            config, is_main=self.dist.is_main, start_epoch=self.start_epoch, argv=argv
        )

    # ------------------------------------------------------------------ main loop

    @_holding_run_lock
    def train(self) -> list[dict[str, Any]]:
        cfg = self.config
        self._print_header()
        history = []
        if self.eval_source is not None and self.start_epoch == 0:
            self.run.log({"epoch": -1, **self.evaluate(tag="base", step=0)})
        for epoch in range(self.start_epoch, cfg.num_epochs):
            metrics = self.run_epoch(epoch)
            last = epoch + 1 == cfg.num_epochs
            every = cfg.eval.every_n_epochs
            if self.eval_source is not None and (last or (every and (epoch + 1) % every == 0)):
                metrics.update(self.evaluate(tag=f"epoch_{epoch + 1:04d}", step=epoch + 1))
            self.run.log(metrics)
            history.append(metrics)
            self._print_epoch(metrics)
            if last or (epoch + 1) % cfg.checkpoint_every == 0:
                self.save_checkpoint(epoch + 1)
        self._print_summary()  # writes eval/before_after.png, which the model card shows
        self.export()
        self.run.close()
        self.push_to_hub()  # last: a failed upload loses nothing
        return history

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, s = self.config, self.config.sample
        self._seed_globals(epoch)
        t0 = time.perf_counter()
        drawn = self.prompt_source.draw(
            s.prompts_per_epoch, cfg.seed, epoch
        )  # (B,) same on all ranks
        prompts = [self.prompt_source.prompts[i] for i in drawn]
        rows = [i for i in drawn for _ in range(s.samples_per_prompt)]  # (B*K,) prompt-major
        sample_prompts = [self.prompt_source.prompts[i] for i in rows]
        local = self.dist.local_slice(len(sample_prompts))
        seeds = [
            seeding.training_noise_seed(cfg.seed, epoch, g) for g in range(local.start, local.stop)
        ]
        # The row's own fields (a dataset's objects, categories, ...) and where the sample stands.
        metadata = [{**self.prompt_source.fields(rows[g]), "epoch": epoch, "sample_index": g}
                    for g in range(local.start, local.stop)]  # fmt: skip
        traj, scores, timing = self.sample_and_score(sample_prompts[local], seeds, metadata)
        t1 = time.perf_counter()
        rewards = self.dist.gather(scores.scores.float()).view(
            s.prompts_per_epoch, s.samples_per_prompt
        )  # (B, K)
        monitors = self._image_monitors(traj.images, local)
        advantages, adv_stats = self.algorithm.advantages_and_stats(
            rewards, prompts, cfg.train, self.stat_tracker
        )
        train_stats = self.optimise(traj, advantages.reshape(-1)[local].to(self.dist.device), epoch)
        if not onpolicy_error_ok(train_stats["onpolicy_logprob_err"], cfg.train.clip_range):
            # Sampling and training disagree by more than the clip range: PPO's clipping is then
            # noise.
            logger.warning(
                "on-policy |log p_theta - log p_old| = %.2e exceeds train.clip_range = "
                "%.1e: the sampler and "
                "the training forward pass disagree (precision, nondeterministic kernels?)",
                train_stats["onpolicy_logprob_err"],
                cfg.train.clip_range,
            )
        t2 = time.perf_counter()
        return {
            "epoch": epoch,
            **reward_statistics(rewards, advantages),
            **adv_stats,  # advantage_clipped_frac
            **self._component_means(scores),
            **monitors,
            "reward_invalid": int(self.dist.sum_scalar(scores.num_invalid)),
            "prompts_seen": (epoch + 1) * s.prompts_per_epoch,
            "reward_queries": (epoch + 1) * len(sample_prompts),
            "optimizer_steps": self.optimizer_steps,
            "nonfinite_steps_skipped": self.nonfinite.take_epoch_count(),
            "lr": self.lr_scheduler.get_last_lr()[0],
            **train_stats,
            "sample_time_s": timing["sample"],
            "reward_time_s": timing["reward"],
            "train_time_s": t2 - t1,
            "epoch_time_s": t2 - t0,
        }

    def _evaluation_reward(self):
        """eval.reward, else the training reward's declared counterpart (``evaluated_with``: the
        shapes default trains on the phrase mean, evaluates the product), else the reward itself."""
        e = self.config.eval
        if e.reward:
            return build_reward(e.reward, **e.reward_kwargs)
        counterpart = evaluated_with(self.config.reward.name)
        return build_reward(counterpart) if counterpart else self.reward

    # ------------------------------------------------------------------ phases

    def sample_and_score(
        self, prompts: list[str], seeds: list[int], metadata: list[dict]
    ) -> tuple[Trajectories, RewardScores, dict[str, float]]:
        """Sample this process's trajectories in batches and score them.

        With ``reward.asynchronous`` each batch is scored on a background thread while the next one
        is sampled (rewards on another device or a remote server then cost no wall-clock time).
        Reward time is the time spent waiting for rewards after sampling ends, plus synchronous
        scoring.
        """
        parts, pending, reward_wait = [], [], 0.0
        t0 = time.perf_counter()
        batches = loops.sample_batches(
            self.policy, prompts, seeds, self.sampler, self.config.sample.batch_size
        )
        for chunk, traj in self._progress(batches, "sampling"):
            parts.append(traj)
            job = (self.reward, traj.images, prompts[chunk], metadata[chunk])
            if self._reward_pool is not None:
                pending.append(self._reward_pool.submit(score, *job))
            else:
                t = time.perf_counter()
                pending.append(score(*job))
                reward_wait += time.perf_counter() - t
        t1 = time.perf_counter()
        results = [p.result() if self._reward_pool is not None else p for p in pending]
        t2 = time.perf_counter()
        timing = {"sample": t1 - t0 - reward_wait, "reward": reward_wait + (t2 - t1)}
        return Trajectories.cat(parts), concat_scores(results), timing

    def _image_monitors(self, images: torch.Tensor, local: slice) -> dict[str, float]:
        """Over-optimisation monitors (brightness, saturation, diversity within a prompt's
        group)."""
        k = self.config.sample.samples_per_prompt
        aligned = local.start % k == 0 and (local.stop - local.start) % k == 0
        stats = image_statistics(images, group_size=k if aligned else 1)
        if (
            self.dist.world_size > 1
            and "monitor_group_diversity" in stats
            and not self.dist.all_true(aligned)
        ):
            del stats["monitor_group_diversity"]
        return {key: self.dist.mean_scalar(value) for key, value in stats.items()}

    def _component_means(self, scores: RewardScores) -> dict[str, float]:
        """reward_<component>_mean over all processes, for composite rewards."""
        out = {}
        for name, values in (getattr(scores, "components", None) or {}).items():
            gathered = self.dist.gather(values.float())
            out[f"reward_{name}_mean"] = float(torch.nanmean(gathered))
        return out

    def optimise(
        self, traj: Trajectories, advantages: torch.Tensor, epoch: int
    ) -> dict[str, float]:
        """``num_inner_epochs`` passes of minibatch updates over this process's trajectories.

        advantages: (n,), NaN for samples whose reward failed: those get advantage 0, hence no
        gradient. Each backward is scaled by 1 / (trained timesteps x minibatches per step) so one
        optimizer step sees the mean loss over its (trajectory, timestep) pairs.
        """
        cfg, t = self.config, self.config.train
        n, num_steps = traj.timesteps.shape
        window, steps_trained = trained_steps(cfg, num_steps)
        minibatches = n // t.batch_size
        accumulate = (
            minibatches if self.algorithm.one_update_per_batch else t.gradient_accumulation_steps
        )
        advantages = torch.nan_to_num(advantages, nan=0.0)
        gen = torch.Generator().manual_seed(seeding.timestep_seed(cfg.seed, epoch, self.dist.rank))
        stats = StatAccumulator()
        on_policy = True  # until the first optimizer step of this epoch, ratios must be exactly 1
        backward = lambda loss: self.grad_scaler.scale(loss).backward()
        for _ in range(t.num_inner_epochs):
            order = torch.randperm(n, generator=gen)
            step_order = loops.choose_timesteps(n, window, steps_trained, gen)  # (n, S)
            for b, chunk in enumerate(
                self._progress(list(iter_chunks(n, t.batch_size)), "training")
            ):
                idx = order[chunk].to(self.dist.device)
                steps = step_order[order[chunk]].to(self.dist.device)  # (M, S)
                for step_stats in loops.minibatch_backward(
                    self.policy,
                    traj.index(idx),
                    advantages[idx],
                    steps,
                    self.sampler,
                    self.loss_settings,
                    scale=steps_trained * accumulate,
                    on_policy=on_policy,
                    backward=backward,
                ):
                    stats.add(step_stats)
                if (b + 1) % accumulate == 0:
                    stats.add({"grad_norm": self._optimizer_step()})
                    on_policy = False
        reduce = {"onpolicy_logprob_err": self.dist.max_scalar}
        return {k: reduce.get(k, self.dist.mean_scalar)(v) for k, v in stats.result().items()}

    def _optimizer_step(self) -> torch.Tensor:
        # All-reduce first: every process then clips and steps on the same averaged gradient.
        self.dist.average_gradients(self.params)
        self.grad_scaler.unscale_(self.optimizer)
        max_norm = self.config.train.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not self.nonfinite.should_step(grad_norm, self.grad_scaler):  # NaN/inf: no update at all
            self.grad_scaler.update()  # fp16: lowers the loss scale; a no-op otherwise
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm.detach()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.update(self.optimizer_steps)  # n = the steps taken, this one included
        return grad_norm.detach()

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, tag: str, step: int = 0) -> dict[str, Any]:
        """Held-out reward on fixed prompts and fixed noise (``loops.eval_seeds``, the rule
        ``diffloop eval`` uses), sampled with the evaluation sampler (``loops.evaluation_sampler``:
        the default of ``diffloop eval RUN`` too), of the EMA weights when train.ema_decay is set;
        writes an image grid ``eval/<tag>.png``."""
        with maybe_applied(self.ema):
            return self._evaluate(tag, step)

    def _evaluate(self, tag: str, step: int) -> dict[str, Any]:
        e = self.config.eval
        t0 = time.perf_counter()
        k = e.samples_per_prompt
        fixed = self.eval_source.fixed_indices(e.num_prompts)
        prompts = [self.eval_source.prompts[i] for i in fixed for _ in range(k)]
        seeds = loops.eval_seeds(e.seed, len(fixed), k)
        metadata = [{**self.eval_source.fields(fixed[g // k]), "prompt_index": g // k,
                     "image_index": g % k}
                    for g in range(len(prompts))]  # fmt: skip
        local = self.dist.local_slice(len(prompts))
        if len(prompts) % self.dist.world_size:
            local = slice(0, len(prompts)) if self.dist.is_main else slice(0, 0)
        scores, images = loops.score_fixed_noise(
            self.policy,
            prompts[local],
            seeds[local],
            {"reward": self.eval_reward},
            self.eval_sampler,
            e.batch_size,
            metadata=metadata[local],
            progress=self._eval_progress(tag, len(fixed), k),
        )
        local_rewards = scores["reward"]
        gathered = not len(prompts) % self.dist.world_size
        all_rewards = self.dist.gather(local_rewards) if gathered else local_rewards
        breakdown = self._eval_breakdown(images, prompts, local, all_rewards, gathered)
        out = {
            **loops.eval_summary(all_rewards),
            **breakdown,
            "eval_time_s": time.perf_counter() - t0,
        }
        if tag == "base" or step == self.config.num_epochs:
            # every image and score: the figure's rows are chosen once base and final are both known
            kept = figure_images(images)  # uint8, longest side <= FIGURE_SIDE
            kept = self.dist.gather(kept) if gathered else kept  # every process, in prompt order
            if self.dist.is_main and len(kept):
                save_eval_images(Path(self.config.output_dir) / "eval" / f"{tag}.npz", kept,
                                 all_rewards,
                                 [self.eval_source.prompts[i] for i in fixed])  # fmt: skip
        if self.dist.is_main and len(images):
            from diffloop.images import save_grid

            grid = save_grid(
                images,
                Path(self.config.output_dir) / "eval" / f"{tag}.png",
                ncols=e.samples_per_prompt * max(1, min(4, e.num_prompts)),
                upscale=max(1, 128 // images.shape[-1]),
            )  # tiny images stay viewable
            self.run.log_image("eval/images", grid, step=step)
        return out

    def _eval_breakdown(
        self,
        images: torch.Tensor,
        prompts: list[str],
        local: slice,
        rewards: torch.Tensor,
        gathered: bool,
    ) -> dict[str, float]:
        """For a reward that scores attributes (the shapes world's): binding per attribute and seen
        vs unseen combinations (``diffloop.shapes.reward.eval_breakdown``); {} for other rewards."""
        attribute_scores = getattr(self.eval_reward, "attribute_scores", None)
        if attribute_scores is None:
            return {}
        from diffloop.shapes.reward import eval_breakdown

        attributes = attribute_scores(images, prompts[local])
        if gathered:
            attributes = {
                name: self.dist.gather(v.to(self.dist.device)).cpu()
                for name, v in attributes.items()
            }
        return eval_breakdown(rewards, attributes, prompts if gathered else prompts[local])

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, epochs_completed: int) -> None:
        state = checkpoint.TrainingState(
            epochs_completed=epochs_completed,
            optimizer_steps=self.optimizer_steps,
            stat_tracker=self.stat_tracker.state_dict() if self.stat_tracker is not None else None,
        )
        out, is_main = self.config.output_dir, self.dist.is_main
        tmp = checkpoint.tmp_dir_for(out, epochs_completed)
        trainable = self.policy.trainable_state_dict() if is_main else {}
        ema = self.ema.state_dict() if self.ema is not None and is_main else None
        needed = checkpoint.needed_bytes(out, trainable, ema, self.optimizer.state_dict())
        # A failed or interrupted save removes its temporary directory; a full disk is one line.
        with checkpoint.writing(out, epochs_completed, needed, is_main=is_main):
            if is_main:
                checkpoint.begin(out, epochs_completed)
            self.dist.wait()
            checkpoint.write_rank_rng(tmp, self.dist.rank)
            self.dist.wait()
            if is_main:
                checkpoint.write_main(
                    tmp,
                    trainable=trainable,
                    optimizer=self.optimizer,
                    lr_scheduler=self.lr_scheduler,
                    grad_scaler=self.grad_scaler,
                    state=state,
                    ema=ema,
                )
                checkpoint.commit(out, tmp, epochs_completed, self.config.keep_checkpoints)
        self.dist.wait()

    def _hold_run_lock(self) -> None:
        """The main process locks output_dir (diffloop.run_lock; re-entrant, so under
        ``diffloop train``, which locked it first, this only counts); the other ranks take no lock
        but learn when it was refused, so a refused launch ends on every rank with the same line."""
        refused, self._run_lock_released = None, False
        if self.dist.is_main:
            try:
                self._run_lock = run_lock.acquire(self.config.output_dir)
                weakref.finalize(self, self._run_lock.release)  # a Trainer never trained
            except run_lock.RunLockedError as e:
                refused = str(e)
        refused = self.dist.broadcast_object(refused)
        if refused is not None:
            raise run_lock.RunLockedError(refused)

    def close(self) -> None:
        """Release the run directory's lock (``train`` does when it ends); again: nothing."""
        self._run_lock_released = True
        if self._run_lock is not None:
            self._run_lock.release()

    def _resume(self) -> None:
        # The newest checkpoint that verifies (checksums, finite tensors); older ones are fallbacks.
        found = checkpoint.load_newest_valid(self.config.output_dir, self.dist.rank)
        if found is None:
            logger.warning(
                "resume=true but no complete checkpoint in %s: starting from scratch",
                self.config.output_dir,
            )
            return
        path, parts = found
        self.policy.load_trainable_state_dict(parts["trainable"])
        self.optimizer.load_state_dict(parts["optimizer"])
        self.lr_scheduler.load_state_dict(parts["lr_scheduler"])
        self.grad_scaler.load_state_dict(parts["grad_scaler"])
        self._apply_optimizer_config()
        self._resume_ema(path, parts.get("ema"))
        if parts["rng"] is not None:
            checkpoint.set_rng_state(parts["rng"])
        state = parts["state"]
        if self.stat_tracker is not None and state.stat_tracker is not None:
            self.stat_tracker.load_state_dict(state.stat_tracker)
        self.start_epoch = state.epochs_completed
        self.optimizer_steps = state.optimizer_steps
        if self.dist.is_main:
            print(f"resumed from {path} ({self.start_epoch} epochs done)")

    def _resume_ema(self, path: Path, state: dict[str, torch.Tensor] | None) -> None:
        if self.ema is None:
            return
        if state is not None:
            self.ema.load_state_dict(state)
            return
        logger.warning(
            "train.ema_decay is set but %s holds no EMA: it restarts from the loaded weights", path
        )
        self.ema = self._new_ema()

    def _new_ema(self) -> EMA | None:
        """The EMA of the current trainable weights as train.ema_* say (None without ema_decay)."""
        t = self.config.train
        if t.ema_decay is None:
            return None
        return EMA(
            self.policy.named_trainable_parameters(),
            t.ema_decay,
            warmup=t.ema_warmup,
            update_interval=t.ema_update_interval,
        )

    def _apply_optimizer_config(self) -> None:
        """After loading their states, the optimizer and LR schedule follow the config again: a
        resume may change the rate (resume_allow) or the schedule's length (num_epochs). With
        nothing changed this sets the very values (and floats: LambdaLR's own formula) that were
        loaded."""
        t, sched = self.config.train, self.lr_scheduler
        sched.base_lrs = [t.learning_rate] * len(self.optimizer.param_groups)
        for group, lr_lambda in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group.update(
                initial_lr=t.learning_rate,
                lr=t.learning_rate * lr_lambda(sched.last_epoch),
                betas=(t.adam_beta1, t.adam_beta2),
                eps=t.adam_epsilon,
                weight_decay=t.weight_decay,
            )
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _refuse_to_clobber(self) -> None:
        existing = existing_run(self.config.output_dir)  # checkpoints, exports, metrics or config
        if existing and not self.config.overwrite:
            raise ConfigError(
                f"output_dir={self.config.output_dir} already holds a run ({', '.join(existing)}); "
                "pass resume=true to continue it, overwrite=true to start afresh "
                "there, or another output_dir"
            )
        self.dist.wait()  # every process has looked before the main one writes this run's record
        if existing and self.dist.is_main:
            remove_run(self.config.output_dir)
        self.dist.wait()

    def export(self) -> None:
        """The LoRA (or model) of ``diffloop.export.export_run``: weights, kohya copy, model card;
        the EMA weights when train.ema_decay is set. Then prints where it is, which file loads in
        which tool, and the Python that loads it (``export.export_summary_lines``)."""
        if self.dist.is_main:
            family = detect_family(self.config.model.pretrained, self.config.model.revision)
            with maybe_applied(self.ema):
                directory = export.export_run(self.policy, self.config, family)
            for line in export.export_summary_lines(self.config, family, directory):
                print(line)
        self.dist.wait()

    def push_to_hub(self) -> None:
        """hub.push: upload the exported directory with its card (main process; HubUploadError)."""
        hub = self.config.hub
        if hub.push and self.dist.is_main:
            url = export.push_to_hub(export.export_dir(self.config), hub)
            print(f"uploaded {export.export_dir(self.config)} to {url}")

    # ------------------------------------------------------------------ helpers

    def _seed_globals(self, epoch: int) -> None:
        """Global RNGs (LoRA dropout, anything a reward draws) reseeded per (seed, epoch, rank)."""
        seed = seeding.globals_seed(self.config.seed, epoch, self.dist.rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _progress(self, items, desc: str, total: int | None = None):
        """tqdm over ``items`` on stderr (main process, logging.progress_bars), gone when done."""
        enabled = self.config.logging.progress_bars and self.dist.is_main
        return tqdm(items, desc=desc, total=total, leave=False, disable=not enabled)

    def _eval_progress(self, tag: str, num_prompts: int, k: int) -> loops.ProgressFn:
        """The evaluation's bar over its batches, saying what is evaluated ("evaluating base: 96
        prompts x 2 images"): before training it is the first long wait of a run."""
        what = f"evaluating {tag}: {num_prompts} prompts x {k} image{'s' if k != 1 else ''}"
        return lambda batches, total: self._progress(batches, what, total=total)

    def _print_header(self) -> None:
        if not self.dist.is_main:
            return
        cfg = self.config
        print(
            f"diffloop: {self.algorithm.name} on {cfg.model.pretrained}, reward {cfg.reward.name}, "
            f"{self.dist.world_size} process(es) on {self.dist.device} "
            f"({torch.get_num_threads()} CPU thread(s), "
            f"cpu_threads={cfg.cpu_threads}), output {cfg.output_dir}"
        )
        for line in self.arithmetic.lines():
            print("  " + line)
        if self.eval_source is not None:
            name = evaluation_reward_name(cfg.reward.name, cfg.eval.reward)
            print(f"  held-out evaluation reward:    {name}")
            sampler = loops.describe_evaluation_sampler(cfg, self.policy)
            print(f"  held-out evaluation sampler:   {sampler}")

    def _print_summary(self) -> None:
        """The verdict (base -> trained held-out reward, and for the shapes world per attribute and
        seen / unseen combinations) and the labelled before/after image grid."""
        if not self.dist.is_main or self.eval_source is None:
            return
        from diffloop.run_dir import read_metrics

        evals = [r for r in read_metrics(self.run.metrics_path) if "eval_reward_mean" in r]
        if len(evals) < 2 or evals[0]["epoch"] != -1:
            return
        e = self.config.eval
        for line in summary_lines(
            evals[0],
            evals[-1],
            evaluation_reward_name(self.config.reward.name, self.config.eval.reward),
            e.prompts,
            e.num_prompts,
            e.samples_per_prompt,
            self.eval_source.iterate_fixed(e.num_prompts),
        ):
            print(line)  # fmt: skip
        eval_dir = Path(self.config.output_dir) / "eval"
        after = eval_dir / f"epoch_{evals[-1]['epoch'] + 1:04d}"
        if (eval_dir / "base.npz").is_file() and after.with_suffix(".npz").is_file():
            epochs = evals[-1]["epoch"] + 1
            reward = evaluation_reward_name(self.config.reward.name, self.config.eval.reward)
            layout = write_before_after(eval_dir / "base.npz", after.with_suffix(".npz"),
                                        eval_dir / "before_after.png",
                                        e.samples_per_prompt,
                                        f"after {epochs} epoch{'s' * (epochs != 1)}",
                                        MAX_LABELLED_ROWS, reward)  # fmt: skip
            print(f"  {eval_dir / 'before_after.png'}: before (left) | after (right), each "
                  f"image's {reward} "
                  "score under it")  # fmt: skip
            for line in (layout.rows_sentence(), *layout.means_sentences()):
                print(f"    {line}")
        elif (eval_dir / "base.png").is_file() and after.with_suffix(".png").is_file():
            write_stacked_before_after(eval_dir / "base.png", after.with_suffix(".png"),
                                       eval_dir / "before_after.png",
                                       e.samples_per_prompt, e.num_prompts,
                                       f"after epoch {evals[-1]['epoch'] + 1}")  # fmt: skip

    def _print_epoch(self, m: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        extra = f" eval {m['eval_reward_mean']:.4f}" if "eval_reward_mean" in m else ""
        print(
            f"epoch {m['epoch'] + 1}/{self.config.num_epochs}: reward {m['reward_mean']:.4f} "
            f"+- {m['reward_std']:.4f}{extra} kl {m.get('approx_kl', 0):.2e} clipfrac "
            f"{m.get('clipfrac', 0):.3f} "
            f"({m['sample_time_s']:.1f}s sample, {m['train_time_s']:.1f}s train)"
        )


def _with_python_arguments(
    config: Config, reward: Callable[..., Any] | None, prompts: Iterable[Any] | None
) -> tuple[Config, PromptSource | None]:
    """(config with reward/prompts standing for the Python objects, the prompts' source or None).

    The reward is registered as ``python:<its name>`` (replacing an earlier one of that name: a
    notebook cell run again); the prompt strings become prompts.source=list, so config.yaml shows
    what was trained on. The caller's config is not changed.
    """
    source = None
    if prompts is not None:
        source = rows_to_source("python", list(prompts), config.prompts.prompt_column)
        config = dataclasses.replace(
            config,
            prompts=dataclasses.replace(
                config.prompts, source="list", path=None, prompts=source.prompts
            ),
        )
    if reward is not None:
        if not callable(reward):
            raise TypeError(
                f"reward must be a callable (images, prompts, metadata) -> scores, got {reward!r}"
            )
        name = f"{PYTHON_REWARD_PREFIX}{reward_name(reward)}"
        register_reward(name, reward, replace=True)
        config = dataclasses.replace(
            config, reward=dataclasses.replace(config.reward, name=name, kwargs={}, components=None)
        )
    return config, source


def build_optimizer(
    params: list[torch.nn.Parameter], t: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (torch) or, with train.optimizer=adamw_8bit, bitsandbytes' AdamW8bit (validate() has
    checked that it is installed and that the run has CUDA and no LoRA)."""
    kwargs = {
        "lr": t.learning_rate,
        "betas": (t.adam_beta1, t.adam_beta2),
        "eps": t.adam_epsilon,
        "weight_decay": t.weight_decay,
    }
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if device.type != "cuda":
        raise ConfigError(
            f"train.optimizer=adamw_8bit needs a CUDA device, not {device}; use "
            "train.optimizer=adamw"
        )
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, **kwargs)


def concat_scores(results: list[RewardScores]) -> RewardScores:
    """Concatenate per-batch reward results (scores and any per-component scores)."""
    components = None
    if getattr(results[0], "components", None):
        components = {
            k: torch.cat([r.components[k] for r in results]) for k in results[0].components
        }
    out = RewardScores(torch.cat([r.scores for r in results]), sum(r.num_invalid for r in results))
    if components is not None:
        out.components = components
    return out


def reward_statistics(rewards: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """rewards, advantages (B, K), NaN = invalid. Includes the spread within groups (is there
    signal?)."""
    valid = rewards[~torch.isnan(rewards)]
    group_std = _nanstd(rewards, dim=1)  # (B,)
    out = {
        "reward_mean": float(valid.mean()) if valid.numel() else float("nan"),
        "reward_std": float(valid.std(unbiased=False)) if valid.numel() else float("nan"),
        "reward_group_std_mean": float(torch.nanmean(group_std)),
        "reward_zero_spread_groups": float((group_std == 0).float().mean()),
        "advantage_abs_mean": float(torch.nanmean(advantages.abs())),
    }
    return out


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    return torch.nanmean((x - mean) ** 2, dim=dim).sqrt()


class StatAccumulator:
    """Means of per-step statistics (``onpolicy_logprob_err`` is a max), summed as tensors on their
    device so the training loop never waits for the host; ``result`` converts once."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.onpolicy_err: torch.Tensor | None = None

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = torch.as_tensor(v, dtype=torch.float64)
            if k == "onpolicy_logprob_err":
                self.onpolicy_err = (
                    v if self.onpolicy_err is None else torch.maximum(self.onpolicy_err, v)
                )
                continue
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def result(self) -> dict[str, float]:
        out = {k: float(self.sums[k]) / self.counts[k] for k in self.sums}
        out["onpolicy_logprob_err"] = (
            float(self.onpolicy_err) if self.onpolicy_err is not None else 0.0
        )
        return out
