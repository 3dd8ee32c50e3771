"""Every invariant of a config, checked before any model loads (:func:`validate`); each error
names the field and the fix."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Any, Literal

from diffloop.config.arithmetic import largest_divisor
from diffloop.config.schema import (
    PATH_SOURCES,
    QUANT_CUDA_ONLY,
    QUANT_PACKAGES,
    QUANT_TYPES,
    QUANT_UNSUPPORTED,
    TRACKERS,
    Config,
    ConfigError,
    HubConfig,
    LoggingConfig,
    Range,
    RewardConfig,
    SDXLConfig,
    field_types,
    is_dataclass_type,
    require,
)
from diffloop.errors import did_you_mean


def check_field_values(obj: Any, path: str = "") -> None:
    """Every field against its annotation: a numeric field is finite and in its :class:`Range`
    (``num(...)`` metadata), a ``Literal`` field is one of its choices (closest name suggested)."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value, where, tp = getattr(obj, f.name), f"{path}{f.name}", hints[f.name]
        if is_dataclass_type(tp):
            check_field_values(value, where + ".")
        elif typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            require(
                value in choices,
                f"{where}='{value}' must be one of {', '.join(choices)}; '{value}' is unknown."
                f"{did_you_mean(str(value), choices)}",
            )
        elif isinstance(value, str) and (words := _literal_words(tp)):  # int | Literal["auto"]
            require(
                value in words,
                f"{where}={value!r} must be a number {f.metadata['range'].describe()} "
                f"or one of {', '.join(words)}",
            )
        elif "range" in f.metadata:
            _check_number(
                value, f.metadata["range"], where, optional=type(None) in typing.get_args(tp)
            )


def _literal_words(tp: Any) -> tuple[str, ...]:
    """The words of the ``Literal[...]`` members of a union annotation
    (``int | Literal["auto"]``)."""
    return tuple(
        w
        for arg in typing.get_args(tp)
        if typing.get_origin(arg) is Literal
        for w in typing.get_args(arg)
    )


def _check_number(value: Any, rng: Range, where: str, optional: bool) -> None:
    if value is None and optional:
        return
    why = f": {rng.why}" if rng.why else ""
    require(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        f"{where}={value!r} must be a number {rng.describe()}",
    )
    require(
        math.isfinite(value),
        f"{where}={value} is not finite; it must be a number {rng.describe()}{why}",
    )
    require(rng.contains(value), f"{where}={value} must be {rng.describe()}{why}")


