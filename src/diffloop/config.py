"""Typed run configuration: dataclass defaults < YAML file < ``a.b=c`` overrides.

Every invariant is checked by :func:`validate` before any model loads; each error names the field and
the fix. ``derived_arithmetic`` gives the per-epoch numbers the run prints at start.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class _Yaml12BoolLoader(yaml.SafeLoader):
    """SafeLoader whose booleans are YAML 1.2's (true/false only): under YAML 1.1 rules
    ``train.mixed_precision=no`` would arrive as False. Bool fields still accept yes/no/on/off
    (:func:`_coerce` converts those strings)."""


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load_yaml(text: str) -> Any:
    """YAML with YAML 1.2 booleans (see :class:`_Yaml12BoolLoader`); used for configs and overrides."""
    return yaml.load(text, Loader=_Yaml12BoolLoader)  # a SafeLoader subclass: no arbitrary objects


@dataclass
class SDXLConfig:
    """SDXL-only settings (read by ``diffloop.policies.sdxl``; ignored for other families)."""

    resolution: int | None = None
    """Image side in pixels (a multiple of 8); null: the UNet's sample_size x 8 (1024 for base 1.0)."""
    original_size: list[int] | None = None
    """(height, width) micro-conditioning time id; null: (resolution, resolution), as diffusers."""
    crops_coords_top_left: list[int] = field(default_factory=lambda: [0, 0])
    """(top, left) crop time id; (0, 0) asks for uncropped-looking images (diffusers' default)."""
    target_size: list[int] | None = None
    """(height, width) time id; null: (resolution, resolution)."""
    vae: str | None = None
    """Replacement VAE (hub id or directory), e.g. madebyollin/sdxl-vae-fp16-fix, which decodes in fp16;
    null: the model's vae/ (decoded in fp32 when its config says force_upcast)."""


@dataclass
class FluxConfig:
    """FLUX.1-only settings (read by ``diffloop.policies.flux``; ignored for other families);
    the resolution is ``model.resolution`` (a multiple of 16 for FLUX: VAE factor 8 x 2x2 packing)."""

    max_sequence_length: int | None = None
    """T5 tokens of the prompt (FluxPipeline's max_sequence_length, at most 512); null: the T5
    tokenizer's model_max_length capped at 512 (512 for FLUX.1). Flow-GRPO uses 128."""


@dataclass
class ModelConfig:
    pretrained: str = "shapes"
    """Hub id (``stabilityai/stable-diffusion-2-base``) or local directory in diffusers layout; ``shapes``
    is the shapes-world model shipped inside the package."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    variant: str | None = None
    """Weight variant to load (``fp16``), as in diffusers' ``from_pretrained``."""
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """DDIMScheduler settings over the model's own scheduler config (``{set_alpha_to_one: false}``); a
    non-DDIM config is converted with set_alpha_to_one and clip_sample false (logged)."""
    sdxl: SDXLConfig = field(default_factory=SDXLConfig)
    """SDXL micro-conditioning, resolution and VAE (used when model.pretrained is an SDXL pipeline)."""
    resolution: int | None = None
    """Flow-matching models (SD3, FLUX): square image side in pixels (Flow-GRPO trains SD3.5 at 512);
    null = the transformer's sample_size x the VAE's downsampling factor (FLUX, whose transformer
    has none: the VAE's sample_size, 1024 for FLUX.1, FluxPipeline's default)."""
    flux: FluxConfig = field(default_factory=FluxConfig)
    """FLUX.1's T5 length (used when model.pretrained is a FluxPipeline)."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train a LoRA adapter on the UNet (false = full fine-tuning of the UNet, much more memory)."""
    rank: int = 4
    """LoRA rank r (DDPO uses 4)."""
    alpha: float = 4.0
    """LoRA alpha; the adapter's update is scaled by alpha / rank."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names to adapt (peft ``target_modules``)."""
    dropout: float = 0.0
    """LoRA dropout (0 keeps the on-policy ratio exactly 1)."""


