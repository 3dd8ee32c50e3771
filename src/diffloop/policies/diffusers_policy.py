"""The DDIM policy over diffusers components: Stable Diffusion 1.x / 2.x, and the pixel-space shapes
model.

One class serves both because both are a ``UNet2DConditionModel`` conditioned on a CLIP-style text
encoder and sampled with DDIM; the only difference is whether a VAE maps latents to pixels (a
directory without ``vae/`` is pixel space). Each DDIM step with eta > 0 is a Gaussian policy step
whose log-density ``diffloop.core.ddim_step_with_logprob`` computes exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from diffloop.config import LoraConfig, ModelConfig, PerformanceConfig, SampleConfig
from diffloop.core import ddim_step_mean_std, ddim_step_with_logprob
from diffloop.policies.base import TrainableDenoiser, Trajectories, iter_chunks
from diffloop.policies.families import how_to_provide, model_path
from diffloop.policies.loading import ModelLoadError, resolve_pretrained  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def _how_to_provide(name: str) -> str:
    return how_to_provide("sd", name)


def _has_vae(path: str, model: ModelConfig) -> bool:
    local = Path(path)
    if local.is_dir():
        return (local / "vae").is_dir()
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path, revision=model.revision)
    except Exception as e:  # any failure: re-raised with the how-to
        raise ModelLoadError(
            f"could not read model_index.json of '{path}': {e}\n{_how_to_provide(path)}"
        ) from e
    return "vae" in index


def load_components(model: ModelConfig) -> dict[str, Any]:
    """Load unet, text_encoder, tokenizer, scheduler (DDIM) and vae (or None) from
    ``model.pretrained``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from diffloop.policies.schedulers import to_ddim

    path = model_path(model)  # a hub id: its cached snapshot, or the id once the hub answered
    local = Path(path)
    looks_local = local.is_absolute() or path.startswith(".") or local.exists()
    if looks_local and not local.is_dir():
        raise ModelLoadError(f"no directory at '{path}'. {_how_to_provide(model.pretrained)}")
    if local.is_dir():
        missing = [c for c in REQUIRED_COMPONENTS if not (local / c).is_dir()]
        if missing:
            raise ModelLoadError(
                f"'{path}' lacks the component folder(s) {', '.join(missing)}/. "
                + _how_to_provide(model.pretrained)
            )
    kw = {"revision": model.revision}
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", variant=model.variant, **kw
        ),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", variant=model.variant, **kw
        ),
        "tokenizer": lambda: AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        # Any diffusers scheduler config converts to DDIM (SD ships PNDM's, SDXL Euler's): read as
        # on disk (with _class_name) so the conversion knows what it converts; see
        # policies.schedulers.
        "scheduler": lambda: to_ddim(
            DDIMScheduler.load_config(path, subfolder="scheduler", **kw), model.scheduler_kwargs
        ),
    }
    if _has_vae(path, model):
        loaders["vae"] = lambda: AutoencoderKL.from_pretrained(
            path, subfolder="vae", variant=model.variant, **kw
        )
    components: dict[str, Any] = {"vae": None}
    for name, load in loaders.items():
        try:
            components[name] = load()
        except Exception as e:  # every loader failure gets the same how-to
            raise ModelLoadError(
                f"could not load the {name} of model.pretrained='{model.pretrained}' "
                f"(looked in '{path}', subfolder '{name}/'): {type(e).__name__}: {e}\n"
                + _how_to_provide(model.pretrained)
            ) from e
    return components


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
        if not t.is_floating_point():
            continue
        want = torch.float32 if pattern is not None and pattern.search(name) else dtype
        if t.dtype != want:
            t.data = t.data.to(want)
    return module.to(device)  # after the cast: an fp32 checkpoint never sits on the GPU whole


