"""Flow-matching transformers as Gaussian policies: what SD3 / SD3.5 and FLUX share.

``FlowMatchPolicy`` owns the sampler, the training step's Gaussian, parameters (LoRA via peft on
the transformer, or full fine-tuning), the reference model, checkpoints and export; a family
(``policies.sd3.SD3Policy``, ``policies.flux``) supplies only its conditioning and model call
through the hooks in the "family hooks" section.

Sampling (``diffloop.core.flow``): sigmas s_0 = 1 > ... > s_T = 0 from the family's scheduler;
each step j takes the velocity v = model(x, t_j) (CFG or guidance embedding per family) and

    window steps:   x' = flow_sde_step_with_logprob(v, x, s_j, s_{j+1}, noise_level=eta, sde_type)
    other steps:    x' = x + (s_{j+1} - s_j) v          (ODE: no density, never trained)

The window (``sample.sde_window``) is [start, length] consecutive steps, or [first, last, length]
with each sample's start drawn uniformly in [first, last] from its own generator (Flow-GRPO-Fast's
random window); default every step but the
last (s_T = 0: CPS's std is 0 there, and Flow-GRPO never trains it). eta = 0 (evaluation) makes
every step an ODE step and computes no density: the stored window then has NaN log-probs, and a
window that does not fit num_steps (an evaluation at fewer steps) is not stored (W = 0).

Evaluation: ``eval_num_steps`` / ``eval_eta`` are the family's conventional evaluation sampler
(``eval.num_steps`` / ``eval.eta`` null); a family following Flow-GRPO sets 40 / 28 steps at noise
level 0, its ``eval`` functions' deterministic ODE pass.

Trajectories hold only the window (W = its length): latents (N, W+1, ...) x before each window
step and after the last, timesteps (N, W) float32 the model timesteps of the window steps (the
scheduler's 0-1000 values), log_probs (N, W), and in ``extra``: sigmas (N, W+1) the window's
sigmas, second_sigma (N,) the schedule's s_1 (Flow-GRPO's std at s = 1), plus the family's
conditioning. ``step_distribution`` recomputes the same ``flow_step_mean_std`` from these, so the
on-policy ratio is exactly 1.

Latents are float32 throughout (the transformer sees them in the weight dtype); step math is
float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch

from diffloop.config import LoraConfig, ModelConfig, PerformanceConfig, SampleConfig
from diffloop.core import flow_grpo_std_dev, flow_sde_step_with_logprob, flow_step_mean_std
from diffloop.policies.base import TrainableDenoiser, Trajectories, iter_chunks
from diffloop.policies.diffusers_policy import (
    ModelLoadError,
    cast_frozen,
    cat_branches,
)

logger = logging.getLogger(__name__)

# Attention projections (image and text stream) of a joint transformer block: Flow-GRPO's LoRA
# targets (scripts/train_sd3.py); diffloop adds the feed-forward projections (FLUX's Flow-GRPO run
# adapts them too).
ATTENTION_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]  # fmt: skip
FEED_FORWARD_TARGETS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def load_components(
    model: ModelConfig,
    loaders: dict[str, Any],
    how_to_provide: str,
    optional: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Load each ``loaders[name](path)`` from ``model.pretrained`` (hub id or local directory).

    A local directory must have a folder for every component except those in ``optional`` that its
    model_index.json lists as [null, null] or omits (those come back None). Raises ModelLoadError
    naming the missing or broken component, and ``how_to_provide``."""
    from diffloop.policies.families import looks_local, model_index, model_path

    path = model_path(model)  # a hub id: its cached snapshot, or the id once the hub answered
    local = Path(path)
    if looks_local(path) and not local.is_dir():
        raise ModelLoadError(f"no directory at '{path}'. {how_to_provide}")
    index = model_index(model.pretrained, model.revision) or {}
    absent = {c for c in optional if (index.get(c) or [None])[0] is None}
    wanted = [c for c in loaders if c not in absent]
    if local.is_dir():
        missing = [c for c in wanted if not (local / c).is_dir()]
        if missing:
            listed = [c for c in missing if c in optional]
            hint = (
                f" ({', '.join(listed)} is optional: write it as [null, null] in model_index.json "
                "to run without it)"
                if listed
                else ""
            )
            raise ModelLoadError(
                f"'{path}' lacks the component folder(s) {', '.join(m + '/' for m in missing)}"
                f"{hint}. {how_to_provide}"
            )
    components: dict[str, Any] = {c: None for c in absent}
    for name in wanted:
        try:
            components[name] = loaders[name](path)
        except Exception as e:  # every loader failure gets the same how-to
            raise ModelLoadError(
                f"could not load the {name} of model.pretrained='{model.pretrained}' (looked in "
                f"'{path}', {name}/): {type(e).__name__}: {e}\n{how_to_provide}"
            ) from e
    return components


