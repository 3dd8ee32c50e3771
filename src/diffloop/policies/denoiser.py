"""The one base of every model family's policy: what SD 1.x/2.x, SDXL, SD3 and FLUX share.

``DenoiserPolicy`` owns, for every family:

- loading (``from_model``): the family's component table (``families.FAMILIES``) through the one
  loader (``loading.load_components``), the model's settings handed to the constructor;
- the frozen components (text encoders, VAE): no gradients, eval mode, in the weight dtype except
  what transformers keeps in fp32 (``cast_frozen``), the VAE in fp32 where its config says
  ``force_upcast`` and the family's pipeline upcasts;
- the trained parameters (``lora_component``: the UNet or the transformer): a LoRA adapter (peft,
  fp32 trainables; ``policies.lora``) or full fine-tuning, their state, train/eval mode, and the
  reference model (the adapter disabled: no second copy in memory);
- the resolution (``model.resolution``) and its check against the VAE and the denoiser's patches;
- autocast, the classifier-free guidance of two branches (``guided``: one call on [negative;
  positive], or one call per branch, then ``combine_guidance``), decoding, the direct denoiser
  call's conditioning (``unet_conditioning``), the zero-std scan of ``check_sampling``, the one
  generator per prompt of ``sample``, and the export (LoRA file, or the family's full pipeline).

The text side (the text encoders, their placement by ``model.text_encoder_device``, the
prompt-embedding cache of ``encoded`` and the family's ``encode_uncached`` hook) is
``text_encoding.TextEncoding``, a mixin of this base.

A sampler base (``DDIMPolicy``, ``FlowMatchPolicy``) adds its sampling loop and training step; a
family adds its conditioning and whatever else differs, through the hooks below (each says its
default). docs/adding_a_family.md lists them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffloop.config import (
    LoraConfig,
    ModelConfig,
    PerformanceConfig,
    SampleConfig,
    cfg_evaluations_per_step,
)
from diffloop.policies.base import CheckpointMismatchError, iter_chunks
from diffloop.policies.families import family, how_to_provide, locate
from diffloop.policies.loading import (
    Component,
    ModelFiles,
    ModelLoadError,
    QuantizedLoad,
    from_pretrained,
    load_components,
)
from diffloop.policies.lora import add_lora, save_lora, trainables_to_fp32
from diffloop.policies.quantization import is_quantized_tensor
from diffloop.policies.text_encoding import (
    TEXT_ENCODER_DEVICES,  # noqa: F401 (re-exported)
    TextEncoding,
)

logger = logging.getLogger(__name__)

Branches = list[dict[str, Any]]
"""The CFG branches' keyword arguments of one denoiser call, [negative, positive] or [positive]."""