def check_output_dir(output_dir: str, name: str = "output_dir") -> None:
    """``output_dir`` (the setting ``name``) is a writable directory, or can be created: a probe
    directory is created and removed in it, or in its nearest existing parent (permissions,
    read-only mounts and /proc all count). Raises ConfigError."""
    p = Path(output_dir).expanduser().absolute()
    existing = next(a for a in (p, *p.parents) if a.exists())
    what = f"{name}={output_dir} cannot be {'written' if existing == p else 'created'}"
    require(existing.is_dir(), f"{what}: {existing} is a file; choose another {name}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".diffloop-write-probe-", dir=existing))
    except OSError as e:
        raise ConfigError(
            f"{what}: {existing} is not writable ({e.strerror}); choose another {name}"
        ) from None


def check_run_folders(config: Config) -> None:
    """Each folder a run writes inside ``output_dir`` is a directory or absent: a file of that name
    (e.g. ``output_dir/checkpoints``) would fail the run at its first save. Raises ConfigError."""
    export = "lora" if config.lora.enabled else "model"
    folders = {"checkpoints": "checkpoints", "eval": "evaluation images",
               "tensorboard": "TensorBoard logs", export: f"exported {export}"}  # fmt: skip
    root = Path(config.output_dir).expanduser()
    for name, what in folders.items():
        path = root / name
        require(
            not path.exists() or path.is_dir(),
            f"output_dir={config.output_dir}: {path} is a file, but the run writes its {what} in a "
            f"directory of that name; move or delete the file, or choose another output_dir",
        )


def check_kl_form_supported(config: Config, flow_matching: bool, model: str) -> None:
    """train.kl_form=flow_grpo divides by a flow step's std_t, which a DDIM step does not have:
    refuse it for a model that is not flow-matching (``model`` names it). Called once the family is
    known: by check-config for a local model, by the trainer for every loaded one."""
    require(
        config.train.kl_form != "flow_grpo" or flow_matching,
        "train.kl_form=flow_grpo is Flow-GRPO's KL for flow-matching models (SD3, "
        f"FLUX) and {model} "
        "is not one; use train.kl_form=gaussian",
    )


def validate(config: Config, num_processes: int = 1) -> None:
    """Check every invariant before any model loads. Raises ConfigError naming the field and fix."""
    from diffloop.algorithms import ALGORITHMS

    check_field_values(config)
    s, t = config.sample, config.train
    algo = ALGORITHMS[t.algorithm]
    w = (
        [s.sde_window[0], *s.sde_window]
        if s.sde_window and len(s.sde_window) == 2
        else s.sde_window
    )
    require(
        w is None
        or (len(w) == 3 and 0 <= w[0] <= w[1] and w[2] >= 1 and w[1] + w[2] <= s.num_steps - 1),
        f"sample.sde_window={s.sde_window} must be null, [start, length] or [first, last, length] "
        "(start drawn in [first, last]) with length >= 1 and start + length <= "
        f"sample.num_steps - 1 = {s.num_steps - 1} (the last step is an ODE step)",
    )  # fmt: skip
    cache_dir = config.prompts.embedding_cache_dir
    require(
        cache_dir is None or (cache_dir != "" and not Path(cache_dir).is_file()),
        f"prompts.embedding_cache_dir={cache_dir!r} must be a directory (created if missing), "
        "not a file or ''; give a folder, or null for no disk cache",
    )
    require(
        config.eval.reward is not None or not config.eval.reward_kwargs,
        f"eval.reward_kwargs={config.eval.reward_kwargs} without eval.reward: the "
        "evaluation uses the "
        "training reward (reward.kwargs); set eval.reward too, or drop eval.reward_kwargs",
    )
    tw = t.timestep_window
    require(
        tw is None or (len(tw) == 2 and 0 <= tw[0] < tw[1] <= s.num_steps),
        f"train.timestep_window={tw} must be null or [start, stop) with 0 <= start < stop <= "
        f"sample.num_steps = {s.num_steps}, e.g. [0, {max(1, s.num_steps // 2)}] for "
        "the first half",
    )
    require(
        tw is None or s.sde_window is None,
        f"train.timestep_window={tw} and sample.sde_window={s.sde_window}: a flow-matching model "
        "trains on the steps sample.sde_window makes stochastic; set train.timestep_window=null",
    )
    require(
        s.samples_per_prompt >= algo.min_samples_per_prompt,
        f"sample.samples_per_prompt={s.samples_per_prompt}: algorithm '{algo.name}' needs at least "
        f"{algo.min_samples_per_prompt} samples per prompt ({algo.why_min_samples}); set "
        f"sample.samples_per_prompt={max(4, algo.min_samples_per_prompt)}",
    )
    total = s.prompts_per_epoch * s.samples_per_prompt
    require(
        total >= 2,
        "sample.prompts_per_epoch * sample.samples_per_prompt = 1 sample per epoch: "
        "every baseline is "
        "then that sample's own reward and every advantage is 0; raise sample.prompts_per_epoch",
    )
    require(
        total % num_processes == 0,
        f"sample.prompts_per_epoch * sample.samples_per_prompt = {total} samples per "
        "epoch must divide "
        f"evenly over {num_processes} processes; change sample.prompts_per_epoch",
    )
    local = total // num_processes
    require(
        local % t.batch_size == 0,
        f"train.batch_size={t.batch_size} must divide the {local} samples each process "
        "holds per epoch; "
        f"try train.batch_size={largest_divisor(local, t.batch_size)}",
    )
    minibatches = local // t.batch_size
    if not algo.one_update_per_batch:
        require(
            minibatches % t.gradient_accumulation_steps == 0,
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} must "
            f"divide the {minibatches} "
            "minibatches per inner epoch (samples per process / train.batch_size) so "
            "no step is partial",
        )
    if algo.one_update_per_batch:
        require(
            t.num_inner_epochs == 1,
            f"train.num_inner_epochs={t.num_inner_epochs}: algorithm '{algo.name}' "
            "makes one gradient step "
            "per batch of samples (no importance ratio); set train.num_inner_epochs=1 "
            "or use loop/ppo",
        )
    require(
        not ((t.kl_coef > 0 or t.log_kl_to_base) and not config.lora.enabled),
        "train.kl_coef / train.log_kl_to_base need lora.enabled=true: the base model "
        "is the UNet with "
        "its LoRA adapter disabled",
    )
    require(
        t.ema_decay is not None or (not t.ema_warmup and t.ema_update_interval == 1),
        f"train.ema_warmup={str(t.ema_warmup).lower()} / train.ema_update_interval="
        f"{t.ema_update_interval} shape an EMA but train.ema_decay is null (no EMA); set "
        "train.ema_decay, or train.ema_warmup=false and train.ema_update_interval=1",
    )
    require(
        t.stat_tracking_min_count <= t.stat_tracking_buffer,
        f"train.stat_tracking_min_count={t.stat_tracking_min_count} must be <= "
        f"train.stat_tracking_buffer={t.stat_tracking_buffer}: a buffer never holds more rewards",
    )
    require(
        len(config.lora.target_modules) > 0, "lora.target_modules must name at least one module"
    )
    require(
        config.lora.dropout == 0 or algo.one_update_per_batch,
        f"lora.dropout={config.lora.dropout}: '{algo.name}' reuses samples through the "
        "importance ratio, and "
        "dropout in training but not in sampling makes it differ from 1 on-policy; set "
        "lora.dropout=0",
    )
    require(
        not (config.resume and config.overwrite),
        "resume=true and overwrite=true contradict; pick one",
    )
    require(
        bool(config.model.pretrained), "model.pretrained must name a hub id or a local directory"
    )
    _validate_sdxl(config.model.sdxl)
    require(bool(config.reward.name), "reward.name must name a registry reward or module:function")
    validate_reward_form(config.reward)
    require(bool(config.output_dir), "output_dir must name a directory")
    check_output_dir(config.output_dir)
    check_run_folders(config)
    _validate_performance(config)
    _validate_logging(config.logging)
    _validate_optimizer(config)
    _validate_quantization(config)
    _validate_fsdp(config, num_processes)
    _validate_hub(config.hub)
    p = config.prompts
    if p.source in PATH_SOURCES:
        require(
            p.path is not None,
            f"prompts.source={p.source} needs prompts.path=<{PATH_SOURCES[p.source]}>",
        )
    if p.source == "list":
        require(
            bool(p.prompts), "prompts.source=list needs prompts.prompts=[...] (at least one prompt)"
        )
    e = config.eval
    if e.prompts in PATH_SOURCES:
        require(
            e.path is not None,
            f"eval.prompts={e.prompts} needs eval.path=<{PATH_SOURCES[e.prompts]}>",
        )
    require(e.path is None or e.prompts in PATH_SOURCES,
           f"eval.path={e.path} is only read by eval.prompts={'/'.join(PATH_SOURCES)}, "
           f"not {e.prompts}")  # fmt: skip
    _validate_eval_sampler(config)


