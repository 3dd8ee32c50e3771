"""The training loop: each epoch is sample -> score -> advantages -> optimise.

The algorithm (advantage and loss) is a row of ``diffloop.algorithms.ALGORITHMS``; processes are
handled by ``diffloop.distributed``; the model by a ``DiffusionPolicy``; the inner loops are
``diffloop.loops``; the optimizer step, its state and its resume ``diffloop.optimization``; the
held-out evaluation and the end-of-run summary ``diffloop.evaluation``. Randomness is a pure
function of (seed, epoch, sample index or rank), one named stream of ``diffloop.seeding`` per use:
sample g of epoch e always gets the same noise, whichever process draws it and whether or not the
run was resumed in between.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffloop import checkpoint, export, loops, run_lock, seeding
from diffloop.algorithms import ALGORITHMS, make_stat_tracker
from diffloop.config import Config, ConfigError, derived_arithmetic, trained_steps
from diffloop.distributed import Distributed
from diffloop.ema import EMA, maybe_applied
from diffloop.evaluation import HeldOutEvaluation, evaluation_reward, progress_bar
from diffloop.guards import onpolicy_error_ok
from diffloop.memory import memory_summary
from diffloop.monitors import image_statistics
from diffloop.optimization import Optimization
from diffloop.performance import set_backend_flags
from diffloop.policies import quantization
from diffloop.policies.base import DiffusionPolicy, Trajectories, iter_chunks
from diffloop.policies.embedding_cache import prepare_prompt_embeddings
from diffloop.policies.families import detect_family, load_policy
from diffloop.policies.loading import WEIGHT_DTYPES
from diffloop.preflight import check_before_loading
from diffloop.prompts import (
    PromptSource,
    eval_prompt_source,
    rows_to_source,
    training_prompt_source,
)
from diffloop.resume import check_resume, process_count_change
from diffloop.rewards import RewardScores, register_reward, reward_name
from diffloop.rewards.composite import build_reward_from_config
from diffloop.rewards.registry import PYTHON_REWARD_PREFIX
from diffloop.rewards.remote import check_servers
from diffloop.run_dir import RunDirectory, existing_run, read_metrics, remove_run

logger = logging.getLogger(__name__)


def load_training_policy(config: Config, device: torch.device) -> DiffusionPolicy:
    """The policy a run trains (and ``diffloop variance`` measures): config.model with
    config.lora, its LoRA initialised from ``seeding.lora_init_seed(config.seed)``, checked against
    the sampler (sample.*) and train.timestep_window."""
    # The LoRA initialisation draws from the global RNG: same seed, same start, on every process.
    torch.manual_seed(seeding.lora_init_seed(config.seed))
    t = config.train
    policy = load_policy(
        config.model,
        config.lora,
        device=device,
        weight_dtype=WEIGHT_DTYPES[t.mixed_precision],
        logprob_reduction=t.logprob_reduction,
        gradient_checkpointing=t.gradient_checkpointing,
        performance=config.performance,
        sample=config.sample,
    )
    policy.check_sampling(config.sample.num_steps, config.sample.eta)
    loops.check_timestep_window(policy, config)
    return policy


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
        self.dist = dist or Distributed(fsdp_enabled=config.fsdp.enabled)
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
        eval_source = eval_prompt_source(config)
        self.reward = build_reward_from_config(config.reward)
        # A remote reward's server answers now, not after the first sampling.
        check_servers(self.reward)
        eval_reward = evaluation_reward(config, self.reward)
        self._reward_pool = ThreadPoolExecutor(1, "reward") if config.reward.asynchronous else None
        t = config.train
        self.sampler = loops.SamplerSettings.from_config(config.sample)
        self.loss_settings = loops.LossSettings(
            self.algorithm.loss_fn, t.clip_range, kl_coef=t.kl_coef, log_kl=t.log_kl_to_base,
            kl_form=t.kl_form,
        )  # fmt: skip
        self.policy = load_training_policy(config, self.dist.device)
        self.eval_sampler = loops.evaluation_sampler(config, self.policy)
        self.held_out: HeldOutEvaluation | None = None  # without eval.prompts: no evaluation
        if eval_source is not None:
            loops.check_evaluation_sampler(self.policy, self.eval_sampler)
            self.held_out = HeldOutEvaluation(
                config, eval_source, eval_reward, self.eval_sampler, self.dist
            )
        loops.check_kl_form(self.policy, config)
        # prompts.precompute_embeddings / embedding_cache_dir: every prompt of the run encoded (or
        # read from disk) once now; precompute then frees the text encoders, before sharding.
        known = [*self.prompt_source.prompts, *(self.held_out.prompts if self.held_out else [])]
        line = prepare_prompt_embeddings(
            self.policy, config.prompts.precompute_embeddings, config.prompts.embedding_cache_dir,
            known, config.sample.negative_prompt,
        )  # fmt: skip
        if line is not None and self.dist.is_main:
            print(line)
        self.arithmetic = derived_arithmetic(
            config,
            self.dist.world_size,
            stored_steps=self.policy.stored_steps(config.sample.num_steps),
            evaluations_per_step=self.policy.evaluations_per_step(config.sample.guidance_scale),
            denoiser="UNet" if self.policy.lora_component == "unet" else "transformer",
        )
        export.check_exportable(self.policy, config.lora.enabled)  # now, not after training
        # fsdp.enabled: the denoiser sharded (FSDP2) before the optimizer sees its parameters.
        self.dist.shard_policy(self.policy, config.fsdp, t.mixed_precision)
        updates = config.num_epochs * self.arithmetic.gradient_updates_per_epoch
        self.optimization = Optimization(self.policy, t, updates, self.dist.device)
        self.params = self.optimization.params
        self.stat_tracker = make_stat_tracker(self.algorithm, t)
        self.start_epoch = 0
        if config.resume:
            self._resume()
        else:
            self._refuse_to_clobber()
        self.run = RunDirectory(
            config, is_main=self.dist.is_main, start_epoch=self.start_epoch, argv=argv
        )

    @property
    def ema(self) -> EMA | None:
        """The EMA of the trainable weights (train.ema_decay; None without), evaluated and
        exported in their place."""
        return self.optimization.ema

    @ema.setter
    def ema(self, ema: EMA | None) -> None:
        self.optimization.ema = ema

    @property
    def optimizer_steps(self) -> int:
        return self.optimization.steps

    # ------------------------------------------------------------------ main loop

    @_holding_run_lock
    def train(self) -> list[dict[str, Any]]:
        cfg = self.config
        self._print_header()
        history = []
        if self.held_out is not None and self.start_epoch == 0:
            self.run.log({"epoch": -1, **self.evaluate(tag="base", step=0)})
        for epoch in range(self.start_epoch, cfg.num_epochs):
            metrics = self.run_epoch(epoch)
            last = epoch + 1 == cfg.num_epochs
            every = cfg.eval.every_n_epochs
            if self.held_out is not None and (last or (every and (epoch + 1) % every == 0)):
                metrics.update(self.evaluate(tag=f"epoch_{epoch + 1:04d}", step=epoch + 1))
            self.run.log(metrics)
            history.append(metrics)
            self._print_epoch(metrics)
            if last or (epoch + 1) % cfg.checkpoint_every == 0:
                self.save_checkpoint(epoch + 1)
        if self.dist.is_main and self.held_out is not None:
            # the verdict, and eval/before_after.png, which the model card shows
            for line in self.held_out.summary(read_metrics(self.run.metrics_path)):
                print(line)
        self.export()
        self.run.close()
        self.push_to_hub()  # last: a failed upload loses nothing
        return history

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, s = self.config, self.config.sample
        self._seed_globals(epoch)
        t0 = time.perf_counter()
        drawn = self.prompt_source.draw(s.prompts_per_epoch, cfg.seed, epoch)  # (B,) every rank
        prompts = [self.prompt_source.prompts[i] for i in drawn]
        rows = loops.prompt_major(drawn, s.samples_per_prompt)  # (B*K,)
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
        rewards = self.dist.gather(scores.scores.float())
        rewards = rewards.view(s.prompts_per_epoch, s.samples_per_prompt)  # (B, K)
        monitors = self._image_monitors(traj.images, local)
        advantages, adv_stats = self.algorithm.advantages_and_stats(
            rewards, prompts, cfg.train, self.stat_tracker
        )
        train_stats = self.optimise(traj, advantages.reshape(-1)[local].to(self.dist.device), epoch)
        if not onpolicy_error_ok(train_stats["onpolicy_logprob_err"], cfg.train.clip_range):
            # Sampling and training disagree by more than the clip range: PPO's clipping is then
            # noise.
            logger.warning(
                "on-policy |log p_theta - log p_old| = %.2e exceeds train.clip_range = %.1e: the "
                "sampler and the training forward pass disagree (precision, nondeterministic "
                "kernels?)", train_stats["onpolicy_logprob_err"], cfg.train.clip_range,
            )  # fmt: skip
        t2 = time.perf_counter()
        return {
            "epoch": epoch,
            **loops.reward_statistics(rewards, advantages),
            **adv_stats,  # advantage_clipped_frac
            **self._component_means(scores),
            **monitors,
            "reward_invalid": int(self.dist.sum_scalar(scores.num_invalid)),
            "prompts_seen": (epoch + 1) * s.prompts_per_epoch,
            "reward_queries": (epoch + 1) * len(sample_prompts),
            "optimizer_steps": self.optimizer_steps,
            "nonfinite_steps_skipped": self.optimization.nonfinite.take_epoch_count(),
            "lr": self.optimization.lr_scheduler.get_last_lr()[0],
            **train_stats,
            "sample_time_s": timing["sample"],
            "reward_time_s": timing["reward"],
            "train_time_s": t2 - t1,
            "epoch_time_s": t2 - t0,
        }

    # ------------------------------------------------------------------ phases

    def sample_and_score(
        self, prompts: list[str], seeds: list[int], metadata: list[dict]
    ) -> tuple[Trajectories, RewardScores, dict[str, float]]:
        """This process's trajectories, sampled in batches and scored (``loops.sample_and_score``:
        with reward.asynchronous each batch is scored while the next one is sampled)."""
        return loops.sample_and_score(
            self.policy, self.reward, prompts, seeds, metadata, self.sampler,
            self.config.sample.batch_size, pool=self._reward_pool,
            progress=lambda batches, total: self._progress(batches, "sampling", total),
        )  # fmt: skip

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
        stats = loops.StatAccumulator()
        on_policy = True  # until the first optimizer step of this epoch, ratios must be exactly 1
        for _ in range(t.num_inner_epochs):
            order = torch.randperm(n, generator=gen)
            step_order = loops.choose_timesteps(n, window, steps_trained, gen)  # (n, S)
            chunks = self._progress(list(iter_chunks(n, t.batch_size)), "training")
            for b, chunk in enumerate(chunks):
                ends_step = (b + 1) % accumulate == 0  # this minibatch's last backward reduces
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
                    backward=self.optimization.backward,
                    gradient_sync=self.dist.set_gradient_sync,
                    ends_step=ends_step,
                ):
                    stats.add(step_stats)
                if ends_step:
                    stats.add({"grad_norm": self._optimizer_step()})
                    on_policy = False
        reduce = {"onpolicy_logprob_err": self.dist.max_scalar}
        return {k: reduce.get(k, self.dist.mean_scalar)(v) for k, v in stats.result().items()}

    def _optimizer_step(self) -> torch.Tensor:
        """One optimizer step (``Optimization.step``); returns the gradient norm."""
        return self.optimization.step(self.dist)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, tag: str, step: int = 0) -> dict[str, Any]:
        """The held-out evaluation (``diffloop.evaluation``: fixed prompts and noise, the rule of
        ``diffloop eval``), of the EMA weights when train.ema_decay is set; writes eval/<tag>.png,
        and for the base and the last evaluation eval/<tag>.npz."""
        e = self.config.eval
        enabled = self.config.logging.progress_bars and self.dist.is_main
        progress = progress_bar(tag, e.num_prompts, e.samples_per_prompt, enabled)
        figure = tag == "base" or step == self.config.num_epochs
        with maybe_applied(self.ema):
            out, grid = self.held_out.run(self.policy, tag, keep_figure=figure, progress=progress)
        if grid is not None:
            self.run.log_image("eval/images", grid, step=step)
        return out

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, epochs_completed: int) -> None:
        state = checkpoint.TrainingState(
            epochs_completed=epochs_completed,
            optimizer_steps=self.optimizer_steps,
            stat_tracker=self.stat_tracker.state_dict() if self.stat_tracker is not None else None,
            processes=self.dist.world_size,
        )
        out, is_main = self.config.output_dir, self.dist.is_main
        if self.dist.sharded:  # every process writes its shards (diffloop.sharded_checkpoint)
            checkpoint.save_sharded(
                out, epochs_completed, self.config.keep_checkpoints,
                tensors=self._training_tensors(), lr_scheduler=self.optimization.lr_scheduler,
                grad_scaler=self.optimization.grad_scaler, state=state, dist=self.dist,
            )  # fmt: skip
            return
        tmp = checkpoint.tmp_dir_for(out, epochs_completed)
        trainable = self.policy.trainable_state_dict() if is_main else {}
        parts = self.optimization.checkpoint_parts(is_main)
        optimizer = parts["optimizer"].state_dict()
        needed = checkpoint.needed_bytes(out, trainable, parts["ema"], optimizer)
        # A failed or interrupted save removes its temporary directory; a full disk is one line.
        with checkpoint.writing(out, epochs_completed, needed, is_main=is_main):
            if is_main:
                checkpoint.begin(out, epochs_completed)
            self.dist.wait()
            checkpoint.write_rank_rng(tmp, self.dist.rank)
            self.dist.wait()
            if is_main:
                checkpoint.write_main(tmp, trainable=trainable, state=state, **parts)
                checkpoint.commit(out, tmp, epochs_completed, self.config.keep_checkpoints)
        self.dist.wait()

    def _training_tensors(self) -> Any:
        """What a checkpoint restores in place (``sharded_checkpoint.TrainingTensors``): the
        denoiser's trainable weights, the optimizer and the EMA shadow."""
        from diffloop.sharded_checkpoint import TrainingTensors

        ema = self.ema.shadow if self.ema is not None else None
        return TrainingTensors(self.policy.denoiser, self.optimization.optimizer, ema)

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
        # A sharded checkpoint (or any checkpoint into a sharded run) is read into the live
        # tensors in place, resharded over this run's processes.
        found = checkpoint.load_newest_valid(
            self.config.output_dir, self.dist.rank, self._training_tensors()
        )
        if found is None:
            logger.warning(
                "resume=true but no complete checkpoint in %s: starting from scratch",
                self.config.output_dir,
            )
            return
        path, parts = found
        state = parts["state"]
        if parts["trainable"] is not None:  # else restored in place
            self.policy.load_trainable_state_dict(parts["trainable"])
        self.optimization.load(parts, path, state.optimizer_steps)
        if parts["rng"] is not None:
            checkpoint.set_rng_state(parts["rng"])
        if self.stat_tracker is not None and state.stat_tracker is not None:
            self.stat_tracker.load_state_dict(state.stat_tracker)
        self.start_epoch = state.epochs_completed
        if self.dist.is_main:
            print(f"resumed from {path} ({self.start_epoch} epochs done)")
            change = process_count_change(self.config, state.processes, self.dist.world_size)
            if change is not None:
                logger.warning(change)

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
        weights = None
        if self.dist.sharded:  # every process gathers the whole weights; the main one writes them
            from diffloop.sharded_checkpoint import export_weights

            with maybe_applied(self.ema):
                weights = export_weights(self.policy, self.config.lora.enabled, self.dist.is_main)
        if self.dist.is_main:
            family = detect_family(self.config.model.pretrained, self.config.model.revision)
            with maybe_applied(self.ema if weights is None else None):
                directory = export.export_run(self.policy, self.config, family, weights)
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
        # The memory plan: arithmetic, before anything is measured.
        for line in memory_summary(cfg, self.dist.world_size) if cfg.logging.memory_plan else []:
            print("  " + line)
        quantized = cfg.model.quantization
        if quantization.enabled(quantized):
            print(f"  frozen base quantized:         {quantization.describe(quantized)}")
        for line in self.held_out.header_lines(self.policy) if self.held_out is not None else []:
            print("  " + line)

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