@dataclass
class SampleConfig:
    num_steps: int = 50
    """DDIM steps per trajectory (T). Cost is linear in T for both sampling and training."""
    eta: float = 1.0
    """The sampler's stochasticity, in (0, 1]: DDIM's eta for DDIM models, the SDE noise level a
    for flow-matching models (Flow-GRPO: 0.7 sde, 0.8 cps). Must be > 0: a deterministic step has
    no log-probability."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale (1 = no guidance, half the UNet evaluations)."""
    negative_prompt: str = ""
    """Negative prompt used as the unconditional branch of CFG."""
    sde_type: str = "sde"
    """Flow-matching models: the stochastic step, "sde" (Flow-GRPO's) or "cps" (coefficients-
    preserving); see ``diffloop.core.flow``."""
    sde_window: list[int] | None = None
    """Flow-matching models: [start, length] makes the ``length`` consecutive steps from step
    ``start`` (0-based) stochastic and trained, the others ODE steps (Flow-GRPO-Fast, MixGRPO);
    null = every step but the last (an ODE step: it has no density)."""
    prompts_per_epoch: int = 8
    """B: distinct prompt draws per epoch (over all processes)."""
    samples_per_prompt: int = 4
    """K: trajectories per prompt (LOOP's group size; >= 2 for leave-one-out and GRPO)."""
    batch_size: int = 8
    """Trajectories sampled at once per process (a memory knob: each sample has its own noise
    stream, so results do not depend on it)."""


@dataclass
class TrainConfig:
    algorithm: str = "loop"
    """One of loop, ppo, grpo, reinforce, reinforce_loo (see diffloop.algorithms.ALGORITHMS)."""
    batch_size: int = 4
    """Trajectories per training minibatch per process."""
    gradient_accumulation_steps: int = 1
    """Minibatches accumulated into one optimizer step (each minibatch spans its trained timesteps)."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples (PPO-style reuse; must be 1 for reinforce*)."""
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon. 1e-4 matches logprob_reduction=mean (DDPO); with sum the analogue is
    D x 1e-4 for D latent elements per step (4x64x64 SD latents: ~1.6; docs/method.md)."""
    logprob_reduction: str = "mean"
    """How a step's Gaussian log-density is reduced over its D latent elements: mean (DDPO) or sum
    (exact). A sum log-ratio is D times the mean one: scale clip_range by D with it."""
    adv_clip_max: float | None = 5.0
    """Clip advantages to +-this (null disables)."""
    normalize_advantages: bool = False
    """Divide leave-one-out advantages by their group's reward std (docs/method.md: an option, off)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on (random subset per trajectory)."""
    mixed_precision: str = "no"
    """no (fp32), fp16 (with a grad scaler) or bf16. Trainable parameters always stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in backward: less memory, ~30% slower training."""
    lr_scheduler: str = "constant"
    """constant, constant_with_warmup, linear or cosine (diffusers.optimization.get_scheduler)."""
    lr_warmup_steps: int = 0
    stat_tracking_buffer: int = 32
    """ppo: per-prompt reward buffer length."""
    stat_tracking_min_count: int = 16
    """ppo: per-prompt samples needed before its own statistics replace the batch's."""
    grpo_eps: float = 1e-4
    """grpo: added to the group std."""
    kl_coef: float = 0.0
    """Weight of a KL(policy || base model) penalty per step (the base is the UNet with its LoRA adapter
    disabled: no second copy). Costs one extra forward per trained step. 0 disables."""
    log_kl_to_base: bool = False
    """Log ``kl_to_base`` each epoch even when kl_coef is 0 (one extra forward per trained step)."""


@dataclass
class RewardConfig:
    name: str = "shapes_binding"
    """Registry name (jpeg_compressibility, shapes_binding, ...) or ``package.module:function``.
    ``multi`` combines ``components``; writing ``reward:`` as a YAML list means the same."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the reward's constructor."""
    components: list[dict[str, Any]] | None = None
    """For name=multi: ``[{name, weight, kwargs, mean, std}, ...]``; the reward is the weighted sum
    of (score - mean) / std per component (mean 0 and std 1 unless given); each is logged."""
    asynchronous: bool = False
    """Score each sampling batch in a background thread while the next batch is sampled."""