def _validate_logging(lg: LoggingConfig) -> None:
    choices = (*TRACKERS, "all", "none")
    for name in lg.report_to:
        require(
            name in choices,
            "logging.report_to: unknown tracker "
            f"'{name}'.{did_you_mean(name, choices)} Choose from "
            f"{', '.join(choices)}",
        )
    require(
        "none" not in lg.report_to or len(lg.report_to) == 1,
        f"logging.report_to={lg.report_to} lists 'none' with trackers; give the trackers or none",
    )
    for name, kwargs in lg.tracker_kwargs.items():
        require(name in TRACKERS and isinstance(kwargs, dict),
               f"logging.tracker_kwargs.{name} must be a mapping of keywords for one "
               "of the trackers "
               f"{', '.join(TRACKERS)}")  # fmt: skip


def validate_reward_form(r: RewardConfig) -> None:
    """multi takes components and no kwargs; any other name takes kwargs and no components."""
    if r.name == "multi":
        require(
            not r.kwargs,
            f"reward.name=multi takes its settings from reward.components, not reward.kwargs (got "
            f"{sorted(r.kwargs)}); put kwargs inside each component",
        )
    else:
        require(
            not r.components,
            f"reward.components is set but reward.name={r.name}; use reward.name=multi (or write "
            "reward: as a YAML list) to combine rewards",
        )


