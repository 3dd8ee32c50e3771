"""The config's typed schema: every section's dataclass, its fields' ranges and docstrings
(read by :func:`diffloop.config.field_docs`), and :class:`ConfigError`."""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from diffloop.errors import DiffloopError


class ConfigError(DiffloopError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` (one line: the field and the fix) unless
    ``condition``."""
    if not condition:
        raise ConfigError(message)


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
    """A numeric dataclass field with its valid range, which :func:`validate` checks for every
    field."""
    if (gt is not None and ge is not None) or (lt is not None and le is not None):
        raise TypeError("give one lower bound (gt or ge) and one upper bound (lt or le)")
    low = gt if gt is not None else ge
    high = lt if lt is not None else le
    rng = Range(low, high, low_open=gt is not None, high_open=lt is not None, why=why)
    return field(default=default, metadata={"range": rng})


_MAX_SEED = 2**63 - 1  # torch.manual_seed takes up to 64 bits; numpy's SeedSequence any size
_NO_LOGPROB = "a deterministic step (eta=0) has no log-probability"


AlgorithmName = Literal["loop", "ppo", "grpo", "reinforce", "reinforce_loo"]
MixedPrecision = Literal["no", "fp16", "bf16"]
LogprobReduction = Literal["mean", "sum"]
SdeType = Literal["sde", "cps"]
KlForm = Literal["gaussian", "flow_grpo"]
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
CompileTarget = Literal["none", "sampling", "training", "all"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
AttentionBackend = Literal["sdpa", "eager"]
TextEncoderDevice = Literal["accelerator", "cpu", "offload"]
OptimizerName = Literal["adamw", "adamw_8bit"]
QuantBackend = Literal["none", "torchao", "bitsandbytes", "quanto"]
QUANT_TYPES: dict[str, tuple[str, ...]] = {
    "torchao": ("int8_weight_only", "float8_weight_only", "int4_weight_only"),
    "bitsandbytes": ("nf4", "fp4", "int8"),
    "quanto": ("int8", "float8", "int4"),
}
"""``model.quantization.quant_type`` values of each backend; the first is its default."""
QUANT_PACKAGES: dict[str, tuple[str, str]] = {
    "torchao": ("torchao", "pip install 'diffloop[quantization]'"),
    "bitsandbytes": ("bitsandbytes", "pip install 'diffloop[bnb]'"),
    "quanto": ("optimum.quanto", "pip install optimum-quanto"),
}
"""Quantization backend -> (the module it imports, how to install it)."""
QUANT_CUDA_ONLY = ("bitsandbytes",)
"""Quantization backends without CPU kernels (bitsandbytes quantizes as weights move to CUDA)."""
QUANT_UNSUPPORTED: dict[tuple[str, str], str] = {
    ("torchao", "int4_weight_only"): (
        "peft has no LoRA layer for torchao int4 weights (TorchaoLoraLinear takes int8 / float8 "
        "only) and torchao's int4 kernels need CUDA; use quant_type=int8_weight_only, or "
        "backend=bitsandbytes quant_type=nf4 for 4-bit"
    ),
}
"""(backend, quant_type) pairs that are refused, and why."""

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

    resolution: int | None = num(None, ge=8)
    """Deprecated: ``model.resolution`` (an old config's value moves there, with a warning)."""
    original_size: list[int] | None = None
    """(height, width) micro-conditioning time id; null: (resolution, resolution), as diffusers."""
    crops_coords_top_left: list[int] = field(default_factory=lambda: [0, 0])
    """(top, left) crop time id; (0, 0) asks for uncropped-looking images (diffusers' default)."""
    target_size: list[int] | None = None
    """(height, width) time id; null: (resolution, resolution)."""
    vae: str | None = None
    """Replacement VAE (hub id or directory), e.g. madebyollin/sdxl-vae-fp16-fix, which decodes in
    fp16; null: the model's vae/ (decoded in fp32 when its config says force_upcast)."""


@dataclass
class FluxConfig:
    """FLUX.1-only settings (read by ``diffloop.policies.flux``; ignored for other families);
    the resolution is ``model.resolution`` (a multiple of 16 for FLUX: VAE factor 8 x 2x2
    packing)."""

    max_sequence_length: int | None = num(None, ge=1, le=512)
    """T5 tokens of the prompt (FluxPipeline's max_sequence_length, at most 512); null: the T5
    tokenizer's model_max_length capped at 512 (512 for FLUX.1). Flow-GRPO uses 128."""


@dataclass
class Flux2Config:
    """FLUX.2-only settings (dev and Klein; read by ``diffloop.policies.flux2``; ignored for other
    families); the resolution is ``model.resolution`` (a multiple of 16: VAE factor 8 x the 2x2
    patchify)."""

    max_sequence_length: int | None = num(None, ge=1, le=512)
    """Text tokens of the chat-templated prompt (the pipelines' max_sequence_length, at most 512):
    the transformer attends over this many text tokens, padding included; null: 512 (capped at
    the tokenizer's model_max_length). Flow-Factory uses 512."""
    text_encoder_out_layers: list[int] | None = None
    """The text encoder's hidden-state layers stacked into the embedding (the pipelines'
    text_encoder_out_layers); null: the pipeline's (dev 10, 20, 30; Klein 9, 18, 27). Their
    number x the encoder's width must be the transformer's joint_attention_dim."""


@dataclass
class SD3Config:
    """SD3 / SD3.5-only settings (read by ``diffloop.policies.sd3``; ignored for other families)."""

    max_sequence_length: int | None = num(None, ge=1, le=512)
    """T5 tokens of the prompt (StableDiffusion3Pipeline's max_sequence_length, at most 512): the
    T5 part of the text embeddings is this long, so the transformer attends over 77 + this many
    text tokens (the cost of each step grows with it); null: the pipeline's default 256 (capped at
    the T5 tokenizer's model_max_length). Flow-GRPO's SD3 scripts use 128."""


@dataclass
class QwenImageConfig:
    """Qwen-Image-only settings (read by ``diffloop.policies.qwen_image``; ignored for other
    families); the resolution is ``model.resolution`` (a multiple of 16: VAE factor 8 x 2x2
    packing)."""

    max_sequence_length: int | None = num(None, ge=1, le=1024)
    """Text tokens kept per prompt after the chat template's dropped prefix
    (QwenImagePipeline's max_sequence_length, at most 1024); the transformer attends over the
    longest prompt's tokens of a batch, at most this many. null: the pipeline's default 512.
    verl-omni's Qwen-Image runs use 256."""


@dataclass
class ZImageConfig:
    """Z-Image-only settings (base and Turbo; read by ``diffloop.policies.zimage``; ignored for
    other families); the resolution is ``model.resolution`` (a multiple of 16: VAE factor 8 x
    2x2 patches)."""

    max_sequence_length: int | None = num(None, ge=1, le=992)
    """Tokens of the chat-templated prompt (ZImagePipeline's max_sequence_length): the text is
    padded / truncated to it and only its real tokens reach the transformer, so a longer limit
    costs only the text encoder's work; at most 992 (the caption, rounded up to 32, and the image
    share the transformer's 1024 rope positions). null: the pipeline's default 512."""
    cfg_normalization: float = num(0.0, ge=0)
    """ZImagePipeline's cfg_normalization k: each sample's guided output is scaled down to k
    times the norm of its positive branch where it exceeds that (the pipeline's True is 1.0); 0:
    off, the pipeline's default."""
    cfg_truncation: float = num(1.0, ge=0)
    """ZImagePipeline's cfg_truncation c: no CFG (the positive branch alone) on steps whose time
    1 - sigma exceeds c (the late, low-noise steps); 1.0, the pipeline's default, never
    truncates."""


@dataclass
class QuantizationConfig:
    """A quantized frozen base (QLoRA): the listed frozen components load through diffusers' /
    transformers' quantization backends (``quantization_config=`` in ``from_pretrained``) and the
    LoRA adapter trains in fp32 on top; sampling and the training recomputation use the same
    quantized weights. Needs lora.enabled=true. docs/quantization.md says what the exported LoRA
    then is."""

    backend: QuantBackend = "none"
    """none: full-precision weights (in train.mixed_precision's dtype); torchao: weight-only int8 /
    float8 (runs on CPU and CUDA; ``pip install 'diffloop[quantization]'``); bitsandbytes: 4-bit
    NF4 / FP4 or 8-bit (CUDA only; ``pip install 'diffloop[bnb]'``); quanto: optimum-quanto
    (``pip install optimum-quanto``; deprecated by diffusers)."""
    quant_type: str | None = None
    """The backend's storage: torchao int8_weight_only | float8_weight_only | int4_weight_only
    (refused: peft has no LoRA layer for torchao int4); bitsandbytes nf4 | fp4 | int8; quanto int8
    | float8 | int4. null: the backend's default (int8_weight_only / nf4 / int8)."""
    components: list[str] = field(default_factory=list)
    """The frozen components to quantize, by folder name (``transformer``, ``text_encoder_2``);
    empty: the denoiser only (unet / transformer). The VAE is never quantized."""


@dataclass
class ModelConfig:
    pretrained: str = "shapes"
    """Hub id (``stabilityai/stable-diffusion-2-base``) or local directory in diffusers layout;
    ``shapes`` is the shapes-world model shipped inside the package."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    variant: str | None = None
    """Weight variant to load (``fp16``), as in diffusers' ``from_pretrained``."""
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """DDIMScheduler settings over the model's own scheduler config (``{set_alpha_to_one: false}``);
    a non-DDIM config is converted with set_alpha_to_one and clip_sample false (logged)."""
    sdxl: SDXLConfig = field(default_factory=SDXLConfig)
    """SDXL micro-conditioning and VAE (used when model.pretrained is an SDXL pipeline)."""
    resolution: int | None = num(None, ge=8)
    """Square image side in pixels, every family (a multiple of the VAE's downsampling x the
    denoiser's patch size; Flow-GRPO trains SD3.5 at 512); null = the denoiser's sample_size x the
    VAE's downsampling factor (1024 for SDXL base; FLUX, whose transformer has none: the VAE's
    sample_size, 1024 for FLUX.1, FluxPipeline's default)."""
    flux: FluxConfig = field(default_factory=FluxConfig)
    """FLUX.1's T5 length (used when model.pretrained is a FluxPipeline)."""
    flux2: Flux2Config = field(default_factory=Flux2Config)
    """FLUX.2's text length and layers (used when model.pretrained is a Flux2Pipeline or a
    Flux2KleinPipeline)."""
    sd3: SD3Config = field(default_factory=SD3Config)
    """SD3's T5 length (used when model.pretrained is a StableDiffusion3Pipeline)."""
    qwen_image: QwenImageConfig = field(default_factory=QwenImageConfig)
    """Qwen-Image's text length (used when model.pretrained is a QwenImagePipeline)."""
    zimage: ZImageConfig = field(default_factory=ZImageConfig)
    """Z-Image's text length and CFG options (used when model.pretrained is a ZImagePipeline)."""
    text_encoder_device: TextEncoderDevice = "accelerator"
    """Where the frozen text encoders live and run (every family): ``accelerator``, resident on
    the training device; ``cpu``, in CPU memory and run there (no accelerator memory; encoding is
    slower, and its float rounding is the CPU's), their outputs moved to the device;
    ``offload``, in CPU memory, moved to the accelerator only while prompts are encoded: saves
    their memory (Qwen-Image's Qwen2.5-VL-7B: 16.6 GB in bf16) for a transfer per encoding. Each
    distinct prompt is encoded once per run (docs/guide.md, prompt embeddings)."""
    offload_text_encoders: bool = False
    """Deprecated: ``true`` is read as ``model.text_encoder_device=offload`` (one warning line);
    ``true`` with text_encoder_device=cpu is refused."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """A quantized frozen base under the LoRA (``model.quantization.backend``); default none."""

    def __post_init__(self) -> None:
        """The deprecated ``model.sdxl.resolution`` (in its range) moves to ``model.resolution``
        (one warning line); both set to different values is a ConfigError."""
        self._read_offload_alias()
        old = self.sdxl.resolution
        declared = {f.name: f for f in dataclasses.fields(SDXLConfig)}["resolution"]
        if old is None or not declared.metadata["range"].contains(old):
            return  # out of its range: validate() refuses it in the field's own words
        if self.resolution is not None and self.resolution != old:
            raise ConfigError(
                f"model.sdxl.resolution={old} and model.resolution={self.resolution} differ: "
                "model.sdxl.resolution is deprecated, set only model.resolution"
            )
        logging.getLogger(__name__).warning(
            "model.sdxl.resolution is deprecated: use model.resolution=%d (read as that)", old
        )
        self.resolution = old
        self.sdxl = dataclasses.replace(self.sdxl, resolution=None)

    def _read_offload_alias(self) -> None:
        """The deprecated ``model.offload_text_encoders=true`` becomes
        ``model.text_encoder_device=offload`` (one warning line); with text_encoder_device=cpu
        it is a ConfigError (the two say different things)."""
        if not self.offload_text_encoders:
            return
        if self.text_encoder_device == "cpu":
            raise ConfigError(
                "model.offload_text_encoders=true and model.text_encoder_device=cpu disagree: "
                "model.offload_text_encoders is deprecated, set only model.text_encoder_device"
            )
        logging.getLogger(__name__).warning(
            "model.offload_text_encoders is deprecated: use model.text_encoder_device=offload "
            "(read as that)"
        )
        self.text_encoder_device = "offload"
        self.offload_text_encoders = False


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
    """Minibatches accumulated into one optimizer step (each minibatch spans its trained
    timesteps)."""
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
    """Divide leave-one-out advantages by their group's reward std (docs/method.md: an option,
    off)."""
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
        "its advantage (R - mean) / (std + eps) is exactly 0 and it trains on nothing; "
        "DDPO uses 16",
    )  # fmt: skip
    """ppo: per-prompt samples needed before its own statistics replace the batch's (>= 2)."""
    grpo_eps: float = num(1e-4, gt=0)
    """grpo: added to the group std (> 0: a group of equal rewards has std 0)."""
    kl_coef: float = num(0.0, ge=0)
    """Weight of a KL(policy || base model) penalty per step (the base is the UNet with its LoRA
    adapter disabled: no second copy), in the form train.kl_form. Costs one extra forward per
    trained step. 0 disables."""
    kl_form: KlForm = "gaussian"
    """What train.kl_coef weights (and kl_to_base reports), per trained step with means mu, mu_base:
    gaussian: the true KL of the two step Gaussians, sum_d (mu - mu_base)^2 / (2 std^2) over the
    step's D latent elements, divided by D under logprob_reduction=mean (std: the whole step std,
    std_t sqrt(-dt) for a flow sde step). flow_grpo: Flow-GRPO's form (scripts/train_sd3.py),
    mean_d (mu - mu_base)^2 / (2 std_dev_t^2) with std_dev_t = std_t, without sqrt(-dt), for sde
    steps (= gaussian-mean x (-dt): 1/25 .. 1/3.7 of it over SD3.5's 10 steps) and the step std for
    cps steps (= gaussian-mean); use it to carry a Flow-GRPO beta over unchanged. Flow-matching
    models only (a DDIM model has no dt: refused when it loads). Costs nothing extra."""
    log_kl_to_base: bool = False
    """Log ``kl_to_base`` each epoch even when kl_coef is 0 (one extra forward per trained step)."""
    max_consecutive_nonfinite: int = num(3, ge=1)
    """An optimizer step whose gradient is NaN/inf is skipped and counted
    (``nonfinite_steps_skipped``);
    this many skipped in a row stop the run, keeping its last checkpoint (see diffloop.guards)."""
    optimizer: OptimizerName = "adamw"
    """adamw (torch) or adamw_8bit (bitsandbytes' 8-bit AdamW: ``pip install diffloop[bnb]``, a CUDA
    device and full fine-tuning, lora.enabled=false; LoRA tensors are too small for its 8-bit
    state)."""
    ema_decay: float | None = num(None, gt=0, lt=1)
    """EMA of the trainable weights: after optimizer step n (n = 1, 2, ...), when it is an update
    step (train.ema_update_interval), shadow <- d_n shadow + (1 - d_n) theta, with d_n = this value,
    or min((1 + n) / (10 + n), this value) with train.ema_warmup. Evaluation, export, ``diffloop
    sample`` and ``diffloop eval`` use it. Flow-GRPO's 0.9 goes with its warm-up and interval 8: 0.9
    alone at every step averages over ~10 steps instead of ~80 (diffloop.ema). Costs one more fp32
    copy of the trainable weights. null: off."""
    ema_warmup: bool = False
    """EMA decay warm-up d_n = min((1 + n) / (10 + n), train.ema_decay) at optimizer step n,
    Flow-GRPO's (flow_grpo/ema.py): 0.18 at n = 1, 0.47 at n = 7, the full 0.9 from n = 80, so early
    averages do not hold on to the starting weights. Needs train.ema_decay. Costs nothing."""
    ema_update_interval: int = num(1, ge=1)
    """Update the EMA only after optimizer steps n with (n + 1) % interval == 0 (Flow-GRPO's
    ``update_step_interval``; its train scripts use 8: steps 7, 15, 23, ...). 1: every step. Needs
    train.ema_decay when > 1. Larger values cost less (one pass over the weights per update)."""


@dataclass
class RewardConfig:
    name: str = "shapes_binding_mean"
    """Registry name (jpeg_compressibility, shapes_binding, ...) or ``package.module:function``.
    ``multi`` combines ``components``; writing ``reward:`` as a YAML list means the same."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the reward's constructor (merged key by key: file, then each
    override)."""
    components: list[dict[str, Any]] | None = None
    """For name=multi: ``[{name, weight, kwargs, mean, std}, ...]``; the reward is the weighted sum
    of (score - mean) / std per component (mean 0 and std 1 unless given); each is logged."""
    asynchronous: bool = False
    """Score each sampling batch in a background thread while the next batch is sampled."""


@dataclass
class PromptConfig:
    source: str = "shapes/train_pair"
    """Prompt source: a registry name (ddpo/simple_animals, shapes/train, ...), ``list``, or one
    read from prompts.path: ``file`` (one prompt a line), ``jsonl``, ``csv`` or ``dataset`` (Hugging
    Face ``datasets``: needs ``pip install 'diffloop[datasets]'``). The other fields of a jsonl /
    csv / dataset row are the prompt's metadata, passed to the reward in training and evaluation."""
    path: str | None = None
    """File for source=file/jsonl/csv; hub id or local directory for source=dataset."""
    prompts: list[str] | None = None
    """Inline prompts (source=list)."""
    prompt_column: str = "prompt"
    """The field (JSONL key, CSV column, dataset column) holding the prompt (jsonl/csv/dataset)."""
    split: str = "train"
    """Dataset split (source=dataset)."""
    precompute_embeddings: bool = False
    """Before training, encode every training prompt, every evaluation prompt and
    sample.negative_prompt once, then free the text encoders: they take no accelerator memory
    during training (LoRA: deleted; full fine-tuning: kept in CPU memory for the export). Costs
    one pass over the prompt set at start and the embeddings' CPU memory; a prompt outside that
    set is then an error."""
    embedding_cache_dir: str | None = None
    """Also keep prompt embeddings on disk here (safetensors, one file per prompt), keyed by the
    text encoders' identity (config, weights, tokenizer), the encoding settings and the prompt:
    resumed runs and sweeps over the same model reuse them; a changed encoder or tokenizer reads
    none of them. Every training and evaluation prompt is looked up (encoded and written when
    missing) at start; hits and misses are logged once."""


@dataclass
class EvalConfig:
    prompts: str | None = "shapes/val_pair"
    """Held-out prompt source (registry name, e.g. shapes/val_pair, or file/jsonl/csv/dataset with
    eval.path); null disables evaluation. Row fields reach the reward as metadata, as in
    training."""
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
    num_steps: int | None = num(None, ge=1)
    """Sampler steps of the evaluation; null: the model's convention, which for flow-matching
    models is Flow-GRPO's evaluation (SD3: 40, FLUX: 28 steps) and for DDIM models (SD, SDXL, the
    shapes model) ``sample.num_steps``. Guidance and negative prompt are always ``sample.*``'s."""
    eta: float | None = num(
        None, ge=0, le=1,
        why="eta > 1 makes the DDIM variance's square root imaginary; 0 is deterministic",
    )  # fmt: skip
    """Stochasticity of the evaluation sampler, in [0, 1]: DDIM's eta, or the flow SDE's noise
    level (same kind, ``sample.sde_type``, on the ``sample.sde_window`` steps); 0 is deterministic
    (DDIM with eta 0, the flow ODE) and needs no log-probabilities. null: the model's convention,
    0 for flow-matching models (Flow-GRPO evaluates with noise level 0), ``sample.eta`` for DDIM
    models. ``diffloop eval RUN`` uses the same evaluation sampler by default."""


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
    """Show tqdm progress bars (stderr) for sampling, training and each held-out evaluation."""
    memory_plan: bool = True
    """Print the memory plan's peak and largest terms in the train header (``diffloop.memory``;
    ``check-config --gpu-memory`` prints the whole plan). Making it builds the model on the meta
    device and runs a meta forward: one to a few seconds at start."""


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
    """Speed options (docs/performance.md lists them and how to measure each). None changes the
    algorithm: the on-policy ratio stays 1 within the tolerance the run logs as
    ``onpolicy_logprob_err``."""

    compile: CompileTarget = "none"
    """torch.compile the UNet for: none, sampling (the no-grad loop), training (log-prob +
    backward), or all. Sampling and training then share one compiled module per mode."""
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
    """On Ampere+ GPUs run fp32 matmuls/convolutions in TF32 (as DDPO does). Both sampling and
    training use it, so the ratio stays 1; set false for bit-level fp32."""
    decode_batch_size: int = num(8, ge=1)
    """Images the VAE decodes at once (a memory knob for the low-memory setting)."""


@dataclass
class FSDPConfig:
    """Sharded training with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``;
    docs/distributed.md). Each process then holds 1/N of the denoiser's weights, gradients and
    optimizer states instead of a full copy; every block is gathered just before it runs."""

    enabled: bool = False
    """Shard the trained denoiser (UNet / transformer) over the processes, block by block (the
    model's ``_no_split_modules`` blocks), then the rest of it; under LoRA the frozen base is
    sharded too. Computes in train.mixed_precision, reduces gradients in fp32, keeps fp32 trainable
    weights. Needs a multi-process launch to save memory (1 process: a shard is the whole model)."""
    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward (gathered again for the backward): the
    least memory. false keeps them from the forward to the backward: fewer all-gathers, more
    memory (ZeRO-2-like)."""


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
    bookkeeping keys may differ (diffloop.resume.RESUME_MAY_CHANGE); any other difference is an
    error."""
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
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)