@dataclass
class PromptConfig:
    source: str = "shapes/train"
    """Prompt source: a registry name (ddpo/simple_animals, shapes/train, ...), ``file`` or ``list``."""
    path: str | None = None
    """Text file, one prompt a line (source=file)."""
    prompts: list[str] | None = None
    """Inline prompts (source=list)."""


@dataclass
class EvalConfig:
    prompts: str | None = None
    """Held-out prompt source (registry name, e.g. shapes/val_pair); null disables evaluation."""
    num_prompts: int = 16
    """First N prompts of the source (in order, cycling), the same every evaluation."""
    samples_per_prompt: int = 2
    """Images per evaluation prompt; seeds are fixed so every evaluation sees the same noise."""
    every_n_epochs: int = 0
    """Evaluate every N epochs (0: only before training and after the last epoch)."""
    seed: int = 12345
    """Seed of the evaluation noise (independent of the training seed)."""
    batch_size: int = 16
    """Images generated at once per process during evaluation."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    """Also log to Weights & Biases (needs ``pip install wandb``)."""
    wandb_project: str = "diffloop"
    progress_bars: bool = True


COMPILE_TARGETS = ("none", "sampling", "training", "all")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("sdpa", "eager")


@dataclass
class PerformanceConfig:
    """Speed options (docs/performance.md lists them and how to measure each). None changes the algorithm: the
    on-policy ratio stays 1 within the tolerance the run logs as ``onpolicy_logprob_err``."""

    compile: str = "none"
    """torch.compile the UNet for: none, sampling (the no-grad loop), training (log-prob + backward),
    or all. Sampling and training then share one compiled module per mode."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead (CUDA graphs: fixed-shape sampling loop),
    max-autotune, max-autotune-no-cudagraphs."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager checks tracing without code generation)."""
    channels_last: bool = False
    """Store UNet weights/activations channels-last (NHWC): faster convolutions on tensor cores."""
    attention: str = "sdpa"
    """sdpa: torch's scaled_dot_product_attention (flash / memory-efficient kernels, diffusers'
    default); eager: explicit softmax(QK^T)V, for comparison."""
    merge_lora_for_sampling: bool = False
    """Fold the LoRA update into the base weights while sampling (no adapter matmuls), restoring the
    exact base weights afterwards. Needs train.mixed_precision=no: in fp16/bf16 weights a small
    update rounds away (W + dW == W), so the sampled policy would not be the trained one."""
    allow_tf32: bool = True
    """On Ampere+ GPUs run fp32 matmuls/convolutions in TF32 (as DDPO does). Both sampling and training
    use it, so the ratio stays 1; set false for bit-level fp32."""
    decode_batch_size: int = 8
    """Images the VAE decodes at once (a memory knob for the low-memory setting)."""


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/default"
    num_epochs: int = 100
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir."""
    overwrite: bool = False
    """Start afresh in an output_dir that already holds checkpoints (they are deleted). Without it,
    such a directory is an error, so a finished run is never clobbered by accident."""
    checkpoint_every: int = 1
    """Save a checkpoint every N epochs (and always after the last)."""
    cpu_threads: int | None = None
    """torch CPU threads (null: torch's default). Small models on a shared or 2-core CPU run several
    times faster with 1: OpenMP threads spin-wait when the cores are busy."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept; older ones are deleted after a new one is complete."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)