def keep_in_fp32_patterns(module: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Name patterns of the weights transformers keeps in fp32 when it loads ``module`` in
    ``dtype`` (transformers 5.24 ``PreTrainedModel._get_dtype_plan``): ``_keep_in_fp32_modules``
    for fp16 only (T5's ``wo``, whose activations overflow fp16's range; bf16 has fp32's range) and
    ``_keep_in_fp32_modules_strict`` for fp16 and bf16. None for other modules (diffusers' UNets,
    transformers and VAEs of the supported families declare none)."""
    from transformers import PreTrainedModel

    if not isinstance(module, PreTrainedModel) or dtype not in (torch.float16, torch.bfloat16):
        return []
    keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(module._keep_in_fp32_modules or ())
    return sorted(keep)


def cast_frozen(
    module: torch.nn.Module, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """A frozen component on ``device`` in ``dtype``, as ``from_pretrained(dtype=...)`` would load
    it: floating parameters and buffers whose names match ``keep_in_fp32_patterns`` (searched in
    the name, '*' = any characters, as transformers matches its dtype plan) are fp32, the others
    ``dtype``; integer tensors are untouched; only what differs is cast. A plain
    ``module.to(dtype)`` would put T5's fp32-kept ``wo`` in fp16, where its output overflows."""
    keep = keep_in_fp32_patterns(module, dtype)
    pattern = re.compile("|".join(p.replace("*", ".*") for p in keep)) if keep else None
    for name, t in chain(module.named_parameters(), module.named_buffers()):
        if not t.is_floating_point() or is_quantized_tensor(t):  # a backend's storage: as loaded
            continue
        want = torch.float32 if pattern is not None and pattern.search(name) else dtype
        if t.dtype != want:
            t.data = t.data.to(want)
    return module.to(device)  # after the cast: an fp32 checkpoint never sits on the GPU whole


def cat_branches(branches: list[dict[str, Any]], dtype: torch.dtype) -> dict[str, Any]:
    """Concatenate the CFG branches' keyword arguments (nested dicts of (N, ...) tensors) along the
    batch dimension, in ``dtype``."""
    first = branches[0]
    return {
        k: cat_branches([b[k] for b in branches], dtype)
        if isinstance(first[k], dict)
        else torch.cat([b[k] for b in branches]).to(dtype)
        for k in first
    }


def first_bad_step(stds: torch.Tensor) -> int | None:
    """Index of the first std that is not positive and finite (its Gaussian has no density), or
    None: ``check_sampling``'s scan."""
    bad = [j for j, v in enumerate(stds.tolist()) if not (math.isfinite(v) and v > 0)]
    return bad[0] if bad else None


def sample_size(config: Any) -> int:
    """A denoiser config's ``sample_size`` (an int, or (h, w) of a square)."""
    size = config.sample_size
    return size if isinstance(size, int) else size[0]


class DenoiserPolicy(TextEncoding):
    """The base of every family's policy (module docstring). Class attributes and methods marked
    "hook" are what a family sets or overrides; the rest is shared."""

    # ---------------------------------------------------------------- what a family declares
    family_name: ClassVar[str] = ""
    """Its row of ``families.FAMILIES`` (component table, pipeline class, messages)."""
    label: ClassVar[str] = ""
    """The family in messages ("SDXL")."""
    lora_component: ClassVar[str] = "unet"
    """The attribute holding the trained module (the loader mixin's key prefix too)."""
    lora_loader: ClassVar[str] = ""
    """The diffusers loader mixin (in ``diffusers.loaders``) whose ``save_lora_weights`` writes
    the adapter."""
    DEFAULT_LORA_TARGETS: ClassVar[list[str] | None] = None
    """peft targets when ``lora.target_modules`` is left at its (SD UNet) default; None: as
    given."""
    model_path: str | None = None
    """Where ``from_model`` read the components (the weight files the disk cache's key reads)."""
    settings_field: ClassVar[str | None] = None
    """The ``model.<field>`` section handed to the constructor by that name (``sdxl``, ``sd3``)."""
    index_config: ClassVar[dict[str, Any]] = {}
    """Pipeline settings read from model_index.json, {name: default}: attributes of the policy
    and keywords of the full export's pipeline (SDXL's force_zeros_for_empty_prompt)."""
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}
    """Further keywords of the full export's pipeline (SDXL: add_watermarker=False)."""
    upcast_vae: ClassVar[bool] = True
    """A VAE whose config says force_upcast decodes in fp32, as the family's pipeline does."""
    vae_note: ClassVar[str] = ""
    """Said after "the VAE decodes in fp32" (where an fp16-safe VAE is set)."""
    guidance_distilled: ClassVar[bool] = False
    """The guidance scale is a model input (FLUX.1-dev), not a second, unconditional branch."""
    batch_branches: ClassVar[bool] = True
    """CFG runs both branches in one call on [negative; positive] (the pipelines' order); False:
    one call per branch (branches whose text lengths or masks differ, as Qwen-Image's)."""
    supported_performance: ClassVar[tuple[str, ...]] = ()
    """``performance.*`` speed options the family implements; any other set is refused."""
    pack_factor: ClassVar[int] = 1
    """Side of the latent patches folded into one token (FLUX: 2)."""
    extra_keys: ClassVar[tuple[str, ...]] = ()
    """``Trajectories.extra`` entries ``branch_kwargs`` reads (``check_extra``)."""

    def __init__(
        self,
        components: dict[str, Any],
        lora: LoraConfig,
        *,
        device: torch.device,
        weight_dtype: torch.dtype = torch.float32,
        logprob_reduction: str = "mean",
        gradient_checkpointing: bool = False,
        performance: PerformanceConfig | None = None,
        sample: SampleConfig | None = None,
        resolution: int | None = None,
        text_encoder_device: str = "accelerator",
    ) -> None:
        self.device = device
        self.init_text_encoding(text_encoder_device)
        self.performance = performance or PerformanceConfig()
        self.check_performance(self.performance)
        self.weight_dtype = weight_dtype
        self.logprob_reduction = logprob_reduction
        self.resolution = resolution
        self.sample_settings = sample or SampleConfig()
        """``sample.*``: the flow sampler's settings (DDIM is given its settings per call)."""
        self.lora_config = lora if lora.enabled else None
        self.components = {**self.index_config, **components}
        table = [c.name for c in family(self.family_name).components]
        for name in dict.fromkeys([*table, *self.components]):  # an absent optional one: None
            setattr(self, name, self.components.get(name))
        self.freeze_text_encoders(weight_dtype)
        self._freeze(self.denoiser, weight_dtype)
        if self.vae is not None:
            self._freeze(self.vae, self.vae_dtype())
        self.vae_scale_factor = self.vae_downsampling()
        self.check_resolution()
        self.prepare_denoiser()
        if self.lora_config is not None:
            self.peft_config = add_lora(self.denoiser, lora, self.DEFAULT_LORA_TARGETS)
        else:
            self.denoiser.requires_grad_(True)
        trainables_to_fp32(self.trainable_parameters())
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.denoiser.train()
        self._num_steps: int | None = None  # the steps the scheduler is set to (sampler bases)
        self.finish_denoiser()
        self.check_model()

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_model(
        cls, model: ModelConfig, lora: LoraConfig, *, files: ModelFiles | None = None, **kwargs: Any
    ) -> DenoiserPolicy:
        """The policy of ``model`` (``files``: where ``families.locate`` found it, else located
        here): every component of the family's table loaded (``load_component``), the settings
        ``model.resolution`` and ``model.<settings_field>``; ``kwargs``: the constructor's."""
        files = files or locate(model)
        components = load_components(
            model,
            family(cls.family_name).components,
            files,
            how_to_provide(cls.family_name, model.pretrained),
            cls.load_component,
            QuantizedLoad(kwargs.get("weight_dtype", torch.float32), kwargs.get("device", "cpu")),
        )
        for name, default in cls.index_config.items():
            components[name] = type(default)((files.index or {}).get(name, default))
        if cls.settings_field is not None:
            kwargs[cls.settings_field] = getattr(model, cls.settings_field)
        kwargs.setdefault("text_encoder_device", model.text_encoder_device)
        policy = cls(components, lora, resolution=model.resolution, **kwargs)
        policy.model_path = files.path
        return policy

    @classmethod
    def load_component(cls, component: Component, path: str, model: ModelConfig) -> Any:
        """Hook: load one component of the table (default: its class's ``from_pretrained``)."""
        return from_pretrained(component, path, model)

    # ---------------------------------------------------------------- setup hooks

    def check_performance(self, perf: PerformanceConfig) -> None:
        """Refuse a ``performance.*`` speed option the family does not implement."""
        default = PerformanceConfig()
        names = ("compile", "channels_last", "merge_lora_for_sampling", "attention")
        bad = [
            n
            for n in names
            if n not in self.supported_performance and getattr(perf, n) != getattr(default, n)
        ]
        if bad:
            raise ValueError(
                f"performance.{bad[0]}={getattr(perf, bad[0])!r} is not supported for "
                f"{self.label} models; leave it at {getattr(default, bad[0])!r}"
            )

    def _freeze(
        self, module: torch.nn.Module, dtype: torch.dtype, device: torch.device | None = None
    ) -> torch.nn.Module:
        """A frozen component: no gradients, eval mode (a model built in code starts in train mode,
        and T5's dropout would then make the text conditioning random), in ``dtype`` on ``device``
        (default the policy's), except the weights transformers keeps in fp32 at that dtype
        (``cast_frozen``: T5's ``wo`` in fp16)."""
        return cast_frozen(module.requires_grad_(False).eval(), dtype, device or self.device)

    def vae_dtype(self) -> torch.dtype:
        """fp32 for a force_upcast VAE where the family's pipeline upcasts (never through fp16:
        SDXL's VAE overflows there), else the weight dtype."""
        if self.upcast_vae and self.vae.config.force_upcast:
            if self.weight_dtype != torch.float32:
                logger.info(
                    "%s: the VAE decodes in fp32 (force_upcast)%s", self.label, self.vae_note
                )
            return torch.float32
        return self.weight_dtype

    def vae_downsampling(self) -> int:
        """Hook: pixels per latent element along a side (1 without a VAE: pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def prepare_denoiser(self) -> None:
        """Hook: set up the denoiser before the adapter goes in (DDIM: the attention backend)."""

    def finish_denoiser(self) -> None:
        """Hook: set up what wraps the adapted denoiser (DDIM: channels-last, compiled calls)."""

    def check_model(self) -> None:
        """Hook: refuse a model this policy would run wrongly, saying why (not a shape error
        later)."""

    # ---------------------------------------------------------------- resolution

    def default_image_size(self) -> int:
        """Hook: the image side without ``model.resolution``: the denoiser's sample_size x the
        VAE's downsampling."""
        return sample_size(self.denoiser.config) * self.vae_scale_factor

    def image_size(self) -> int:
        """Square image side (pixels): ``model.resolution``, else ``default_image_size()``."""
        return self.resolution if self.resolution is not None else self.default_image_size()

    def latent_size(self) -> int:
        """Latent side (before packing): ``image_size() / vae_scale_factor``."""
        return self.image_size() // self.vae_scale_factor

    def check_resolution(self) -> None:
        """ModelLoadError unless the image side is a multiple of the VAE's downsampling x the
        denoiser's patch size x the packing."""
        patch = getattr(self.denoiser.config, "patch_size", None) or 1
        multiple = self.vae_scale_factor * patch * self.pack_factor
        if self.image_size() % multiple:
            raise ModelLoadError(
                f"model.resolution={self.image_size()} must be a multiple of {multiple} (the "
                "VAE's downsampling x the denoiser's patch size x the latent packing)"
            )

    # ---------------------------------------------------------------- parameters

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.lora_component)

    def evaluations_per_step(self, guidance_scale: float) -> int:
        """Denoiser evaluations per sample in one step: 2 with a guidance branch, else 1."""
        return cfg_evaluations_per_step(guidance_scale) if self.cfg_active(guidance_scale) else 1

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.denoiser.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_trainable_parameters().values())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named_trainable_parameters().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the trainable parameters; CheckpointMismatchError (one line) when
        its names or shapes are not this model's (another run's checkpoint, other lora.*
        settings)."""
        params = self.named_trainable_parameters()
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"checkpoint does not match the model: {len(missing)} missing and "
                f"{len(unexpected)} unexpected parameters (e.g. "
                f"{sorted(missing or unexpected)[:3]}); was it written with other lora.* or "
                "model.* settings?"
            )
        reshaped = [n for n, p in params.items() if state[n].shape != p.shape]
        if reshaped:
            name = reshaped[0]
            raise CheckpointMismatchError(
                f"checkpoint does not match the model: {len(reshaped)} parameters have other "
                f"shapes (e.g. {name}: {tuple(state[name].shape)} in the checkpoint, "
                f"{tuple(params[name].shape)} here); was it written with another lora.rank?"
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.device, p.dtype))

    def train(self, mode: bool = True) -> None:
        self.denoiser.train(mode)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The base model: LoRA adapters disabled (no second denoiser copy in memory)."""
        if self.lora_config is None:
            raise NotImplementedError("a reference model needs LoRA (lora.enabled=true)")
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    # ---------------------------------------------------------------- conditioning hooks

    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """Hook: (prompt_embeds (N, L, D), negative_prompt_embeds (N, L', D), extra {name: (N,
        ...)} or None): the family's text encoding of the prompts and of the negative prompt,
        stored with the trajectories and reused exactly when log-probs are recomputed."""
        raise NotImplementedError

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor] | None, negative: bool
    ) -> dict[str, Any]:
        """Hook: the denoiser's per-sample conditioning keywords of one CFG branch (the
        conditional one, or the unconditional one when ``negative``); default the embeddings as
        ``encoder_hidden_states``."""
        return {"encoder_hidden_states": embeds}

    def check_extra(self, extra: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``extra`` when it holds every key of ``extra_keys``, else ValueError."""
        if extra is None or any(k not in extra for k in self.extra_keys):
            raise ValueError(
                f"{self.label} trajectories need extra={list(self.extra_keys)} (sampled by "
                "another policy?)"
            )
        return extra

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """prompts (N,) -> the cross-attention embeddings (N, L, D) of ``conditioning``."""
        return self.conditioning(prompts, "")[0]

    def direct_kwargs(self, kwargs: dict[str, Any], n: int) -> dict[str, Any]:
        """Hook: the keywords a direct denoiser call adds to a branch's (flow: positions and the
        guidance embedding's input)."""
        return kwargs

    def unet_conditioning(self, prompts: list[str]) -> dict[str, Any]:
        """The denoiser's keyword arguments for the conditional branch of ``prompts``, for callers
        that run ``self.unet`` directly (export checks, FLOP counts)."""
        embeds, _, extra = self.conditioning(prompts, "")
        return self.direct_kwargs(self.branch_kwargs(embeds, extra, negative=False), len(prompts))

    # ---------------------------------------------------------------- the model call

    def _autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.weight_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=enabled)

    def uncompiled(self) -> contextlib.AbstractContextManager:
        """Every use runs the plain modules inside the block (FLOP counting, debugging)."""
        return contextlib.nullcontext()

    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, branches: Branches, guidance_scale: float, use: str
    ) -> torch.Tensor:
        """Hook (of the sampler base): one denoiser call on x (B, ...) at scheduler timesteps t
        (B,), the branches' keywords concatenated along the batch; the raw output (B, ...)."""
        raise NotImplementedError

    def cfg_active(self, guidance_scale: float) -> bool:
        """Hook: whether a step runs an unconditional branch: guidance_scale != 1 and the model is
        not guidance-distilled."""
        return guidance_scale != 1.0 and not self.guidance_distilled

    def combine_guidance(
        self, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """Hook: CFG's combination of the two branches' outputs (float32): uncond + g (cond -
        uncond)."""
        return uncond + guidance_scale * (cond - uncond)

    def guided(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        negative: torch.Tensor,
        extra: dict[str, torch.Tensor] | None,
        guidance_scale: float,
        use: str = "training",
    ) -> torch.Tensor:
        """The guided output (N, ...) float32 at x (N, ...), scheduler timesteps t (N,): one
        branch without guidance (``cfg_active``), else ``combine_guidance`` of both, run in one
        call on [negative; positive] (``batch_branches``) or one call each. ``use`` picks the
        sampling or the training callable of the denoiser (the same module, maybe compiled)."""
        cond = self.branch_kwargs(embeds, extra, negative=False)
        with self._autocast():
            if not self.cfg_active(guidance_scale):
                return self.denoise(x, t, [cond], guidance_scale, use).float()
            uncond = self.branch_kwargs(negative, extra, negative=True)
            if self.batch_branches:
                x2, t2 = torch.cat([x, x]), torch.cat([t, t])
                out = self.denoise(x2, t2, [uncond, cond], guidance_scale, use).float()
                uncond_out, cond_out = out.chunk(2)
            else:
                uncond_out = self.denoise(x, t, [uncond], guidance_scale, use).float()
                cond_out = self.denoise(x, t, [cond], guidance_scale, use).float()
        return self.combine_guidance(cond_out, uncond_out, guidance_scale)

    # ---------------------------------------------------------------- sampling checks

    @staticmethod
    def check_generators(prompts: Sequence[str], generators: Sequence[torch.Generator]) -> None:
        """ValueError unless there is one generator per prompt (generator i drives sample i)."""
        if len(generators) != len(prompts):
            raise ValueError(
                f"need one generator per prompt, got {len(generators)} for {len(prompts)}"
            )

    # ---------------------------------------------------------------- decoding

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Hook: final latents (N, ...) -> the VAE decoder's input: latents / scaling_factor +
        shift_factor, in the VAE's dtype."""
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents.float() / config.scaling_factor + shift).to(self.vae.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Final latents (N, ...) -> images (N, 3, H, W) float32 in [0, 1], ``batch_size`` at a
        time through the VAE (pixel space: the latents themselves, in [-1, 1])."""
        if self.vae is None:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        images = []
        for chunk in iter_chunks(len(latents), batch_size):
            images.append(self.vae.decode(self.vae_input(latents[chunk])).sample.float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    # ---------------------------------------------------------------- export

    def export(self, path: str | Path) -> None:
        """LoRA: diffusers LoRA weights (``<pipeline>.load_lora_weights(path)`` loads them, with
        lora_alpha in the metadata), written through ``lora_loader``. Full fine-tuning: the
        family's complete pipeline (``save_pipeline``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.lora_config is not None:
            save_lora(self, path)
        else:
            self.save_pipeline(path)

    def save_pipeline(self, path: Path) -> None:
        """Hook: the full fine-tune as the family's diffusers pipeline (``from_pretrained(path)``),
        with the components the policy samples with (its scheduler, its VAE) and
        ``index_config`` / ``pipeline_kwargs``."""
        import diffusers

        pipeline = getattr(diffusers, family(self.family_name).pipeline_class)
        keys = set(inspect.signature(pipeline.__init__).parameters) - {"self"}
        parts = {k: v for k, v in self.components.items() if k in keys}
        pipeline(**parts, **self.pipeline_kwargs).save_pretrained(str(path))