def _validate_performance(config: Config) -> None:
    perf = config.performance
    require(
        bool(perf.compile_backend), "performance.compile_backend must name a torch.compile backend"
    )
    if perf.merge_lora_for_sampling:
        require(
            config.lora.enabled,
            "performance.merge_lora_for_sampling=true needs lora.enabled=true (there "
            "is no adapter to merge)",
        )
        require(
            config.train.mixed_precision == "no",
            "performance.merge_lora_for_sampling=true with "
            f"train.mixed_precision={config.train.mixed_precision}: "
            "a LoRA update merged into fp16/bf16 weights is rounded away (W + dW == W "
            "for small dW), so the "
            "sampled policy would not be the trained one; set "
            "performance.merge_lora_for_sampling=false "
            "(torch.compile fuses the adapter matmuls instead) or train.mixed_precision=no",
        )


def _validate_optimizer(config: Config) -> None:
    """adamw_8bit only where bitsandbytes can run it and it saves memory (refused otherwise)."""
    if config.train.optimizer != "adamw_8bit":
        return
    import importlib.util

    require(
        not config.lora.enabled,
        "train.optimizer=adamw_8bit is for full fine-tuning (lora.enabled=false): "
        "bitsandbytes keeps "
        "tensors under 4096 elements (most LoRA matrices) in 32-bit, and a LoRA's Adam state is "
        "small anyway; use train.optimizer=adamw with LoRA",
    )
    require(
        importlib.util.find_spec("bitsandbytes") is not None,
        "train.optimizer=adamw_8bit needs bitsandbytes, which is not installed: "
        "pip install 'diffloop[bnb]' (or train.optimizer=adamw)",
    )
    import torch

    require(
        torch.cuda.is_available(),
        "train.optimizer=adamw_8bit needs a CUDA device (bitsandbytes' 8-bit "
        "optimizers have no CPU "
        "kernels) and none is available; use train.optimizer=adamw",
    )


def _validate_fsdp(config: Config, num_processes: int) -> None:
    """fsdp.enabled only with what composes with a sharded denoiser (docs/distributed.md)."""
    if not config.fsdp.enabled:
        return
    t, perf, e = config.train, config.performance, config.eval
    require(
        t.optimizer == "adamw",
        f"fsdp.enabled=true with train.optimizer={t.optimizer}: bitsandbytes' 8-bit AdamW cannot "
        "step sharded (DTensor) parameters; use train.optimizer=adamw (sharding already divides "
        "its states by the process count)",
    )
    require(
        t.mixed_precision != "fp16",
        "fsdp.enabled=true with train.mixed_precision=fp16: the fp16 loss scaler would check "
        "each process's gradient shard for overflow separately; use train.mixed_precision=bf16",
    )
    require(
        not perf.merge_lora_for_sampling,
        "fsdp.enabled=true with performance.merge_lora_for_sampling=true: each process holds "
        "only a shard of the weights to merge into; set performance.merge_lora_for_sampling=false",
    )
    require(
        perf.compile == "none",
        f"fsdp.enabled=true with performance.compile={perf.compile}: compiling a sharded "
        "denoiser is not supported; set performance.compile=none",
    )
    images = e.num_prompts * e.samples_per_prompt
    require(
        config.eval.prompts is None or images % num_processes == 0,
        f"fsdp.enabled=true: the {images} evaluation images (eval.num_prompts x "
        f"eval.samples_per_prompt) must divide evenly over the {num_processes} processes (every "
        "process runs the sharded model equally often); change eval.num_prompts",
    )