# ----------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of fields, got {value!r}")
        return _from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # CLI: comma-separated list
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown_key_error(cls: type, key: str, path: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = f"{path}." if path else ""
    return ConfigError(f"unknown config key '{where}{key}'.{hint} Valid keys here: {', '.join(names)}")


def _from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if cls is Config and key == "reward" and isinstance(value, list):
            value = {"name": "multi", "components": value}  # `reward: [{name: ..., weight: ...}, ...]`
        if key not in types_:
            raise _unknown_key_error(cls, key, path)
        kwargs[key] = _coerce(value, types_[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.learning_rate=1e-4`` -> {"train": {"learning_rate": 1e-4}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    value = load_yaml(raw) if raw != "" else ""
    node: dict[str, Any] = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file at ``path`` < ``overrides``; validated before returning."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = load_yaml(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    for text in overrides or []:
        data = _merge(data, parse_override(text))
    config = _from_dict(Config, data)
    validate(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config, num_processes: int = 1) -> None:
    """Check every invariant before any model loads. Raises ConfigError naming the field and fix."""
    from diffloop.algorithms import ALGORITHMS

    s, t = config.sample, config.train
    _check(
        t.algorithm in ALGORITHMS,
        f"train.algorithm='{t.algorithm}' is unknown; choose one of {', '.join(ALGORITHMS)}",
    )
    algo = ALGORITHMS[t.algorithm]
    _check(s.num_steps >= 1, f"sample.num_steps={s.num_steps} must be >= 1")
    _check(
        s.eta > 0,
        f"sample.eta={s.eta} must be > 0: with eta=0 the DDIM step is deterministic and has no "
        "log-probability; use eta=1.0 (DDPO's default)",
    )
    _check(s.sde_type in ("sde", "cps"), f"sample.sde_type='{s.sde_type}' must be 'sde' or 'cps'")
    _check(
        s.sde_window is None or (len(s.sde_window) == 2 and s.sde_window[0] >= 0
                                 and s.sde_window[1] >= 1
                                 and sum(s.sde_window) <= s.num_steps - 1),
        f"sample.sde_window={s.sde_window} must be null or [start, length] with start >= 0, "
        f"length >= 1 and start + length <= sample.num_steps - 1 = {s.num_steps - 1} (the last "
        "step is an ODE step)",
    )  # fmt: skip
    _check(s.guidance_scale >= 1.0, f"sample.guidance_scale={s.guidance_scale} must be >= 1")
    _check(s.prompts_per_epoch >= 1, f"sample.prompts_per_epoch={s.prompts_per_epoch} must be >= 1")
    _check(s.samples_per_prompt >= 1, f"sample.samples_per_prompt={s.samples_per_prompt} must be >= 1")
    _check(
        s.samples_per_prompt >= algo.min_samples_per_prompt,
        f"sample.samples_per_prompt={s.samples_per_prompt}: algorithm '{algo.name}' needs at least "
        f"{algo.min_samples_per_prompt} samples per prompt ({algo.why_min_samples}); set "
        f"sample.samples_per_prompt={max(4, algo.min_samples_per_prompt)}",
    )
    _check(s.batch_size >= 1, f"sample.batch_size={s.batch_size} must be >= 1")
    total = s.prompts_per_epoch * s.samples_per_prompt
    _check(
        total % num_processes == 0,
        f"sample.prompts_per_epoch * sample.samples_per_prompt = {total} samples per epoch must divide "
        f"evenly over {num_processes} processes; change sample.prompts_per_epoch",
    )
    local = total // num_processes
    _check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
    _check(
        local % t.batch_size == 0,
        f"train.batch_size={t.batch_size} must divide the {local} samples each process holds per epoch; "
        f"try train.batch_size={_largest_divisor(local, t.batch_size)}",
    )
    minibatches = local // t.batch_size
    _check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1")
    if not algo.one_update_per_batch:
        _check(
            minibatches % t.gradient_accumulation_steps == 0,
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} must divide the {minibatches} "
            f"minibatches per inner epoch (samples per process / train.batch_size) so no step is partial",
        )
    _check(t.num_inner_epochs >= 1, f"train.num_inner_epochs={t.num_inner_epochs} must be >= 1")
    if algo.one_update_per_batch:
        _check(
            t.num_inner_epochs == 1,
            f"train.num_inner_epochs={t.num_inner_epochs}: algorithm '{algo.name}' makes one gradient step "
            "per batch of samples (no importance ratio); set train.num_inner_epochs=1 or use loop/ppo",
        )
    _check(
        0 < t.timestep_fraction <= 1,
        f"train.timestep_fraction={t.timestep_fraction} must be in (0, 1]",
    )
    _check(t.learning_rate > 0, f"train.learning_rate={t.learning_rate} must be > 0")
    _check(t.clip_range > 0, f"train.clip_range={t.clip_range} must be > 0")
    _check(
        t.logprob_reduction in ("mean", "sum"),
        f"train.logprob_reduction='{t.logprob_reduction}' must be 'mean' or 'sum'",
    )
    _check(
        t.mixed_precision in ("no", "fp16", "bf16"),
        f"train.mixed_precision='{t.mixed_precision}' must be one of no, fp16, bf16",
    )
    _check(t.max_grad_norm >= 0, f"train.max_grad_norm={t.max_grad_norm} must be >= 0 (0 disables)")
    _check(
        t.adv_clip_max is None or t.adv_clip_max > 0,
        f"train.adv_clip_max={t.adv_clip_max} must be > 0, or null to disable",
    )
    _check(
        t.lr_scheduler in ("constant", "constant_with_warmup", "linear", "cosine"),
        f"train.lr_scheduler='{t.lr_scheduler}' must be constant, constant_with_warmup, linear or cosine",
    )
    _check(t.kl_coef >= 0, f"train.kl_coef={t.kl_coef} must be >= 0")
    _check(
        not ((t.kl_coef > 0 or t.log_kl_to_base) and not config.lora.enabled),
        "train.kl_coef / train.log_kl_to_base need lora.enabled=true: the base model is the UNet with "
        "its LoRA adapter disabled",
    )
    _check(t.stat_tracking_buffer >= 1, "train.stat_tracking_buffer must be >= 1")
    _check(
        1 <= t.stat_tracking_min_count <= t.stat_tracking_buffer,
        f"train.stat_tracking_min_count={t.stat_tracking_min_count} must be in [1, "
        f"train.stat_tracking_buffer={t.stat_tracking_buffer}]",
    )
    _check(config.lora.rank >= 1, f"lora.rank={config.lora.rank} must be >= 1")
    _check(config.lora.alpha > 0, f"lora.alpha={config.lora.alpha} must be > 0")
    _check(len(config.lora.target_modules) > 0, "lora.target_modules must name at least one module")
    _check(0 <= config.lora.dropout < 1, "lora.dropout must be in [0, 1)")
    _check(
        config.lora.dropout == 0 or algo.one_update_per_batch,
        f"lora.dropout={config.lora.dropout}: '{algo.name}' reuses samples through the importance ratio, and "
        "dropout in training but not in sampling makes it differ from 1 on-policy; set lora.dropout=0",
    )
    _check(config.num_epochs >= 1, f"num_epochs={config.num_epochs} must be >= 1")
    _check(config.checkpoint_every >= 1, "checkpoint_every must be >= 1")
    _check(not (config.resume and config.overwrite), "resume=true and overwrite=true contradict; pick one")
    _check(config.cpu_threads is None or config.cpu_threads >= 1, "cpu_threads must be >= 1 or null")
    _check(config.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    _check(bool(config.model.pretrained), "model.pretrained must name a hub id or a local directory")
    _validate_sdxl(config.model.sdxl)
    _check(bool(config.reward.name), "reward.name must name a registry reward or module:function")
    e = config.eval
    _check(e.num_prompts >= 1, f"eval.num_prompts={e.num_prompts} must be >= 1")
    _check(e.samples_per_prompt >= 1, f"eval.samples_per_prompt={e.samples_per_prompt} must be >= 1")
    _check(e.every_n_epochs >= 0, f"eval.every_n_epochs={e.every_n_epochs} must be >= 0 (0: start and end)")
    _check(e.batch_size >= 1, f"eval.batch_size={e.batch_size} must be >= 1")
    _validate_performance(config)
    p = config.prompts
    if p.source == "file":
        _check(p.path is not None, "prompts.source=file needs prompts.path=<text file, one prompt a line>")
    if p.source == "list":
        _check(bool(p.prompts), "prompts.source=list needs prompts.prompts=[...] (at least one prompt)")


def _validate_performance(config: Config) -> None:
    perf = config.performance
    _check(
        perf.compile in COMPILE_TARGETS,
        f"performance.compile='{perf.compile}' must be one of {', '.join(COMPILE_TARGETS)}",
    )
    _check(
        perf.compile_mode in COMPILE_MODES,
        f"performance.compile_mode='{perf.compile_mode}' must be one of {', '.join(COMPILE_MODES)}",
    )
    _check(bool(perf.compile_backend), "performance.compile_backend must name a torch.compile backend")
    _check(
        perf.attention in ATTENTION_BACKENDS,
        f"performance.attention='{perf.attention}' must be one of {', '.join(ATTENTION_BACKENDS)}",
    )
    _check(perf.decode_batch_size >= 1, f"performance.decode_batch_size={perf.decode_batch_size} must be >= 1")
    if perf.merge_lora_for_sampling:
        _check(
            config.lora.enabled,
            "performance.merge_lora_for_sampling=true needs lora.enabled=true (there is no adapter to merge)",
        )
        _check(
            config.train.mixed_precision == "no",
            f"performance.merge_lora_for_sampling=true with train.mixed_precision={config.train.mixed_precision}: "
            "a LoRA update merged into fp16/bf16 weights is rounded away (W + dW == W for small dW), so the "
            "sampled policy would not be the trained one; set performance.merge_lora_for_sampling=false "
            "(torch.compile fuses the adapter matmuls instead) or train.mixed_precision=no",
        )


def _validate_sdxl(x: SDXLConfig) -> None:
    _check(
        x.resolution is None or (x.resolution >= 64 and x.resolution % 8 == 0),
        f"model.sdxl.resolution={x.resolution} must be a multiple of 8 (the VAE's factor), >= 64, or null",
    )
    for name in ("original_size", "crops_coords_top_left", "target_size"):
        value = getattr(x, name)
        _check(
            value is None or (len(value) == 2 and min(value) >= 0),
            f"model.sdxl.{name}={value} must be two non-negative integers [height, width] (or [top, left])",
        )


def _largest_divisor(n: int, at_most: int) -> int:
    for d in range(min(n, at_most), 0, -1):
        if n % d == 0:
            return d
    return 1


@dataclass(frozen=True)
class Arithmetic:
    """Per-epoch numbers derived from the config (printed at start; users rely on them)."""

    samples_per_epoch: int
    samples_per_process: int
    reward_queries_per_epoch: int
    trained_timesteps_per_sample: int
    minibatches_per_inner_epoch: int
    gradient_updates_per_epoch: int
    unet_evals_per_sample: int

    def lines(self) -> list[str]:
        return [
            f"samples per epoch:             {self.samples_per_epoch} "
            f"({self.samples_per_process} per process)",
            f"reward queries per epoch:      {self.reward_queries_per_epoch}",
            f"trained timesteps per sample:  {self.trained_timesteps_per_sample}",
            f"gradient updates per epoch:    {self.gradient_updates_per_epoch}",
            f"UNet evaluations per sample:   {self.unet_evals_per_sample} (sampling)",
        ]


def derived_arithmetic(config: Config, num_processes: int = 1) -> Arithmetic:
    from diffloop.algorithms import ALGORITHMS

    s, t = config.sample, config.train
    total = s.prompts_per_epoch * s.samples_per_prompt
    local = total // num_processes
    minibatches = local // t.batch_size
    if ALGORITHMS[t.algorithm].one_update_per_batch:
        updates = 1
    else:
        updates = t.num_inner_epochs * minibatches // t.gradient_accumulation_steps
    cfg_factor = 2 if s.guidance_scale > 1.0 else 1
    return Arithmetic(
        samples_per_epoch=total,
        samples_per_process=local,
        reward_queries_per_epoch=total,
        trained_timesteps_per_sample=num_trained_timesteps(s.num_steps, t.timestep_fraction),
        minibatches_per_inner_epoch=minibatches,
        gradient_updates_per_epoch=updates,
        unet_evals_per_sample=s.num_steps * cfg_factor,
    )


def num_trained_timesteps(num_steps: int, timestep_fraction: float) -> int:
    """Steps of each trajectory trained on: max(1, int(T * timestep_fraction)) (DDPO's rule)."""
    return max(1, int(num_steps * timestep_fraction))
