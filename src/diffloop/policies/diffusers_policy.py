"""The DDIM policy over diffusers components: Stable Diffusion 1.x / 2.x, and the pixel-space shapes
model.

One class serves both because both are a ``UNet2DConditionModel`` conditioned on a CLIP-style text
encoder and sampled with DDIM; the only difference is whether a VAE maps latents to pixels (a
directory without ``vae/`` is pixel space). Each DDIM step with eta > 0 is a Gaussian policy step
whose log-density ``diffloop.core.ddim_step_with_logprob`` computes exactly. What every family
shares (loading, freezing, LoRA, autocast, CFG, decoding, export) is ``DenoiserPolicy``'s; this
file holds DDIM's sampler and training step, the UNet's speed options and SD's conditioning.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from diffloop.config import LoraConfig, ModelConfig, PerformanceConfig
from diffloop.core import ddim_step_mean_std, ddim_step_with_logprob
from diffloop.policies.base import Trajectories
from diffloop.policies.denoiser import (
    Branches,
    DenoiserPolicy,
    cast_frozen,  # noqa: F401 (re-exported)
    cat_branches,
    first_bad_step,
    keep_in_fp32_patterns,  # noqa: F401 (re-exported)
)
from diffloop.policies.embedding_cache import Rows, each_alone, repeat_rows
from diffloop.policies.families import family
from diffloop.policies.loading import Component, ModelLoadError, resolve_pretrained  # noqa: F401
from diffloop.policies.lora import lora_merged

REQUIRED_COMPONENTS = tuple(family("sd").folders())


class DDIMPolicy(DenoiserPolicy):
    """A conditional UNet sampled with stochastic DDIM + classifier-free guidance, LoRA or full
    fine-tuning.

    Frozen weights live in ``weight_dtype`` (fp16/bf16 under mixed precision); trainable parameters
    are always fp32. ``logprob_reduction`` ("mean" as DDPO, or "sum") is how each step's log-density
    is reduced over latent elements; the PPO clip range must agree with it.
    """

    family_name = "sd"
    label = "Stable Diffusion"
    lora_loader = "StableDiffusionLoraLoaderMixin"
    lora_component = "unet"
    upcast_vae = False  # StableDiffusionPipeline decodes in the weight dtype
    supported_performance = ("compile", "channels_last", "merge_lora_for_sampling", "attention")

    @classmethod
    def load_component(cls, component: Component, path: str, model: ModelConfig) -> Any:
        """Any diffusers scheduler config converts to DDIM (SD ships PNDM's, SDXL Euler's): read as
        on disk (with _class_name) so the conversion knows what it converts (policies.schedulers);
        the other components as the base loads them."""
        if component.name != "scheduler":
            return super().load_component(component, path, model)
        from diffusers import DDIMScheduler

        from diffloop.policies.schedulers import to_ddim

        config = DDIMScheduler.load_config(path, subfolder="scheduler", revision=model.revision)
        return to_ddim(config, model.scheduler_kwargs)

    def prepare_denoiser(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        sdpa = self.performance.attention == "sdpa"
        self.unet.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())

    def finish_denoiser(self) -> None:
        """The speed options over the adapted UNet: channels-last memory, compiled callables."""
        perf = self.performance
        if perf.merge_lora_for_sampling and self.lora_config is None:
            raise ValueError(
                "performance.merge_lora_for_sampling needs a LoRA adapter (lora.enabled=true)"
            )
        if perf.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self._unet_for = self._compiled_unets(perf)

    def _compiled_unets(self, perf: PerformanceConfig) -> dict[str, Any]:
        """The UNet callable for each use. Compiled uses wrap the same module (shared parameters):
        ``compile_mode`` applies to the sampling loop; training compiles in the default mode (CUDA
        graphs would keep a static copy of every activation the backward needs)."""
        uses = {"sampling": self.unet, "training": self.unet}
        for use in ("sampling", "training"):
            if perf.compile in (use, "all"):
                mode = perf.compile_mode if use == "sampling" else "default"
                inductor = perf.compile_backend == "inductor" and mode != "default"
                options = {"mode": mode} if inductor else {}
                uses[use] = torch.compile(self.unet, backend=perf.compile_backend, **options)
        return uses

    @contextlib.contextmanager
    def uncompiled(self):
        """Every use runs the plain module inside the block (FLOP counting, debugging)."""
        saved, self._unet_for = self._unet_for, {use: self.unet for use in self._unet_for}
        try:
            yield
        finally:
            self._unet_for = saved

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_uncached(self, prompts: list[str]) -> Rows:
        """prompts (N,) -> {embeds: (N, L, D)}: the text encoder's last hidden state, in the
        weight dtype, each prompt alone."""

        def encode(batch: list[str]) -> Rows:
            return {"embeds": self.text_encoder(self.tokenize(self.tokenizer, batch))[0]}

        return each_alone(prompts, encode)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """prompts (N,) -> text embeddings (N, L, D) in weight dtype (``encoded``)."""
        return self.encoded(prompts)[0]["embeds"]

    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """(prompt_embeds (N, L, D), negative_prompt_embeds (N, L, D), None)."""
        rows, negative = self.encoded(prompts, [negative_prompt])
        return rows["embeds"], repeat_rows(negative["embeds"], len(prompts)), None

    # ------------------------------------------------------------------ the UNet call

    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, branches: Branches, guidance_scale: float, use: str
    ) -> torch.Tensor:
        """The UNet's prediction (B, C, H, W); ``use`` picks the sampling or the training UNet
        callable (the same module, maybe compiled)."""
        dtype = self.weight_dtype
        channels_last = self.performance.channels_last
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        x = x.to(dtype=dtype, memory_format=memory_format)
        return self._unet_for[use](x, t, **cat_branches(branches, dtype)).sample

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
        """CFG: uncond + g (cond - uncond) (``guided``), shapes (N, C, H, W)."""
        return self.guided(
            latents, timesteps, prompt_embeds, negative_prompt_embeds, extra, guidance_scale, use
        )

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """latents in the VAE's dtype, / scaling_factor (StableDiffusionPipeline's order)."""
        return latents.to(self.vae.dtype) / self.vae.config.scaling_factor

    # ------------------------------------------------------------------ sampling

    def _set_steps(self, num_steps: int) -> None:
        if self._num_steps != num_steps:
            self.scheduler.set_timesteps(num_steps, device=self.device)
            self._num_steps = num_steps

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.latent_size()
        return (self.unet.config.in_channels, side, side)

    @torch.no_grad()
    def sample(self, prompts: list[str], generators: list[torch.Generator], *,
               num_steps: int, eta: float, guidance_scale: float,
               negative_prompt: str = "") -> Trajectories:  # fmt: skip
        """Sample len(prompts) trajectories; generator i alone drives sample i's initial noise and
        steps.

        eta = 0 gives deterministic DDIM (for evaluation); its log-probs are NaN (a point mass)."""
        self.check_generators(prompts, generators)
        self._set_steps(num_steps)
        n = len(prompts)
        prompt_embeds, negative_embeds, extra = self.conditioning(prompts, negative_prompt)
        shape = self.latent_shape()
        x = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in generators])
        x = x * self.scheduler.init_noise_sigma
        latents, log_probs = [x], []
        timesteps = self.scheduler.timesteps
        # merge_lora_for_sampling: the constructor checked there is an adapter
        merged = self.performance.merge_lora_for_sampling
        with lora_merged(self.unet) if merged else contextlib.nullcontext():
            for t in timesteps:
                t_batch = t.expand(n).to(self.device)
                x, log_prob = self._sample_step(
                    x, t_batch, prompt_embeds, negative_embeds, extra, guidance_scale, eta,
                    generators,
                )  # fmt: skip
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
        model_output = self._guided_prediction(
            x, t_batch, prompt_embeds, negative_embeds, guidance_scale, "sampling", extra
        )
        if eta > 0:
            return ddim_step_with_logprob(
                self.scheduler, model_output, t_batch, x, eta, generator=generators,
                logprob_reduction=self.logprob_reduction,
            )  # fmt: skip
        # deterministic DDIM (evaluation): no density, log-probs are NaN
        x = ddim_step_mean_std(self.scheduler, model_output, t_batch, x, 0.0)[0]
        return x, torch.full((len(x),), float("nan"), device=x.device)

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
        model_output = self._guided_prediction(
            x_t, t, traj.prompt_embeds, traj.negative_prompt_embeds, guidance_scale, "training",
            traj.extra,
        )  # fmt: skip
        mean, std, _ = ddim_step_mean_std(self.scheduler, model_output, t, x_t, eta)
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
        j = first_bad_step(stds)
        if j is None:
            return
        t = int(self.scheduler.timesteps[j])
        if j == len(stds) - 1 and float(self.scheduler.final_alpha_cumprod) == 1.0:
            fix = (
                "the scheduler has set_alpha_to_one=true: set "
                "model.scheduler_kwargs.set_alpha_to_one=false"
            )
        else:
            fix = (
                "the step's previous alpha_cumprod equals its own (timestep 0 is sampled?): set "
                "model.scheduler_kwargs.timestep_spacing=leading and "
                "model.scheduler_kwargs.steps_offset=1 (as Stable Diffusion ships)"
            )
        raise ConfigError(
            f"sample.num_steps={num_steps}, sample.eta={eta}: DDIM step {j + 1} of {len(stds)} "
            f"(timestep {t}) has std {stds[j].item():.3g}, so its log-probability is undefined; "
            f"{fix}"
        )

    # ------------------------------------------------------------------ export

    def save_pipeline(self, path: Path) -> None:
        """The components' folders (a pixel-space model has no pipeline), and with a VAE the
        model_index.json of a ``StableDiffusionPipeline`` with the DDIM scheduler sampled with."""
        for name in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
            if getattr(self, name) is not None:
                getattr(self, name).save_pretrained(path / name)
        if self.vae is None:
            return
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


def load_ddim_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> DDIMPolicy:
    """``load_policy`` for the sd family (SD 1.x / 2.x and the shapes model); ``sample`` (the
    flow-matching sampler settings every family's loader is given) is not used by DDIM."""
    return DDIMPolicy.from_model(model, lora, **kwargs)