def _validate_quantization(config: Config) -> None:
    """model.quantization: nothing set without a backend; a known quant_type; LoRA on; no merged
    LoRA; no FSDP; the backend installed; a CUDA device for a CUDA-only backend; each component
    listed once (whether the model has them: ``policies.quantization.check_family_components``,
    once the family is known)."""
    import importlib.util

    q, field = config.model.quantization, "model.quantization"
    if q.backend == "none":
        require(
            q.quant_type is None and not q.components,
            f"{field}.quant_type / {field}.components are set but {field}.backend=none "
            f"quantizes nothing; set {field}.backend (torchao, bitsandbytes, quanto) or drop them",
        )
        return
    choices = QUANT_TYPES[q.backend]
    kind = q.quant_type or choices[0]
    require(
        q.quant_type is None or q.quant_type in choices,
        f"{field}.quant_type='{q.quant_type}' is not a {q.backend} type; use one of "
        f"{', '.join(choices)} (null: {choices[0]}).{did_you_mean(str(q.quant_type), choices)}",
    )
    why = QUANT_UNSUPPORTED.get((q.backend, kind))
    require(why is None, f"{field}.quant_type={kind} is not supported: {why}")
    require(
        config.lora.enabled,
        f"{field}.backend={q.backend} needs lora.enabled=true: a quantized base is frozen and "
        "only a LoRA adapter trains on it (full fine-tuning of quantized weights is not "
        f"supported); set lora.enabled=true or {field}.backend=none",
    )
    require(
        not config.performance.merge_lora_for_sampling,
        f"performance.merge_lora_for_sampling=true with {field}.backend={q.backend}: a LoRA "
        "update merged into quantized weights is rounded to the quantization grid, so the sampled "
        "policy would not be the trained one; set performance.merge_lora_for_sampling=false",
    )
    require(
        not config.fsdp.enabled,
        f"fsdp.enabled=true with {field}.backend={q.backend}: sharding quantized weights is not "
        f"supported; set {field}.backend=none (FSDP already divides the base's memory by the "
        "process count) or fsdp.enabled=false",
    )
    module, install = QUANT_PACKAGES[q.backend]
    try:
        installed = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing (optimum for optimum.quanto)
        installed = False
    require(
        installed,
        f"{field}.backend={q.backend} needs the {module} package, which is not installed: "
        f"{install} (or {field}.backend=none)",
    )
    if q.backend in QUANT_CUDA_ONLY:
        import torch

        require(
            torch.cuda.is_available(),
            f"{field}.backend={q.backend} needs a CUDA device ({q.backend} has no CPU kernels) "
            f"and none is available; use {field}.backend=torchao (int8_weight_only runs on CPU) "
            f"or {field}.backend=none",
        )
    require(
        len(set(q.components)) == len(q.components),
        f"{field}.components={q.components} names a component twice; list each once",
    )


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def _validate_hub(hub: HubConfig) -> None:
    if not hub.push:
        return
    require(
        hub.model_id is not None,
        "hub.push=true needs hub.model_id=<namespace/name>, the hub repository to upload to",
    )
    require(
        bool(_REPO_ID.match(hub.model_id))
        and ".." not in hub.model_id
        and "--" not in hub.model_id,
        f"hub.model_id={hub.model_id} must be a hub repository id namespace/name (letters, digits, "
        "'-', '_', '.'; no '--' or '..'), e.g. hub.model_id=my-user/shapes-loop-lora",
    )
    if hub.token_env is not None:
        require(
            bool(os.environ.get(hub.token_env)),
            f"hub.token_env={hub.token_env}: that environment variable is unset or "
            "empty; export it "
            "or set hub.token_env=null to use huggingface_hub's own login",
        )


def _validate_sdxl(x: SDXLConfig) -> None:
    # x.resolution (deprecated) was moved to model.resolution when the config was built, and the
    # policy checks that against the VAE it loads.
    for name in ("original_size", "crops_coords_top_left", "target_size"):
        value = getattr(x, name)
        require(
            value is None or (len(value) == 2 and min(value) >= 0),
            f"model.sdxl.{name}={value} must be two non-negative integers [height, "
            "width] (or [top, left])",
        )


def _validate_eval_sampler(config: Config) -> None:
    """A stochastic evaluation (eval.eta > 0) of a flow model runs the sde_window's steps as SDE
    steps, so the window must fit an explicit eval.num_steps as it fits sample.num_steps; eta 0
    (deterministic) has no window. The ranges are checked with every field; what depends on the
    model's convention (null fields) is checked when the model is loaded."""
    e, window = config.eval, config.sample.sde_window
    if window is None or e.num_steps is None or not e.eta:
        return
    _, last, length = [window[0], *window] if len(window) == 2 else window
    require(
        last + length <= e.num_steps - 1,
        f"eval.num_steps={e.num_steps} with eval.eta={e.eta}: sample.sde_window={window} must lie "
        f"in steps 0..{e.num_steps - 2} of the evaluation sampler (the last step is an ODE step); "
        f"raise eval.num_steps to at least {last + length + 1} or set eval.eta=0 (deterministic)",
    )