class DDIMPolicy(TrainableDenoiser):
    """A conditional UNet sampled with stochastic DDIM + classifier-free guidance, LoRA or full
    fine-tuning.

    Frozen weights live in ``weight_dtype`` (fp16/bf16 under mixed precision); trainable parameters
    are always fp32. ``logprob_reduction`` ("mean" as DDPO, or "sum") is how each step's log-density
    is reduced over latent elements; the PPO clip range must agree with it.
    """

    lora_loader = "StableDiffusionLoraLoaderMixin"
    """The diffusers loader mixin (in diffusers.loaders) whose save_lora_weights writes the LoRA."""
    lora_component = "unet"
    """The attribute holding the adapted module, also the loader's key prefix (diffloop.export)."""

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
    ) -> None:
        self.device = device
        self.performance = perf = performance or PerformanceConfig()
        self.weight_dtype = weight_dtype
        self.logprob_reduction = logprob_reduction
        self.unet = components["unet"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.scheduler = components["scheduler"]
        self.vae = components.get("vae")
        self.lora_config = lora if lora.enabled else None
        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                cast_frozen(module.requires_grad_(False), weight_dtype, device)
        self._set_attention(perf.attention)
        if self.lora_config is not None:
            self._add_lora(lora)
        else:
            self.unet.requires_grad_(True)
        # Trainable parameters in fp32 whatever the weight dtype: fp16 Adam updates underflow.
        for p in self.trainable_parameters():
            p.data = p.data.float()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self._num_steps: int | None = None
        if perf.merge_lora_for_sampling and self.lora_config is None:
            raise ValueError(
                "performance.merge_lora_for_sampling needs a LoRA adapter (lora.enabled=true)"
            )
        if perf.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self._unet_for = self._compiled_unets(perf)

    def _set_attention(self, backend: str) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())

    def _compiled_unets(self, perf: PerformanceConfig) -> dict[str, Any]:
        """The UNet callable for each use. Compiled uses wrap the same module (shared parameters):
        ``compile_mode`` applies to the sampling loop; training compiles in the default mode (CUDA
        graphs would keep a static copy of every activation the backward needs)."""
        uses = {"sampling": self.unet, "training": self.unet}
        for use in ("sampling", "training"):
            if perf.compile in (use, "all"):
                mode = perf.compile_mode if use == "sampling" else "default"
                options = (
                    {"mode": mode}
                    if perf.compile_backend == "inductor" and mode != "default"
                    else {}
                )
                uses[use] = torch.compile(self.unet, backend=perf.compile_backend, **options)
        return uses

    # ------------------------------------------------------------------ parameters

    def _add_lora(self, lora: LoraConfig) -> None:
        from peft import LoraConfig as PeftLoraConfig

        self.peft_config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            init_lora_weights="gaussian",
            target_modules=list(lora.target_modules),
        )
        try:
            self.unet.add_adapter(self.peft_config)
        except ValueError as e:
            raise ValueError(
                f"lora.target_modules={lora.target_modules} matched no UNet module "
                f"({e}); use names such "
                "as to_q, to_k, to_v, to_out.0"
            ) from e

    # ------------------------------------------------------------------ model calls

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """prompts (N,) -> text embeddings (N, L, D) in weight dtype."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @contextlib.contextmanager
    def uncompiled(self):
        """Every use runs the plain module inside the block (FLOP counting, debugging)."""
        saved, self._unet_for = self._unet_for, {use: self.unet for use in self._unet_for}
        try:
            yield
        finally:
            self._unet_for = saved

    @contextlib.contextmanager
    def _lora_merged(self):
        """LoRA folded into the base weights (W <- W + s B A) inside the block; afterwards the exact
        base weights are copied back (peft's unmerge subtracts, which is not bit-exact)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        if not layers or any(
            layer.disable_adapters for layer in layers
        ):  # reference(): nothing to merge
            yield
            return
        saved = [m.get_base_layer().weight.detach().clone() for m in layers]
        for layer in layers:
            layer.merge()
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, weight in zip(layers, saved):
                    layer.unmerge()
                    layer.get_base_layer().weight.copy_(weight)

    @torch.no_grad()
    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """(prompt_embeds (N, L, D), negative_prompt_embeds (N, L, D), extra) stored with the
        trajectories and reused exactly when log-probs are recomputed. ``extra`` holds whatever
        further conditioning a model family needs (None here; SDXL's pooled embeddings and time
        ids)."""
        n = len(prompts)
        return self.encode_prompts(prompts), self.encode_prompts([negative_prompt] * n), None

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor] | None, negative: bool
    ) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments for one CFG branch (the conditional one, or the
        unconditional one when ``negative``); a family with more conditioning overrides this."""
        return {"encoder_hidden_states": embeds}

    def unet_conditioning(self, prompts: list[str]) -> dict[str, Any]:
        """The UNet's keyword arguments for the conditional branch of ``prompts``, for callers that
        run the UNet directly (export checks, FLOP counts)."""
        embeds, _, extra = self.conditioning(prompts, "")
        return self.branch_kwargs(embeds, extra, negative=False)

    def _guided_prediction(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        guidance_scale: float,
        use: str = "training",
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """CFG: uncond + g (cond - uncond), in one UNet call on the batch [negative; positive] (the
        order diffusers uses). Shapes: (N, C, H, W).

        ``use`` picks the sampling or the training UNet callable (the same module, maybe
        compiled)."""
        dtype = self.weight_dtype
        unet = self._unet_for[use]
        memory_format = (
            torch.channels_last if self.performance.channels_last else torch.preserve_format
        )
        cond = self.branch_kwargs(prompt_embeds, extra, negative=False)
        if guidance_scale == 1.0:
            x = latents.to(dtype=dtype, memory_format=memory_format)
            return unet(x, timesteps, **cat_branches([cond], dtype)).sample
        uncond = self.branch_kwargs(negative_prompt_embeds, extra, negative=True)
        out = unet(
            torch.cat([latents, latents]).to(dtype=dtype, memory_format=memory_format),
            torch.cat([timesteps, timesteps]),
            **cat_branches([uncond, cond], dtype),
        ).sample
        uncond_out, cond_out = out.float().chunk(2)
        return uncond_out + guidance_scale * (cond_out - uncond_out)

    def _set_steps(self, num_steps: int) -> None:
        if self._num_steps != num_steps:
            self.scheduler.set_timesteps(num_steps, device=self.device)
            self._num_steps = num_steps

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        generators: list[torch.Generator],
        *,
        num_steps: int,
        eta: float,
        guidance_scale: float,
        negative_prompt: str = "",
    ) -> Trajectories:
        """Sample len(prompts) trajectories; generator i alone drives sample i's initial noise and
        steps.

        eta = 0 gives deterministic DDIM (for evaluation); its log-probs are NaN (a point mass)."""
        if len(generators) != len(prompts):
            raise ValueError(
                f"need one generator per prompt, got {len(generators)} for {len(prompts)}"
            )
        self._set_steps(num_steps)
        n = len(prompts)
        prompt_embeds, negative_embeds, extra = self.conditioning(prompts, negative_prompt)
        shape = self.latent_shape()
        x = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in generators])
        x = x * self.scheduler.init_noise_sigma
        latents, log_probs = [x], []
        timesteps = self.scheduler.timesteps
        merged = (
            self.performance.merge_lora_for_sampling
        )  # the constructor checked there is an adapter
        with self._lora_merged() if merged else contextlib.nullcontext():
            for t in timesteps:
                t_batch = t.expand(n).to(self.device)
                x, log_prob = self._sample_step(
                    x,
                    t_batch,
                    prompt_embeds,
                    negative_embeds,
                    extra,
                    guidance_scale,
                    eta,
                    generators,
                )
                latents.append(x)
                log_probs.append(log_prob)
        return Trajectories(
            latents=torch.stack(latents, dim=1),
            timesteps=timesteps.to(self.device).unsqueeze(0).expand(n, -1).clone(),
            log_probs=torch.stack(log_probs, dim=1).float(),
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            images=self.decode(x, self.performance.decode_batch_size),
            extra=extra,
        )

    def _sample_step(
        self,
        x: torch.Tensor,
        t_batch: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        extra: dict[str, torch.Tensor] | None,
        guidance_scale: float,
        eta: float,
        generators: list[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step of the sampling loop: (x_{t-1} (N, C, H, W), log p (N,); NaN when eta =
        0)."""
        n = len(x)
        with self._autocast():
            model_output = self._guided_prediction(
                x, t_batch, prompt_embeds, negative_embeds, guidance_scale, "sampling", extra
            )
        if eta > 0:
            x, log_prob = ddim_step_with_logprob(
                self.scheduler,
                model_output.float(),
                t_batch,
                x,
                eta,
                generator=generators,
                logprob_reduction=self.logprob_reduction,
            )
        else:  # deterministic DDIM (evaluation): no density, log-probs are NaN
            x = ddim_step_mean_std(self.scheduler, model_output.float(), t_batch, x, 0.0)[0]
            log_prob = torch.full((n,), float("nan"), device=x.device)
        return x, log_prob

    def step_distribution(
        self, traj: Trajectories, step: torch.Tensor, *, eta: float, guidance_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (M, C, H, W) and std (M, 1, 1, 1) of p_theta(x_{t-1} | x_t, c) at per-sample
        ``step`` (M,).

        The same ``ddim_step_mean_std`` the sampler used, so ``gaussian_log_prob`` of the recorded
        x_{t-1} under it reproduces the sampled log-prob exactly at the sampling parameters."""
        self._set_steps(traj.timesteps.shape[1])
        rows = torch.arange(len(traj), device=step.device)
        x_t = traj.latents[rows, step]
        t = traj.timesteps[rows, step]
        with self._autocast():
            model_output = self._guided_prediction(
                x_t,
                t,
                traj.prompt_embeds,
                traj.negative_prompt_embeds,
                guidance_scale,
                "training",
                traj.extra,
            )
        mean, std, _ = ddim_step_mean_std(self.scheduler, model_output.float(), t, x_t, eta)
        return mean, std

    def stored_steps(self, num_steps: int) -> int:
        """Every DDIM step is stochastic and stored."""
        return num_steps

    def step_stds(self, num_steps: int, eta: float) -> torch.Tensor:
        """(T,) sigma_t of each sampled step at ``num_steps`` and ``eta``
        (``core.ddim_step_mean_std``)."""
        self._set_steps(num_steps)
        shape = (len(self.scheduler.timesteps), 1)
        t = self.scheduler.timesteps.to(self.device)
        zeros = torch.zeros(shape, device=self.device)
        return ddim_step_mean_std(self.scheduler, zeros, t, zeros, eta)[1].reshape(-1)

    def check_sampling(self, num_steps: int, eta: float) -> None:
        """Raise ConfigError unless every sampled step has a positive finite std (else its
        log-density is NaN or infinite and one update makes every trained weight NaN)."""
        from diffloop.config import ConfigError

        stds = self.step_stds(num_steps, eta)
        bad = [j for j, v in enumerate(stds.tolist()) if not (math.isfinite(v) and v > 0)]
        if not bad:
            return
        j = bad[0]
        t = int(self.scheduler.timesteps[j])
        final = j == len(stds) - 1
        if final and float(self.scheduler.final_alpha_cumprod) == 1.0:
            fix = (
                "the scheduler has set_alpha_to_one=true: set "
                "model.scheduler_kwargs.set_alpha_to_one=false"
            )
        else:
            fix = (
                "the step's previous alpha_cumprod equals its own (timestep 0 is sampled?): set "
                "model.scheduler_kwargs.timestep_spacing=leading and "
                "model.scheduler_kwargs.steps_offset=1 "
                "(as Stable Diffusion ships)"
            )
        raise ConfigError(
            f"sample.num_steps={num_steps}, sample.eta={eta}: DDIM step {j + 1} of "
            f"{len(stds)} (timestep "
            f"{t}) has std {stds[j].item():.3g}, so its log-probability is undefined; {fix}"
        )

    def _autocast(self):
        enabled = self.weight_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=enabled)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Final latents (N, C, h, w) -> images (N, 3, H, W) float32 in [0, 1]."""
        if self.vae is None:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        images = []
        for chunk in iter_chunks(len(latents), batch_size):
            z = latents[chunk].to(self.vae.dtype) / self.vae.config.scaling_factor
            images.append(self.vae.decode(z).sample.float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ export

    def export(self, path: str | Path) -> None:
        """LoRA: diffusers LoRA weights (``StableDiffusionPipeline.load_lora_weights(path)`` loads
        them), written by ``diffloop.export.save_lora`` through ``lora_loader``. Full fine-tuning: a
        complete pipeline directory (``from_pretrained(path)``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.lora_config is not None:
            from diffloop.export.lora_files import save_lora

            save_lora(self, path)
            return
        self.unet.save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
            index = {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            }
            (path / "model_index.json").write_text(json.dumps(index, indent=2))


def load_ddim_policy(
    model: ModelConfig,
    lora: LoraConfig,
    *,
    device: torch.device,
    weight_dtype: torch.dtype = torch.float32,
    logprob_reduction: str = "mean",
    gradient_checkpointing: bool = False,
    performance: PerformanceConfig | None = None,
    sample: SampleConfig | None = None,
) -> DDIMPolicy:
    """``load_policy`` for the sd family (SD 1.x / 2.x and the shapes model); ``sample`` (the
    flow-matching sampler settings every family's loader is given) is not used by DDIM."""
    components = load_components(model)
    return DDIMPolicy(
        components,
        lora,
        device=device,
        weight_dtype=weight_dtype,
        logprob_reduction=logprob_reduction,
        gradient_checkpointing=gradient_checkpointing,
        performance=performance,
    )


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