class DenoiserView(torch.nn.Module):
    """A family's transformer called like a UNet, ``view(x, t, **conditioning).sample`` with t on
    the 0-1000 scale, for callers that run the denoiser directly (export checks, FLOP counts)."""

    def __init__(self, transformer: torch.nn.Module, timestep_scale: float = 1.0) -> None:
        super().__init__()
        self.transformer = transformer
        self.timestep_scale = timestep_scale

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, **conditioning: Any) -> Any:
        t = torch.as_tensor(timestep, device=x.device).float() * self.timestep_scale
        return self.transformer(hidden_states=x, timestep=t.expand(len(x)), **conditioning)


class FlowMatchPolicy(TrainableDenoiser):
    """A flow-matching transformer sampled with the stochastic flow step; LoRA or full fine-tuning.

    Frozen weights live in ``weight_dtype``; trainable parameters are fp32. ``sde_type`` and
    ``sde_window`` are ``sample.sde_type`` / ``sample.sde_window``. LoRA targets: ``lora.
    target_modules`` when set, else the family's ``DEFAULT_LORA_TARGETS`` (``lora.target_modules``
    left at its SD default means "the family's default").
    """

    pipeline_class: Any = None
    """The diffusers pipeline class (export of a full fine-tune)."""
    lora_loader: str = ""
    """The diffusers LoRA loader mixin whose ``save_lora_weights`` writes the adapter
    (diffloop.export)."""
    lora_component = "transformer"
    """The adapted module (and the prefix of its keys in the LoRA file)."""
    text_encoder_names: tuple[str, ...] = ()
    """Component names of the (frozen) text encoders; their tokenizers are kept as given."""
    DEFAULT_LORA_TARGETS: list[str] = ATTENTION_TARGETS + FEED_FORWARD_TARGETS
    timestep_scale: float = 1.0
    """The model timestep is (scheduler timestep, 0-1000) x this (SD3 1; FLUX 1/1000)."""
    eval_num_steps: int | None = None
    """Evaluation steps when ``eval.num_steps`` is null (None: ``sample.num_steps``)."""
    eval_eta: float | None = None
    """Evaluation noise level when ``eval.eta`` is null (None: ``sample.eta``; 0: the ODE)."""

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
    ) -> None:
        self.device = device
        self.resolution = resolution
        self.performance = performance or PerformanceConfig()
        self._refuse_unsupported(self.performance)
        self.weight_dtype = weight_dtype
        self.logprob_reduction = logprob_reduction
        sample = sample or SampleConfig()
        self.sde_type = sample.sde_type
        self.sde_window = None if sample.sde_window is None else tuple(sample.sde_window)
        self.components = components
        self.transformer = components["transformer"]
        self.scheduler = components["scheduler"]
        self.lora_config = lora if lora.enabled else None
        for name in self.text_encoder_names:
            encoder = components.get(name)
            if encoder is not None:
                self._freeze(encoder, weight_dtype)
            setattr(self, name, encoder)
        self._freeze(self.transformer, weight_dtype)
        vae = components["vae"]
        # A force_upcast VAE decodes in fp32 (as the pipelines do); never cast it through fp16.
        self.vae = self._freeze(vae, torch.float32 if vae.config.force_upcast else weight_dtype)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        multiple = (
            self.vae_scale_factor
            * getattr(self.transformer.config, "patch_size", 1)
            * self.pack_factor
        )
        if self.image_size() % multiple:
            raise ModelLoadError(
                f"model.resolution={self.image_size()} must be a multiple of {multiple} (the VAE's "
                "downsampling x the transformer's patch size)"
            )
        if self.lora_config is not None:
            self._add_lora(lora)
        else:
            self.transformer.requires_grad_(True)
        for p in self.trainable_parameters():  # fp16 Adam updates underflow
            p.data = p.data.float()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.unet = DenoiserView(self.transformer, self.timestep_scale)
        self._num_steps: int | None = None

    @staticmethod
    def _refuse_unsupported(perf: PerformanceConfig) -> None:
        default = PerformanceConfig()
        names = ("compile", "channels_last", "merge_lora_for_sampling", "attention")
        bad = [n for n in names if getattr(perf, n) != getattr(default, n)]
        if bad:
            raise ValueError(
                f"performance.{bad[0]}={getattr(perf, bad[0])!r} is not supported for "
                f"flow-matching models; leave it at {getattr(default, bad[0])!r}"
            )

    def _freeze(self, module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        """A frozen component: no gradients, eval mode (a model built in code starts in train mode,
        and T5's dropout would then make the text conditioning random), in ``dtype`` on the device,
        except the weights transformers keeps in fp32 at that dtype (``cast_frozen``: T5's ``wo``
        in fp16)."""
        return cast_frozen(module.requires_grad_(False).eval(), dtype, self.device)

    # ------------------------------------------------------------------ parameters

    def _add_lora(self, lora: LoraConfig) -> None:
        from peft import LoraConfig as PeftLoraConfig

        targets = list(lora.target_modules)
        if targets == LoraConfig().target_modules:
            targets = list(self.DEFAULT_LORA_TARGETS)
        self.peft_config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
        try:
            self.transformer.add_adapter(self.peft_config)
        except ValueError as e:
            raise ValueError(
                f"lora.target_modules={targets} matched no transformer module ({e}); use names "
                f"such as {', '.join(self.DEFAULT_LORA_TARGETS[:4])}"
            ) from e

    # ------------------------------------------------------------------ family hooks

    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(prompt_embeds (N, L, D), negative_prompt_embeds (N, L, D), extra {name: (N, ...)}):
        everything the model call needs, stored with the trajectories and reused exactly."""
        raise NotImplementedError

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor], negative: bool
    ) -> dict[str, Any]:
        """The transformer's conditioning keyword arguments for one CFG branch."""
        raise NotImplementedError

    pack_factor: int = 1
    """Side of the latent patches ``pack`` folds into channels (FLUX: 2)."""

    def image_size(self) -> int:
        """Square image side (pixels): model.resolution, else sample_size x the VAE factor."""
        if self.resolution is not None:
            return self.resolution
        size = self.transformer.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one sample's initial noise, as the pipeline draws it: (C, h, w)."""
        side = self.image_size() // self.vae_scale_factor
        return (self.transformer.config.in_channels // self.pack_factor**2, side, side)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> the tensor the step works on (identity; FLUX packs 2x2 patches)."""
        return latents

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``pack``."""
        return latents

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's (packed) latent, the state of the step."""
        return tuple(self.pack(torch.zeros(1, *self.noise_shape()))[0].shape)

    def set_timesteps(self, num_steps: int) -> None:
        """``scheduler.set_timesteps`` as the family's pipeline calls it (FLUX: with mu)."""
        self.scheduler.set_timesteps(num_steps)

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        extra: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """The (guided) velocity (N, ...) float32 at x (N, ...), scheduler timesteps t (N,).

        Real CFG: uncond + g (cond - uncond) in one transformer call on [negative; positive] (the
        pipelines' order); g = 1 is one branch. A guidance-distilled family overrides this."""
        dtype = self.weight_dtype
        t = t.float() * self.timestep_scale
        cond = self.branch_kwargs(prompt_embeds, extra, negative=False)
        with self._autocast():
            if guidance_scale == 1.0:
                kwargs = cat_branches([cond], dtype)
                return self.transformer(hidden_states=x.to(dtype), timestep=t, **kwargs,
                                        return_dict=False)[0].float()  # fmt: skip
            uncond = self.branch_kwargs(negative_prompt_embeds, extra, negative=True)
            out = self.transformer(
                hidden_states=torch.cat([x, x]).to(dtype),
                timestep=torch.cat([t, t]),
                **cat_branches([uncond, cond], dtype),
                return_dict=False,
            )[0]
        uncond_out, cond_out = out.float().chunk(2)
        return uncond_out + guidance_scale * (cond_out - uncond_out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Final (packed) latents -> images (N, 3, H, W) float32 in [0, 1]:
        vae.decode(unpack(x) / scaling_factor + shift_factor)."""
        config = self.vae.config
        shift = config.shift_factor or 0.0
        images = []
        for chunk in iter_chunks(len(latents), batch_size):
            z = self.unpack(latents[chunk].float()) / config.scaling_factor + shift
            images.append(self.vae.decode(z.to(self.vae.dtype)).sample.float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ sampling

    def uncompiled(self):
        """The plain modules (this policy compiles nothing: performance.compile is refused)."""
        return contextlib.nullcontext()

    def _autocast(self):
        enabled = self.weight_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=enabled)

    def schedule(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (T+1,) float32 ending at 0, timesteps (T,) float32) on the policy's device."""
        if self._num_steps != num_steps:
            self.set_timesteps(num_steps)
            self._num_steps = num_steps
        sigmas = self.scheduler.sigmas.to(self.device, torch.float32)
        return sigmas, self.scheduler.timesteps.to(self.device, torch.float32)

    def window(self, num_steps: int) -> tuple[int, int, int]:
        """(first, last, length) of ``sample.sde_window``: each sample's stochastic, stored steps
        are ``length`` consecutive steps from a start in [first, last] (first = last: a fixed
        window)."""
        if self.sde_window is None:
            return 0, 0, num_steps - 1
        if len(self.sde_window) == 2:
            start, length = self.sde_window
            return start, start, length
        return tuple(self.sde_window)

    def sampled_window(self, num_steps: int, eta: float) -> tuple[int, int, int]:
        """(first, last, length) of the window ``sample`` stores at ``num_steps`` and ``eta``:
        ``window(num_steps)``; a deterministic pass (eta = 0: every step an ODE step) whose window
        does not fit num_steps (an evaluation at fewer steps) stores none, (0, 0, 0). ValueError
        when eta > 0 and the window does not fit (its steps would be SDE steps)."""
        first, last, length = self.window(num_steps)
        if 0 <= first <= last and length >= 1 and last + length <= num_steps:
            return first, last, length
        if eta == 0:
            return 0, 0, 0
        raise ValueError(f"sample.sde_window={self.sde_window} does not fit {num_steps} steps")

    def window_starts(
        self, generators: list[torch.Generator], num_steps: int, eta: float | None = None
    ) -> torch.Tensor:
        """(N,) long: sample i's window start, drawn from generator i alone (after its initial
        noise) when the window's start is random, else the fixed start (no draw); the window is
        ``sampled_window(num_steps, eta)`` (``window(num_steps)`` when eta is None)."""
        window = self.window(num_steps) if eta is None else self.sampled_window(num_steps, eta)
        first, last, _ = window
        if first == last:
            return torch.full((len(generators),), first, dtype=torch.long, device=self.device)
        draws = [
            torch.randint(first, last + 1, (1,), generator=g, device=g.device) for g in generators
        ]
        return torch.cat([d.to(self.device) for d in draws])

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Packed initial noise (N, ...): sample i's from generator i alone, drawn as the pipeline's
        ``randn_tensor`` draws it with a list of generators (each on its generator's device)."""
        shape = self.noise_shape()
        noise = [
            torch.randn(shape, generator=g, device=g.device).to(self.device) for g in generators
        ]
        return self.pack(torch.stack(noise))

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
        """Sample len(prompts) trajectories (module docstring); generator i alone drives sample i
        (its initial noise, its window start when random, then one draw per window step)."""
        if len(generators) != len(prompts):
            raise ValueError(
                f"need one generator per prompt, got {len(generators)} for {len(prompts)}"
            )
        n = len(prompts)
        sigmas, timesteps = self.schedule(num_steps)
        _, last, length = self.sampled_window(num_steps, eta)
        embeds, negative, extra = self.conditioning(prompts, negative_prompt)
        x = self.initial_latents(generators)
        starts = self.window_starts(generators, num_steps, eta)  # (N,)
        rows = torch.arange(n, device=self.device)
        latents = torch.empty(n, length + 1, *x.shape[1:], device=x.device)
        latents[:, 0] = x  # x_T; overwritten at each sample's window start (W = 0: kept)
        log_probs = torch.full((n, length), float("nan"), device=x.device)
        for j in range(last + length):  # after the last window step only ODE steps remain
            offset = j - starts  # (N,): the window step j is for each sample, if in [0, length)
            latents[offset == 0, 0] = x[offset == 0]
            in_window = (offset >= 0) & (offset < length)
            s, s_next = sigmas[j].expand(n), sigmas[j + 1].expand(n)
            v = self.velocity(x, timesteps[j].expand(n), embeds, negative, extra, guidance_scale)
            x_next = flow_step_mean_std(v, x, s, s_next, noise_level=0.0)[0]  # the ODE step
            noisy = rows[in_window] if eta > 0 else rows[:0]
            if len(noisy):
                idx = noisy.tolist()
                x_next[noisy], log_probs[noisy, offset[noisy]] = flow_sde_step_with_logprob(
                    v[noisy], x[noisy], s[noisy], s_next[noisy], noise_level=eta,
                    sde_type=self.sde_type, generator=[generators[i] for i in idx],
                    logprob_reduction=self.logprob_reduction, second_sigma=sigmas[1],
                )  # fmt: skip
            x = x_next
            latents[rows[in_window], offset[in_window] + 1] = x[in_window]
        for j in range(last + length, num_steps):
            s, s_next = sigmas[j].expand(n), sigmas[j + 1].expand(n)
            v = self.velocity(x, timesteps[j].expand(n), embeds, negative, extra, guidance_scale)
            x = flow_step_mean_std(v, x, s, s_next, noise_level=0.0)[0]
        steps = starts[:, None] + torch.arange(length + 1, device=self.device)  # (N, W+1)
        extra = {**extra, "sigmas": sigmas[steps], "second_sigma": sigmas[1].expand(n).clone()}
        return Trajectories(
            latents=latents,
            timesteps=timesteps[steps[:, :-1]],
            log_probs=log_probs,
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            images=self.decode(x, self.performance.decode_batch_size),
            extra=extra,
        )

    def step_distribution(
        self, traj: Trajectories, step: torch.Tensor, *, eta: float, guidance_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (M, ...) and std (M, 1, ..., 1) of window step ``step`` (M,) under the current
        parameters: the sampler's ``flow_step_mean_std`` on the stored state and sigmas."""
        if traj.extra is None or "sigmas" not in traj.extra:
            raise ValueError("flow trajectories need extra['sigmas'] (sampled by another policy?)")
        rows = torch.arange(len(traj), device=step.device)
        x = traj.latents[rows, step]
        sigmas = traj.extra["sigmas"]
        v = self.velocity(
            x, traj.timesteps[rows, step], traj.prompt_embeds, traj.negative_prompt_embeds,
            traj.extra, guidance_scale,
        )  # fmt: skip
        return flow_step_mean_std(
            v, x, sigmas[rows, step], sigmas[rows, step + 1], noise_level=eta,
            sde_type=self.sde_type, second_sigma=traj.extra["second_sigma"],
        )  # fmt: skip

    def flow_grpo_std_dev(
        self, traj: Trajectories, step: torch.Tensor, std: torch.Tensor
    ) -> torch.Tensor:
        """(M, 1, ..., 1) the std_dev_t Flow-GRPO's KL divides by at window step ``step`` (M,),
        from ``step_distribution``'s std (``core.flow_grpo_std_dev``: std_t for sde, std for
        cps)."""
        rows = torch.arange(len(traj), device=step.device)
        sigmas = traj.extra["sigmas"]
        return flow_grpo_std_dev(std, sigmas[rows, step], sigmas[rows, step + 1], self.sde_type)

    def stored_steps(self, num_steps: int) -> int:
        """The SDE window's length (``window``): the last step is an ODE step and never stored."""
        return self.window(num_steps)[2]

    def step_stds(self, num_steps: int, eta: float) -> torch.Tensor:
        """(W',) std of every step a window may cover, [first, last + length), at ``num_steps``
        and noise level ``eta``."""
        sigmas, _ = self.schedule(num_steps)
        first, last, length = self.window(num_steps)
        stop = last + length
        zeros = torch.zeros(stop - first, 1, device=self.device)
        return flow_step_mean_std(
            zeros, zeros, sigmas[first:stop], sigmas[first + 1 : stop + 1], noise_level=eta,
            sde_type=self.sde_type, second_sigma=sigmas[1],
        )[1].reshape(-1)  # fmt: skip

    def check_sampling(self, num_steps: int, eta: float) -> None:
        """Raise ConfigError unless eta is in (0, 1] and every step a window may cover has a
        positive finite std (else its log-density is undefined)."""
        from diffloop.config import ConfigError

        if not 0 < eta <= 1:
            raise ConfigError(
                f"sample.eta={eta} is the flow SDE's noise level and must be in (0, 1] "
                "(Flow-GRPO: 0.7 with sde_type=sde, 0.8 with cps)"
            )
        first, last, length = self.window(num_steps)
        if not (0 <= first <= last and length >= 1 and last + length <= num_steps - 1):
            raise ConfigError(
                f"sample.sde_window={list(self.sde_window or [])} must lie in steps "
                f"0..{num_steps - 2}"
                f" of sample.num_steps={num_steps} (the last step is an ODE step)"
            )
        stds = self.step_stds(num_steps, eta)
        bad = [j for j, v in enumerate(stds.tolist()) if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ConfigError(
                f"sample.num_steps={num_steps}, sample.eta={eta}, sample.sde_type={self.sde_type}: "
                f"window step {first + bad[0]} has std {stds[bad[0]].item():.3g}, so its "
                "log-probability is undefined; move sample.sde_window off it"
            )

    def check_evaluation_sampling(self, num_steps: int, eta: float) -> None:
        """Raise ConfigError unless ``sample`` runs the evaluation sampler (``eval.num_steps``,
        ``eval.eta`` resolved): noise level in [0, 1], and with eta > 0 a window inside steps
        0..num_steps - 2 (its steps are SDE steps; the last is an ODE step, as in training). No
        std is checked: evaluation needs no density, and at eta 0 none is computed."""
        from diffloop.config import ConfigError

        if not 0 <= eta <= 1:
            raise ConfigError(
                f"eval.eta={eta} is the flow SDE's noise level in evaluation and must be in [0, 1] "
                "(0: the deterministic ODE, Flow-GRPO's evaluation)"
            )
        _, last, length = self.window(num_steps)
        if eta > 0 and not (length >= 1 and last + length <= num_steps - 1):
            raise ConfigError(
                f"eval.num_steps={num_steps} with eval.eta={eta}: sample.sde_window="
                f"{list(self.sde_window or [])} must lie in steps 0..{num_steps - 2} of the "
                "evaluation sampler (the last step is an ODE step); raise eval.num_steps or set "
                "eval.eta=0 (deterministic)"
            )

    # ------------------------------------------------------------------ export

    def pipeline_components(self) -> dict[str, Any]:
        """Keyword arguments of ``pipeline_class`` for a full-model export."""
        return {k: v for k, v in self.components.items() if k in self.pipeline_class_keys()}

    def pipeline_class_keys(self) -> set[str]:
        import inspect

        return set(inspect.signature(self.pipeline_class.__init__).parameters) - {"self"}

    def export(self, path: str | Path) -> None:
        """LoRA: diffusers LoRA weights (``pipeline_class.load_lora_weights(path)`` loads them, with
        lora_alpha in the metadata). Full fine-tuning: a complete pipeline directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.lora_config is None:
            self.pipeline_class(**self.pipeline_components()).save_pretrained(str(path))
            return
        from diffloop.export.lora_files import save_lora

        save_lora(self, path)
