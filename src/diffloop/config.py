"""Typed run configuration: dataclass defaults < YAML file < ``a.b=c`` overrides.

The defaults are the shapes-world run, so ``Config()`` is exactly what ``diffloop train`` runs with no
arguments (LOOP, K = 8, on the packaged model; ``configs/shapes.yaml`` spells the same values out,
and a test keeps the two equal). A config for another model states what it needs over them.

Every invariant is checked by :func:`validate` before any model loads; each error names the field and
the fix. The checks of single fields come from the declarations, in one place
(:func:`check_field_values`): every numeric field is declared with ``num(default, gt/ge/lt/le)`` and
must be finite and inside its range; every enumerated field is a ``Literal[...]`` and must be one of
its values (the closest is suggested). Cross-field invariants follow in :func:`validate`.
Dict-valued fields (``reward.kwargs``) merge key by key across the file and each override.
``derived_arithmetic`` gives the per-epoch numbers the run prints at start; ``field_docs`` the
documentation of every key (``diffloop train --help``), read from the attribute docstrings below.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from diffloop.errors import DiffloopError, did_you_mean


class ConfigError(DiffloopError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


# ----------------------------------------------------------------------------- field ranges


@dataclass(frozen=True)
class Range:
    """The interval a numeric field's value must lie in; ``why`` is shown when it does not.

    ``low``/``high`` None mean unbounded; ``*_open`` excludes the bound. Every value must also be
    finite (no inf, no NaN), whatever the range.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def contains(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def describe(self) -> str:
        """``> 0``, ``>= 1``, ``<= 5`` or an interval ``in (0, 1]``."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low}, {self.high}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return "a finite number"


def num(
    default: float | None,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    why: str = "",
) -> Any:
    """A numeric dataclass field with its valid range, which :func:`validate` checks for every field."""
    if (gt is not None and ge is not None) or (lt is not None and le is not None):
        raise TypeError("give one lower bound (gt or ge) and one upper bound (lt or le)")
    low = gt if gt is not None else ge
    high = lt if lt is not None else le
    rng = Range(low, high, low_open=gt is not None, high_open=lt is not None, why=why)
    return field(default=default, metadata={"range": rng})


_MAX_SEED = 2**63 - 1  # torch.manual_seed takes up to 64 bits; numpy's SeedSequence any size
_NO_LOGPROB = "a deterministic step (eta=0) has no log-probability"


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


AlgorithmName = Literal["loop", "ppo", "grpo", "reinforce", "reinforce_loo"]
MixedPrecision = Literal["no", "fp16", "bf16"]
LogprobReduction = Literal["mean", "sum"]
SdeType = Literal["sde", "cps"]
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
CompileTarget = Literal["none", "sampling", "training", "all"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
AttentionBackend = Literal["sdpa", "eager"]
OptimizerName = Literal["adamw", "adamw_8bit"]

# Prompt sources read from a path (diffloop.prompts), and what the path must be.
PATH_SOURCES = {
    "file": "text file, one prompt a line",
    "jsonl": "JSON-lines file, one object with a prompt field a line",
    "csv": "CSV file with a header row and a prompt column",
    "dataset": "Hugging Face dataset: hub id or local directory",
}

# accelerate's trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS; tests/test_trackers.py checks),
# named here so the config is checked without importing accelerate.
TRACKERS = (
    "tensorboard",
    "wandb",
    "comet_ml",
    "aim",
    "mlflow",
    "clearml",
    "dvclive",
    "swanlab",
    "trackio",
)

COMPILE_TARGETS: tuple[str, ...] = typing.get_args(CompileTarget)
COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)
ATTENTION_BACKENDS: tuple[str, ...] = typing.get_args(AttentionBackend)


@dataclass
class SDXLConfig:
    """SDXL-only settings (read by ``diffloop.policies.sdxl``; ignored for other families)."""

    resolution: int | None = num(None, ge=64)
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

    max_sequence_length: int | None = num(None, ge=1, le=512)
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
    resolution: int | None = num(None, ge=8)
    """Flow-matching models (SD3, FLUX): square image side in pixels (Flow-GRPO trains SD3.5 at 512);
    null = the transformer's sample_size x the VAE's downsampling factor (FLUX, whose transformer
    has none: the VAE's sample_size, 1024 for FLUX.1, FluxPipeline's default)."""
    flux: FluxConfig = field(default_factory=FluxConfig)
    """FLUX.1's T5 length (used when model.pretrained is a FluxPipeline)."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train a LoRA adapter on the UNet (false = full fine-tuning of the UNet, much more memory)."""
    rank: int = num(8, ge=1)
    """LoRA rank r (DDPO uses 4 on Stable Diffusion)."""
    alpha: float = num(8.0, gt=0)
    """LoRA alpha; the adapter's update is scaled by alpha / rank."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names to adapt (peft ``target_modules``)."""
    dropout: float = num(0.0, ge=0, lt=1)
    """LoRA dropout (0 keeps the on-policy ratio exactly 1)."""


@dataclass
class SampleConfig:
    num_steps: int = num(10, ge=1)
    """DDIM steps per trajectory (T; Stable Diffusion runs use 50). Cost is linear in T for both
    sampling and training."""
    eta: float = num(
        1.0, gt=0, le=1,
        why=f"{_NO_LOGPROB}, and eta > 1 makes the DDIM variance's square root imaginary (NaN "
        "log-probabilities); use eta=1.0 (DDPO's default)",
    )  # fmt: skip
    """The sampler's stochasticity, in (0, 1]: DDIM's eta for DDIM models (0 is deterministic: no
    log-probability; 1 is DDPM-like, DDPO's), the SDE noise level a for flow-matching models
    (Flow-GRPO: 0.7 with sde_type=sde, 0.8 with cps)."""
    guidance_scale: float = num(3.0, ge=1)
    """Classifier-free guidance scale (1 = no guidance, half the UNet evaluations)."""
    negative_prompt: str = ""
    """Negative prompt used as the unconditional branch of CFG."""
    sde_type: SdeType = "sde"
    """Flow-matching models: the stochastic step, "sde" (Flow-GRPO's) or "cps" (coefficients-
    preserving); see ``diffloop.core.flow``."""
    sde_window: list[int] | None = None
    """Flow-matching models: [start, length] makes the ``length`` consecutive steps from step
    ``start`` (0-based) stochastic and trained, the others ODE steps (Flow-GRPO-Fast, MixGRPO);
    [first, last, length] draws each sample's start uniformly in [first, last] (Flow-GRPO-Fast's
    random window); null = every step but the last (an ODE step: it has no density)."""
    prompts_per_epoch: int = num(16, ge=1)
    """B: distinct prompt draws per epoch (over all processes)."""
    samples_per_prompt: int = num(8, ge=1)
    """K: trajectories per prompt (LOOP's group size; >= 2 for leave-one-out and GRPO)."""
    batch_size: int = num(32, ge=1)
    """Trajectories sampled at once per process (a memory knob: each sample has its own noise
    stream, so results do not depend on it)."""


@dataclass
class TrainConfig:
    algorithm: AlgorithmName = "loop"
    """One of loop, ppo, grpo, reinforce, reinforce_loo (see diffloop.algorithms.ALGORITHMS)."""
    batch_size: int = num(32, ge=1)
    """Trajectories per training minibatch per process."""
    gradient_accumulation_steps: int = num(1, ge=1)
    """Minibatches accumulated into one optimizer step (each minibatch spans its trained timesteps)."""
    num_inner_epochs: int = num(1, ge=1)
    """Passes over each epoch's samples (PPO-style reuse; must be 1 for reinforce*)."""
    learning_rate: float = num(3e-3, gt=0)
    """AdamW learning rate."""
    adam_beta1: float = num(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = num(0.999, ge=0, lt=1)
    """AdamW beta2."""
    adam_epsilon: float = num(1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = num(1e-4, ge=0)
    """AdamW (decoupled) weight decay."""
    max_grad_norm: float = num(1.0, ge=0)
    """Global gradient-norm clip (0 disables)."""
    clip_range: float = num(1e-4, gt=0)
    """PPO ratio clip epsilon. 1e-4 matches logprob_reduction=mean (DDPO); with sum the analogue is
    D x 1e-4 for D latent elements per step (4x64x64 SD latents: ~1.6; docs/method.md)."""
    logprob_reduction: LogprobReduction = "mean"
    """How a step's Gaussian log-density is reduced over its D latent elements: mean (DDPO) or sum
    (exact). A sum log-ratio is D times the mean one: scale clip_range by D with it."""
    adv_clip_max: float | None = num(None, ge=0)
    """Clip advantages to +-this. null: the algorithm's default (5 for ppo as DDPO, none for the
    others: see diffloop.algorithms); 0: no clipping. The clipped fraction is logged."""
    normalize_advantages: bool = False
    """Divide leave-one-out advantages by their group's reward std (docs/method.md: an option, off)."""
    timestep_fraction: float = num(1.0, gt=0, le=1)
    """Fraction of the trained window's steps each trajectory trains on (its own random subset)."""
    timestep_window: list[int] | None = None
    """[start, stop): train only on the stored sampling steps start..stop-1 (0 = the noisiest).
    null: the model's default -- every stored step, except for the packaged shapes model
    (model.pretrained=shapes), which trains on its noisiest half, [0, ceil(T / 2)). DDIM with
    eta = 1 at few steps ends with a near-clean step whose std is tiny (10 steps: 0.015), so its
    log-prob gradient is ~10x the others' while its noise barely changes the image: it swamps the
    reward signal (docs/method.md, "Which steps to train"). The run header prints the steps
    trained. Flow-matching models choose their stored steps with sample.sde_window instead."""
    mixed_precision: MixedPrecision = "no"
    """no (fp32), fp16 (with a grad scaler) or bf16. Trainable parameters always stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in backward: less memory, ~30% slower training."""
    lr_scheduler: LrScheduler = "constant"
    """constant, constant_with_warmup, linear or cosine (diffusers.optimization.get_scheduler)."""
    lr_warmup_steps: int = num(0, ge=0)
    """Optimizer steps of linear warmup (for the *_with_warmup, linear and cosine schedules)."""
    stat_tracking_buffer: int = num(
        32,
        ge=2,
        why="a buffer of one reward has std 0 and mean equal to it: every advantage would be 0",
    )
    """ppo: per-prompt reward buffer length (>= 2: a buffer of one reward gives advantage 0)."""
    stat_tracking_min_count: int = num(
        16, ge=2,
        why="a prompt's own statistics over a single reward are mean = that reward and std = 0, so "
        "its advantage (R - mean) / (std + eps) is exactly 0 and it trains on nothing; DDPO uses 16",
    )  # fmt: skip
    """ppo: per-prompt samples needed before its own statistics replace the batch's (>= 2)."""
    grpo_eps: float = num(1e-4, gt=0)
    """grpo: added to the group std (> 0: a group of equal rewards has std 0)."""
    kl_coef: float = num(0.0, ge=0)
    """Weight of a KL(policy || base model) penalty per step (the base is the UNet with its LoRA adapter
    disabled: no second copy). Costs one extra forward per trained step. 0 disables."""
    log_kl_to_base: bool = False
    """Log ``kl_to_base`` each epoch even when kl_coef is 0 (one extra forward per trained step)."""
    max_consecutive_nonfinite: int = num(3, ge=1)
    """An optimizer step whose gradient is NaN/inf is skipped and counted (``nonfinite_steps_skipped``);
    this many skipped in a row stop the run, keeping its last checkpoint (see diffloop.guards)."""
    optimizer: OptimizerName = "adamw"
    """adamw (torch) or adamw_8bit (bitsandbytes' 8-bit AdamW: ``pip install diffloop[bnb]``, a CUDA
    device and full fine-tuning, lora.enabled=false; LoRA tensors are too small for its 8-bit state)."""
    ema_decay: float | None = num(None, gt=0, lt=1)
    """EMA of the trainable weights, shadow <- d shadow + (1 - d) theta after every optimizer step
    (Flow-GRPO uses 0.9); evaluation, export, ``diffloop sample`` and ``diffloop eval`` use it.
    Costs one more fp32 copy of the trainable weights. null: off (diffloop.ema)."""


@dataclass
class RewardConfig:
    name: str = "shapes_binding_mean"
    """Registry name (jpeg_compressibility, shapes_binding, ...) or ``package.module:function``.
    ``multi`` combines ``components``; writing ``reward:`` as a YAML list means the same."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the reward's constructor (merged key by key: file, then each override)."""
    components: list[dict[str, Any]] | None = None
    """For name=multi: ``[{name, weight, kwargs, mean, std}, ...]``; the reward is the weighted sum
    of (score - mean) / std per component (mean 0 and std 1 unless given); each is logged."""
    asynchronous: bool = False
    """Score each sampling batch in a background thread while the next batch is sampled."""


@dataclass
class PromptConfig:
    source: str = "shapes/train_pair"
    """Prompt source: a registry name (ddpo/simple_animals, shapes/train, ...), ``list``, or one read
    from prompts.path: ``file`` (one prompt a line), ``jsonl``, ``csv`` or ``dataset`` (Hugging Face
    ``datasets``: needs ``pip install 'diffloop[datasets]'``). The other fields of a jsonl / csv /
    dataset row are the prompt's metadata, passed to the reward in training and evaluation."""
    path: str | None = None
    """File for source=file/jsonl/csv; hub id or local directory for source=dataset."""
    prompts: list[str] | None = None
    """Inline prompts (source=list)."""
    prompt_column: str = "prompt"
    """The field (JSONL key, CSV column, dataset column) holding the prompt (jsonl/csv/dataset)."""
    split: str = "train"
    """Dataset split (source=dataset)."""


@dataclass
class EvalConfig:
    prompts: str | None = "shapes/val_pair"
    """Held-out prompt source (registry name, e.g. shapes/val_pair, or file/jsonl/csv/dataset with
    eval.path); null disables evaluation. Row fields reach the reward as metadata, as in training."""
    path: str | None = None
    """File, hub id or directory of a path source (eval.prompts=file/jsonl/csv/dataset)."""
    prompt_column: str | None = None
    """Prompt field of a jsonl/csv/dataset eval source; null: prompts.prompt_column."""
    split: str = "train"
    """Dataset split (eval.prompts=dataset)."""
    num_prompts: int = num(96, ge=1)
    """First N prompts of the source (in order, cycling), the same every evaluation."""
    samples_per_prompt: int = num(2, ge=1)
    """Images per evaluation prompt; seeds are fixed so every evaluation sees the same noise."""
    every_n_epochs: int = num(6, ge=0)
    """Evaluate every N epochs (0: only before training and after the last epoch)."""
    seed: int = num(12345, ge=0, le=_MAX_SEED)
    """Seed of the evaluation noise (independent of the training seed)."""
    batch_size: int = num(16, ge=1)
    """Images generated at once per process during evaluation."""
    reward: str | None = None
    """The evaluation's reward (registry name or ``package.module:attr``); null: the training
    reward, or the one it declares it is judged by (``shapes_binding_mean``, the shapes default's
    phrase-mean training reward, is evaluated with ``shapes_binding``, the product). Lets a run
    train on a shaped reward and be judged on the target one; the run header names it."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of eval.reward (only with eval.reward set)."""


@dataclass
class LoggingConfig:
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers, through accelerate's: any of tensorboard, wandb, comet_ml, aim, mlflow,
    clearml, dvclive, swanlab, trackio (``logging.report_to=[tensorboard,wandb]``), ``all`` (every
    installed one) or ``none``. metrics.jsonl is always written, first; a failing tracker is logged
    and counted, never stops the run."""
    tensorboard: bool | None = None
    """Alias kept for older configs: true adds tensorboard to report_to, false removes it (null:
    report_to alone decides)."""
    wandb: bool | None = None
    """Alias kept for older configs: true adds wandb to report_to, false removes it."""
    wandb_project: str = "diffloop"
    """Weights & Biases project (also the project name given to the other trackers)."""
    wandb_entity: str | None = None
    """W&B entity (user or team); null: your default entity."""
    wandb_name: str | None = None
    """W&B run name; null: the run directory's name. The run's id is its own (``run_id`` in the run
    directory), so two runs of the same name stay two W&B runs and a resume continues its own."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)
    """{tracker name: {keyword: value}} laid over the arguments diffloop starts that tracker with
    (accelerate's ``init_kwargs``), e.g. ``logging.tracker_kwargs.wandb.mode=offline``."""
    progress_bars: bool = True
    """Show tqdm progress bars for sampling and training."""


@dataclass
class HubConfig:
    """Upload of the exported LoRA (or model) and its model card to the Hugging Face Hub at the end
    of a run, after everything is written (diffloop.export.push_to_hub)."""

    push: bool = False
    """Upload output_dir/lora (or model) with its README.md model card when the run ends."""
    model_id: str | None = None
    """Hub repository to create or update, ``namespace/name`` (needed with push=true)."""
    private: bool = True
    """Create the repository private (an existing repository keeps its visibility)."""
    token_env: str | None = None
    """Name of the environment variable holding the hub token (a token itself is never put in the
    config: config.yaml is saved in the run directory); null: huggingface_hub's own (HF_TOKEN, or
    ``hf auth login``)."""


@dataclass
class PerformanceConfig:
    """Speed options (docs/performance.md lists them and how to measure each). None changes the algorithm: the
    on-policy ratio stays 1 within the tolerance the run logs as ``onpolicy_logprob_err``."""

    compile: CompileTarget = "none"
    """torch.compile the UNet for: none, sampling (the no-grad loop), training (log-prob + backward),
    or all. Sampling and training then share one compiled module per mode."""
    compile_mode: CompileMode = "default"
    """torch.compile mode: default, reduce-overhead (CUDA graphs: fixed-shape sampling loop),
    max-autotune, max-autotune-no-cudagraphs."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager checks tracing without code generation)."""
    channels_last: bool = False
    """Store UNet weights/activations channels-last (NHWC): faster convolutions on tensor cores."""
    attention: AttentionBackend = "sdpa"
    """sdpa: torch's scaled_dot_product_attention (flash / memory-efficient kernels, diffusers'
    default); eager: explicit softmax(QK^T)V, for comparison."""
    merge_lora_for_sampling: bool = False
    """Fold the LoRA update into the base weights while sampling (no adapter matmuls), restoring the
    exact base weights afterwards. Needs train.mixed_precision=no: in fp16/bf16 weights a small
    update rounds away (W + dW == W), so the sampled policy would not be the trained one."""
    allow_tf32: bool = True
    """On Ampere+ GPUs run fp32 matmuls/convolutions in TF32 (as DDPO does). Both sampling and training
    use it, so the ratio stays 1; set false for bit-level fp32."""
    decode_batch_size: int = num(8, ge=1)
    """Images the VAE decodes at once (a memory knob for the low-memory setting)."""


@dataclass
class Config:
    seed: int = num(0, ge=0, le=_MAX_SEED)
    """Training seed: prompt draws, noise and LoRA initialisation are pure functions of it."""
    output_dir: str = "runs/shapes_loop"
    """Run directory (created; must be writable). Holds config, metrics, checkpoints, weights."""
    num_epochs: int = num(12, ge=1)
    """Epochs of sample -> score -> optimise."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir."""
    overwrite: bool = False
    """Start afresh in an output_dir that already holds checkpoints (they are deleted). Without it,
    such a directory is an error, so a finished run is never clobbered by accident."""
    checkpoint_every: int = num(1, ge=1)
    """Save a checkpoint every N epochs (and always after the last)."""
    cpu_threads: int | Literal["auto"] | None = num("auto", ge=1)
    """torch CPU threads. auto: the cores this process may use (``resolve_cpu_threads``: the CPU
    affinity mask, or OMP_NUM_THREADS when set, as GNU nproc does); an integer: exactly that many;
    null: leave torch's setting alone. On a CPU shared with other busy processes, fewer threads can
    be faster: OpenMP threads spin-wait for the busy cores."""
    keep_checkpoints: int = num(2, ge=1)
    """Newest checkpoints kept; older ones are deleted after a new one is complete."""
    resume_allow: list[str] = field(default_factory=list)
    """Keys (dotted; a section name covers its keys) a resume may change from the run's own config,
    e.g. ``resume_allow=[train.learning_rate]``. Without it only num_epochs (raised), logging.* and
    bookkeeping keys may differ (diffloop.resume.RESUME_MAY_CHANGE); any other difference is an error."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    hub: HubConfig = field(default_factory=HubConfig)


# ----------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming ``path``.

    Only the type is checked here; ranges and enumerations are :func:`validate`'s (one place for
    configs loaded from files and configs built in code alike).
    """
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
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin is Literal:
        return _coerce(value, str, path)  # membership: validate (with the closest name)
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
        if isinstance(value, str) and value.lower() in (
            "true",
            "false",
            "yes",
            "no",
            "on",
            "off",
            "1",
            "0",
        ):
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
    where = f"{path}." if path else ""
    return ConfigError(
        f"unknown config key '{where}{key}'.{did_you_mean(key, names)} Valid keys here: {', '.join(names)}"
    )


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """A ``cls`` dataclass from a nested dict (types coerced, unknown keys refused; not validated)."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key_error(cls, key, path)
        kwargs[key] = _coerce(value, types_[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _expand_reward_list(data: dict[str, Any]) -> dict[str, Any]:
    """``reward: [{name: ..., weight: ...}, ...]`` is short for ``reward: {name: multi, components: [...]}``."""
    if isinstance(data.get("reward"), list):
        return {**data, "reward": {"name": "multi", "components": data["reward"]}}
    return data


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base`` key by key, recursively: config sections and dict-valued fields
    (``reward.kwargs``) merge, so ``reward.kwargs.a=1 reward.kwargs.b=2`` keeps the file's other
    kwargs and both overrides; any other value in ``update`` replaces ``base``'s."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.learning_rate=1e-4`` -> {"train": {"learning_rate": 1e-4}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(
            f"override '{text}': '{key}' is not a dotted key like train.learning_rate"
        )
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override '{text}': the value is not valid YAML ({_one_line(e)})"
        ) from None
    node: dict[str, Any] = {}
    cursor = node
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        loaded = load_yaml(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {_one_line(e)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(
            f"config file '{p}' must hold a mapping of keys, got {type(loaded).__name__}"
        )
    return loaded or {}


def unvalidated_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults < YAML file at ``path`` < ``overrides``, types checked but not :func:`validate`-d."""
    data = _expand_reward_list(_read_config_file(path)) if path is not None else {}
    for text in overrides or []:
        data = merge_dicts(data, _expand_reward_list(parse_override(text)))
    return from_dict(Config, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file at ``path`` < ``overrides``; validated before returning."""
    config = unvalidated_config(path, overrides)
    validate(config)
    return config


DEFAULT_CONFIG = "shapes.yaml"


def packaged_config(name: str) -> Path:
    """A config shipped in ``diffloop/configs`` (may not exist)."""
    return Path(str(resources.files("diffloop") / "configs" / name))


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [k=v ...]`` -> (config path, overrides): the first argument is a config file unless
    it is an override; a bare name is also looked up among the shipped configs; no file: shapes.yaml."""
    if args and "=" not in args[0]:
        path = args[0]
        if not Path(path).exists() and (packaged := packaged_config(path)).exists():
            path = str(packaged)  # `diffloop train sd15_aesthetic.yaml` finds shipped configs too
        return path, args[1:]
    return str(packaged_config(DEFAULT_CONFIG)), args


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, default as YAML, allowed values, docstring) of every leaf field, in declaration
    order; the docstrings are read from this module's source (ast: nothing heavy is imported)."""
    docs = _attribute_docstrings()
    out = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_dataclass_type(tp):
            out += field_docs(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default_yaml = (
            yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
        )
        out.append(
            (prefix + f.name, default_yaml, _allowed(f, tp), docs.get((cls.__name__, f.name), ""))
        )
    return out


def _allowed(f: dataclasses.Field, tp: Any) -> str:
    """``in (0, 1]``, ``one of a, b`` or "" (what :func:`check_field_values` enforces)."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    return f.metadata["range"].describe() if "range" in f.metadata else ""


def _attribute_docstrings() -> dict[tuple[str, str], str]:
    """{(class name, field name): the string literal right after the field} for this module."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt, nxt in itertools.pairwise(node.body):
            doc = (
                nxt.value.value
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                else None
            )
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(doc, str)
            ):
                out[(node.name, stmt.target.id)] = " ".join(doc.split())
    return out


# ----------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_field_values(obj: Any, path: str = "") -> None:
    """Every field against its annotation: a numeric field is finite and in its :class:`Range`
    (``num(...)`` metadata), a ``Literal`` field is one of its choices (closest name suggested)."""
    hints = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        value, where, tp = getattr(obj, f.name), f"{path}{f.name}", hints[f.name]
        if _is_dataclass_type(tp):
            check_field_values(value, where + ".")
        elif typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            _check(
                value in choices,
                f"{where}='{value}' must be one of {', '.join(choices)}; '{value}' is unknown."
                f"{did_you_mean(str(value), choices)}",
            )
        elif isinstance(value, str) and (words := _literal_words(tp)):  # int | Literal["auto"]
            _check(
                value in words,
                f"{where}={value!r} must be a number {f.metadata['range'].describe()} "
                f"or one of {', '.join(words)}",
            )
        elif "range" in f.metadata:
            _check_number(
                value, f.metadata["range"], where, optional=type(None) in typing.get_args(tp)
            )


def _literal_words(tp: Any) -> tuple[str, ...]:
    """The words of the ``Literal[...]`` members of a union annotation (``int | Literal["auto"]``)."""
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
    _check(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        f"{where}={value!r} must be a number {rng.describe()}",
    )
    _check(
        math.isfinite(value),
        f"{where}={value} is not finite; it must be a number {rng.describe()}{why}",
    )
    _check(rng.contains(value), f"{where}={value} must be {rng.describe()}{why}")


def check_output_dir(output_dir: str, name: str = "output_dir") -> None:
    """``output_dir`` (the setting ``name``) is a writable directory, or can be created: a probe
    directory is created and removed in it, or in its nearest existing parent (permissions,
    read-only mounts and /proc all count). Raises ConfigError."""
    p = Path(output_dir).expanduser().absolute()
    existing = next(a for a in (p, *p.parents) if a.exists())
    what = f"{name}={output_dir} cannot be {'written' if existing == p else 'created'}"
    _check(existing.is_dir(), f"{what}: {existing} is a file; choose another {name}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".diffloop-write-probe-", dir=existing))
    except OSError as e:
        raise ConfigError(
            f"{what}: {existing} is not writable ({e.strerror}); choose another {name}"
        ) from None


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
    _check(
        w is None or (len(w) == 3 and 0 <= w[0] <= w[1] and w[2] >= 1 and w[1] + w[2] <= s.num_steps - 1),
        f"sample.sde_window={s.sde_window} must be null, [start, length] or [first, last, length] "
        f"(start drawn in [first, last]) with length >= 1 and start + length <= sample.num_steps - 1 "
        f"= {s.num_steps - 1} (the last step is an ODE step)",
    )  # fmt: skip
    _check(
        config.eval.reward is not None or not config.eval.reward_kwargs,
        f"eval.reward_kwargs={config.eval.reward_kwargs} without eval.reward: the evaluation uses the "
        "training reward (reward.kwargs); set eval.reward too, or drop eval.reward_kwargs",
    )
    tw = t.timestep_window
    _check(
        tw is None or (len(tw) == 2 and 0 <= tw[0] < tw[1] <= s.num_steps),
        f"train.timestep_window={tw} must be null or [start, stop) with 0 <= start < stop <= "
        f"sample.num_steps = {s.num_steps}, e.g. [0, {max(1, s.num_steps // 2)}] for the first half",
    )
    _check(
        tw is None or s.sde_window is None,
        f"train.timestep_window={tw} and sample.sde_window={s.sde_window}: a flow-matching model "
        "trains on the steps sample.sde_window makes stochastic; set train.timestep_window=null",
    )
    _check(
        s.samples_per_prompt >= algo.min_samples_per_prompt,
        f"sample.samples_per_prompt={s.samples_per_prompt}: algorithm '{algo.name}' needs at least "
        f"{algo.min_samples_per_prompt} samples per prompt ({algo.why_min_samples}); set "
        f"sample.samples_per_prompt={max(4, algo.min_samples_per_prompt)}",
    )
    total = s.prompts_per_epoch * s.samples_per_prompt
    _check(
        total >= 2,
        "sample.prompts_per_epoch * sample.samples_per_prompt = 1 sample per epoch: every baseline is "
        "then that sample's own reward and every advantage is 0; raise sample.prompts_per_epoch",
    )
    _check(
        total % num_processes == 0,
        f"sample.prompts_per_epoch * sample.samples_per_prompt = {total} samples per epoch must divide "
        f"evenly over {num_processes} processes; change sample.prompts_per_epoch",
    )
    local = total // num_processes
    _check(
        local % t.batch_size == 0,
        f"train.batch_size={t.batch_size} must divide the {local} samples each process holds per epoch; "
        f"try train.batch_size={largest_divisor(local, t.batch_size)}",
    )
    minibatches = local // t.batch_size
    if not algo.one_update_per_batch:
        _check(
            minibatches % t.gradient_accumulation_steps == 0,
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} must divide the {minibatches} "
            f"minibatches per inner epoch (samples per process / train.batch_size) so no step is partial",
        )
    if algo.one_update_per_batch:
        _check(
            t.num_inner_epochs == 1,
            f"train.num_inner_epochs={t.num_inner_epochs}: algorithm '{algo.name}' makes one gradient step "
            "per batch of samples (no importance ratio); set train.num_inner_epochs=1 or use loop/ppo",
        )
    _check(
        not ((t.kl_coef > 0 or t.log_kl_to_base) and not config.lora.enabled),
        "train.kl_coef / train.log_kl_to_base need lora.enabled=true: the base model is the UNet with "
        "its LoRA adapter disabled",
    )
    _check(
        t.stat_tracking_min_count <= t.stat_tracking_buffer,
        f"train.stat_tracking_min_count={t.stat_tracking_min_count} must be <= "
        f"train.stat_tracking_buffer={t.stat_tracking_buffer}: a buffer never holds more rewards",
    )
    _check(len(config.lora.target_modules) > 0, "lora.target_modules must name at least one module")
    _check(
        config.lora.dropout == 0 or algo.one_update_per_batch,
        f"lora.dropout={config.lora.dropout}: '{algo.name}' reuses samples through the importance ratio, and "
        "dropout in training but not in sampling makes it differ from 1 on-policy; set lora.dropout=0",
    )
    _check(
        not (config.resume and config.overwrite),
        "resume=true and overwrite=true contradict; pick one",
    )
    _check(
        bool(config.model.pretrained), "model.pretrained must name a hub id or a local directory"
    )
    _validate_sdxl(config.model.sdxl)
    _check(bool(config.reward.name), "reward.name must name a registry reward or module:function")
    validate_reward_form(config.reward)
    _check(bool(config.output_dir), "output_dir must name a directory")
    check_output_dir(config.output_dir)
    _validate_performance(config)
    _validate_logging(config.logging)
    _validate_optimizer(config)
    _validate_hub(config.hub)
    p = config.prompts
    if p.source in PATH_SOURCES:
        _check(
            p.path is not None,
            f"prompts.source={p.source} needs prompts.path=<{PATH_SOURCES[p.source]}>",
        )
    if p.source == "list":
        _check(
            bool(p.prompts), "prompts.source=list needs prompts.prompts=[...] (at least one prompt)"
        )
    e = config.eval
    if e.prompts in PATH_SOURCES:
        _check(
            e.path is not None,
            f"eval.prompts={e.prompts} needs eval.path=<{PATH_SOURCES[e.prompts]}>",
        )
    _check(e.path is None or e.prompts in PATH_SOURCES,
           f"eval.path={e.path} is only read by eval.prompts={'/'.join(PATH_SOURCES)}, not {e.prompts}")  # fmt: skip


def _validate_logging(lg: LoggingConfig) -> None:
    choices = (*TRACKERS, "all", "none")
    for name in lg.report_to:
        _check(
            name in choices,
            f"logging.report_to: unknown tracker '{name}'.{did_you_mean(name, choices)} Choose from "
            f"{', '.join(choices)}",
        )
    _check(
        "none" not in lg.report_to or len(lg.report_to) == 1,
        f"logging.report_to={lg.report_to} lists 'none' with trackers; give the trackers or none",
    )
    for name, kwargs in lg.tracker_kwargs.items():
        _check(name in TRACKERS and isinstance(kwargs, dict),
               f"logging.tracker_kwargs.{name} must be a mapping of keywords for one of the trackers "
               f"{', '.join(TRACKERS)}")  # fmt: skip


def validate_reward_form(r: RewardConfig) -> None:
    """multi takes components and no kwargs; any other name takes kwargs and no components."""
    if r.name == "multi":
        _check(
            not r.kwargs,
            f"reward.name=multi takes its settings from reward.components, not reward.kwargs (got "
            f"{sorted(r.kwargs)}); put kwargs inside each component",
        )
    else:
        _check(
            not r.components,
            f"reward.components is set but reward.name={r.name}; use reward.name=multi (or write "
            "reward: as a YAML list) to combine rewards",
        )


def _validate_performance(config: Config) -> None:
    perf = config.performance
    _check(
        bool(perf.compile_backend), "performance.compile_backend must name a torch.compile backend"
    )
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


def _validate_optimizer(config: Config) -> None:
    """adamw_8bit only where bitsandbytes can run it and it saves memory (refused otherwise)."""
    if config.train.optimizer != "adamw_8bit":
        return
    import importlib.util

    _check(
        not config.lora.enabled,
        "train.optimizer=adamw_8bit is for full fine-tuning (lora.enabled=false): bitsandbytes keeps "
        "tensors under 4096 elements (most LoRA matrices) in 32-bit, and a LoRA's Adam state is "
        "small anyway; use train.optimizer=adamw with LoRA",
    )
    _check(
        importlib.util.find_spec("bitsandbytes") is not None,
        "train.optimizer=adamw_8bit needs bitsandbytes, which is not installed: "
        "pip install 'diffloop[bnb]' (or train.optimizer=adamw)",
    )
    import torch

    _check(
        torch.cuda.is_available(),
        "train.optimizer=adamw_8bit needs a CUDA device (bitsandbytes' 8-bit optimizers have no CPU "
        "kernels) and none is available; use train.optimizer=adamw",
    )


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def _validate_hub(hub: HubConfig) -> None:
    if not hub.push:
        return
    _check(
        hub.model_id is not None,
        "hub.push=true needs hub.model_id=<namespace/name>, the hub repository to upload to",
    )
    _check(
        bool(_REPO_ID.match(hub.model_id))
        and ".." not in hub.model_id
        and "--" not in hub.model_id,
        f"hub.model_id={hub.model_id} must be a hub repository id namespace/name (letters, digits, "
        "'-', '_', '.'; no '--' or '..'), e.g. hub.model_id=my-user/shapes-loop-lora",
    )
    if hub.token_env is not None:
        _check(
            bool(os.environ.get(hub.token_env)),
            f"hub.token_env={hub.token_env}: that environment variable is unset or empty; export it "
            "or set hub.token_env=null to use huggingface_hub's own login",
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


def largest_divisor(n: int, at_most: int) -> int:
    """The largest d <= at_most that divides n (1 if none larger)."""
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
    trained_window: str = ""
    denoiser: str = "UNet"

    def lines(self) -> list[str]:
        return [
            (
                f"samples per epoch:             {self.samples_per_epoch} "
                f"({self.samples_per_process} per process)"
            ),
            f"reward queries per epoch:      {self.reward_queries_per_epoch}",
            f"trained timesteps per sample:  {self.trained_timesteps_per_sample}{self.trained_window}",
            f"gradient updates per epoch:    {self.gradient_updates_per_epoch}",
            f"{self.denoiser + ' evaluations per sample:':<31}{self.unet_evals_per_sample} (sampling)",
        ]


def cfg_evaluations_per_step(guidance_scale: float) -> int:
    """Denoiser evaluations per sample per step under classifier-free guidance: 1 at scale 1 (one
    branch), else 2 (conditional and unconditional, one doubled batch), as every CFG policy runs it."""
    return 1 if guidance_scale == 1.0 else 2


def derived_arithmetic(
    config: Config,
    num_processes: int = 1,
    *,
    stored_steps: int | None = None,
    evaluations_per_step: int | None = None,
    denoiser: str = "UNet",
) -> Arithmetic:
    """The per-epoch numbers. The model-dependent ones come from the loaded policy when given
    (``policy.stored_steps`` / ``policy.evaluations_per_step``: the trainer's header); without a
    model they follow the DDIM rules: every step stored, 2 evaluations per step with CFG."""
    from diffloop.algorithms import ALGORITHMS

    s, t = config.sample, config.train
    if stored_steps is None:
        stored_steps = s.num_steps
    if evaluations_per_step is None:
        evaluations_per_step = cfg_evaluations_per_step(s.guidance_scale)
    total = s.prompts_per_epoch * s.samples_per_prompt
    local = total // num_processes
    minibatches = local // t.batch_size
    if ALGORITHMS[t.algorithm].one_update_per_batch:
        updates = 1
    else:
        updates = t.num_inner_epochs * minibatches // t.gradient_accumulation_steps
    return Arithmetic(
        samples_per_epoch=total,
        samples_per_process=local,
        reward_queries_per_epoch=total,
        trained_timesteps_per_sample=trained_steps(config, stored_steps)[1],
        minibatches_per_inner_epoch=minibatches,
        gradient_updates_per_epoch=updates,
        unet_evals_per_sample=s.num_steps * evaluations_per_step,
        trained_window=_window_words(config),
        denoiser=denoiser,
    )


def _window_words(config: Config) -> str:
    """' (of steps a-b: ...)' for the header when a window restricts the trained steps."""
    window = effective_timestep_window(config)
    if window is None:
        return ""
    why = "train.timestep_window" if config.train.timestep_window else "the shapes model's default"
    return f" (of steps {window[0]}-{window[1] - 1}: {why})"


def num_trained_timesteps(num_steps: int, timestep_fraction: float) -> int:
    """Steps of each trajectory trained on: max(1, int(T * timestep_fraction)) (DDPO's rule), T
    the length of the trained window (``trained_step_range``)."""
    return max(1, int(num_steps * timestep_fraction))


def effective_timestep_window(config: Config) -> list[int] | None:
    """``train.timestep_window``, or when it is null the model's default: [0, ceil(T / 2)) for the
    packaged shapes model (its 10-step DDPM sampler; docs/method.md "Which steps to train"),
    None (every stored step) for every other model."""
    window = config.train.timestep_window
    if window is not None or config.model.pretrained != "shapes":
        return window
    return [0, math.ceil(config.sample.num_steps / 2)]


def trained_steps(config: Config, stored_steps: int) -> tuple[range, int]:
    """(the stored steps training draws from, how many each trajectory trains) for trajectories of
    ``stored_steps`` steps: the one rule the trainer, ``diffloop variance`` and the header share."""
    window = trained_step_range(effective_timestep_window(config), stored_steps)
    return window, num_trained_timesteps(len(window), config.train.timestep_fraction)


def trained_step_range(timestep_window: list[int] | None, stored_steps: int) -> range:
    """The stored steps training draws from: a window [start, stop) (``effective_timestep_window``),
    or all ``stored_steps`` when it is None (validated: stop <= stored steps)."""
    return range(stored_steps) if timestep_window is None else range(*timestep_window)


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (taskset, cgroup cpusets), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity masks
        return os.cpu_count() or 1


def resolve_cpu_threads(
    setting: int | str | None,
    environ: typing.Mapping[str, str] | None = None,
    cores: int | None = None,
) -> int | None:
    """The torch thread count of ``cpu_threads`` (None: leave torch's own setting alone).

    ``auto`` = OMP_NUM_THREADS when it is set (its first entry), as GNU ``nproc`` reads it and as
    launchers (torchrun, ``diffloop compare --jobs``) set it to give each process its share; else
    max(1, cores // LOCAL_WORLD_SIZE): the cores of the affinity mask split between the processes
    of this machine, so that processes never ask for more threads than there are cores.
    An integer is used as given. A malformed OMP_NUM_THREADS is an error, not ignored.
    """
    if setting is None or isinstance(setting, int):
        return setting
    env = os.environ if environ is None else environ
    cores = available_cores() if cores is None else cores
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        first = omp.split(",")[0].strip()
        _check(
            first.isdigit() and int(first) >= 1,
            f"cpu_threads=auto reads OMP_NUM_THREADS={omp!r}, which is not a positive integer; "
            "unset OMP_NUM_THREADS or set cpu_threads=N",
        )
        return int(first)
    local = env.get("LOCAL_WORLD_SIZE", "1").strip()
    processes = int(local) if local.isdigit() and int(local) >= 1 else 1
    return max(1, cores // processes)
