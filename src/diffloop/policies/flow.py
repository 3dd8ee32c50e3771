"""Flow-matching transformers as Gaussian policies: the sampler SD3 / SD3.5 and FLUX share.

``FlowMatchPolicy`` (on ``DenoiserPolicy``, which owns loading, freezing, LoRA, the reference model,
CFG, decoding and export) owns the flow sampler and the training step's Gaussian; a family
(``policies.sd3.SD3Policy``, ``policies.flux``) supplies its conditioning and whatever differs
through the hooks of the "family hooks" section: the transformer's timestep (``model_timestep``)
and output sign (``output_sign``), position ids (``position_kwargs``), the guidance embedding's
input (``guidance_kwargs``), latent packing (``pack`` / ``unpack``, ``pack_factor``) and the
schedule (``set_timesteps``; ``set_shifted_timesteps`` is the mu-shifted one of FLUX-style
pipelines).

Sampling (``diffloop.core.flow``): sigmas s_0 = 1 > ... > s_T = 0 from the family's scheduler;
each step j takes the velocity v = sign x model(x, t_j) (CFG or guidance embedding per family) and

    window steps:   x' = flow_sde_step_with_logprob(v, x, s_j, s_{j+1}, noise_level=eta, sde_type)
    other steps:    x' = x + (s_{j+1} - s_j) v          (ODE: no density, never trained)

The window (``sample.sde_window``) is [start, length] consecutive steps, or [first, last, length]
with each sample's start drawn uniformly in [first, last] from its own generator (Flow-GRPO-Fast's
random window); default every step but the last (s_T = 0: CPS's std is 0 there, and Flow-GRPO never
trains it). eta = 0 (evaluation) makes every step an ODE step and computes no density: the stored
window then has NaN log-probs, and a window that does not fit num_steps (an evaluation at fewer
steps) is not stored (W = 0).

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

from collections.abc import Callable
from typing import Any

import torch

from diffloop.config import ConfigError
from diffloop.core import flow_grpo_std_dev, flow_sde_step_with_logprob, flow_step_mean_std
from diffloop.policies.base import Trajectories
from diffloop.policies.denoiser import Branches, DenoiserPolicy, cat_branches, first_bad_step

# Attention projections (image and text stream) of a joint transformer block: Flow-GRPO's LoRA
# targets (scripts/train_sd3.py); diffloop adds the feed-forward projections (FLUX's Flow-GRPO run
# adapts them too).
ATTENTION_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]  # fmt: skip
FEED_FORWARD_TARGETS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


class DenoiserView(torch.nn.Module):
    """A family's transformer called like a UNet, ``view(x, t, **conditioning).sample`` with t on
    the scheduler's 0-1000 scale, for callers that run the denoiser directly (export checks, FLOP
    counts): the transformer sees t x ``timestep_scale``, or ``timestep(t)`` when given (the
    policy's ``model_timestep``), and its output is multiplied by ``sign``."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        timestep_scale: float = 1.0,
        *,
        timestep: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sign: float = 1.0,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.timestep_scale = timestep_scale
        self.timestep = timestep
        self.sign = sign

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, **conditioning: Any) -> Any:
        t = torch.as_tensor(timestep, device=x.device).float().expand(len(x))
        t = self.timestep(t) if self.timestep is not None else t * self.timestep_scale
        out = self.transformer(hidden_states=x, timestep=t, **conditioning)
        if self.sign != 1.0:
            out.sample = self.sign * out.sample
        return out


def floating_to(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``kwargs`` with every floating tensor in ``dtype`` (as the pipelines pass position ids)."""
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }


class FlowMatchPolicy(DenoiserPolicy):
    """A flow-matching transformer sampled with the stochastic flow step; LoRA or full fine-tuning.

    Frozen weights live in ``weight_dtype``; trainable parameters are fp32. ``sample``:
    ``sample.*`` (``sde_type``, ``sde_window``, and ``guidance_scale``, the guidance a direct
    transformer call gets). LoRA targets: ``lora.target_modules`` when set, else the family's
    ``DEFAULT_LORA_TARGETS`` (``lora.target_modules`` left at its SD default means "the family's
    default").
    """

    lora_component = "transformer"
    text_encoder_names: tuple[str, ...] = ()
    DEFAULT_LORA_TARGETS = ATTENTION_TARGETS + FEED_FORWARD_TARGETS
    timestep_divisor: float = 1.0
    """The transformer's timestep is the scheduler's (0-1000) / this (SD3 1; FLUX 1000)."""
    timestep_in_weight_dtype: bool = False
    """The pipeline casts the timestep to the latents' (weight) dtype before dividing (FLUX), else
    it stays float32 (SD3)."""
    output_sign: float = 1.0
    """The velocity is this x the transformer's output (a model trained on the reversed flow,
    such as Z-Image: -1)."""
    eval_num_steps: int | None = None
    """Evaluation steps when ``eval.num_steps`` is null (None: ``sample.num_steps``)."""
    eval_eta: float | None = None
    """Evaluation noise level when ``eval.eta`` is null (None: ``sample.eta``; 0: the ODE)."""

    @property
    def sde_type(self) -> str:
        """``sample.sde_type``: the stochastic step's kind (sde or cps)."""
        return self.sample_settings.sde_type

    @property
    def sde_window(self) -> tuple[int, ...] | None:
        """``sample.sde_window``: the stochastic, stored steps (None: every step but the last)."""
        window = self.sample_settings.sde_window
        return None if window is None else tuple(window)

    @property
    def guidance_scale(self) -> float:
        """``sample.guidance_scale``: the guidance a direct transformer call gets."""
        return self.sample_settings.guidance_scale

    def finish_denoiser(self) -> None:
        """``self.unet``: the transformer called like a UNet (``DenoiserView``)."""
        self.unet = DenoiserView(self.transformer, timestep=self.model_timestep,
                                 sign=self.output_sign)  # fmt: skip

    @staticmethod
    def text_length(
        configured: int | None, default: int, limit: int, field: str, pipeline: str
    ) -> int:
        """Text tokens of the prompt: ``configured`` (``model.<family>.max_sequence_length``) as
        given when in 1..``limit`` (the pipeline's check_inputs limit; ConfigError otherwise),
        else ``default``."""
        if configured is None:
            return default
        if not 1 <= configured <= limit:
            raise ConfigError(
                f"{field}={configured} must be in 1..{limit} ({pipeline}'s limit); Flow-GRPO "
                "uses 128"
            )
        return configured

    # ------------------------------------------------------------------ family hooks

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Scheduler timesteps t (N,), 0-1000 -> the transformer's timestep input:
        t / ``timestep_divisor``, in the weight dtype where ``timestep_in_weight_dtype``. A family
        whose model sees another time (Z-Image: (1000 - t) / 1000) overrides this."""
        t = t.to(self.weight_dtype) if self.timestep_in_weight_dtype else t.float()
        return t / self.timestep_divisor

    def position_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Keywords computed per call, not stored: the positions of the image (and text) tokens of
        a call whose conditioning is ``kwargs`` (FLUX: img_ids, txt_ids; Qwen-Image: img_shapes);
        floating tensors go in the weight dtype. Default none."""
        return {}

    def guidance_kwargs(self, n: int, guidance_scale: float) -> dict[str, Any]:
        """The guidance embedding's input for a call on n rows (FLUX.1-dev: ``guidance``). Default
        none."""
        return {}

    def direct_kwargs(self, kwargs: dict[str, Any], n: int) -> dict[str, Any]:
        """A direct call's keywords: the branch's, positions, guidance at ``sample.guidance``."""
        extra = {**self.position_kwargs(kwargs), **self.guidance_kwargs(n, self.guidance_scale)}
        return {**kwargs, **extra}

    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, branches: Branches, guidance_scale: float, use: str
    ) -> torch.Tensor:
        """transformer(x, model_timestep(t), conditioning, positions, guidance) (B, ...): the raw
        output, before ``output_sign``."""
        dtype = self.weight_dtype
        kwargs = cat_branches(branches, dtype)
        kwargs |= floating_to(self.position_kwargs(kwargs), dtype)
        kwargs |= self.guidance_kwargs(len(x), guidance_scale)
        out = self.transformer(
            hidden_states=x.to(dtype), timestep=self.model_timestep(t), **kwargs, return_dict=False
        )
        return out[0]

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        extra: dict[str, torch.Tensor] | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The (guided) velocity (N, ...) float32 at x (N, ...), scheduler timesteps t (N,):
        ``output_sign`` x ``guided`` (real CFG on [negative; positive], or one branch)."""
        out = self.guided(x, t, prompt_embeds, negative_prompt_embeds, extra, guidance_scale)
        return out if self.output_sign == 1.0 else self.output_sign * out

    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one sample's initial noise, as the pipeline draws it: (C, h, w)."""
        side = self.latent_size()
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

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """unpack(x) / scaling_factor + shift_factor, in the VAE's dtype."""
        return super().vae_input(self.unpack(latents.float()))

    def image_seq_len(self) -> int:
        """Image tokens of the packed latent (what a mu-shifted schedule depends on)."""
        return (self.latent_size() // self.pack_factor) ** 2

    def set_timesteps(self, num_steps: int) -> None:
        """``scheduler.set_timesteps`` as the family's pipeline calls it (default the scheduler's
        own, with its static shift: SD3)."""
        self.scheduler.set_timesteps(num_steps)

    def set_shifted_timesteps(self, num_steps: int, sigmas: Any = None) -> None:
        """The mu-shifted schedule of FLUX-style pipelines: ``set_timesteps(sigmas, mu)`` with
        sigmas linspace(1, 1/T, T) (or ``sigmas``) and mu from ``image_seq_len()`` and the scheduler
        config (``core.flux_sigmas``); the scheduler shifts by mu when its config has
        use_dynamic_shifting (and refuses to set timesteps without mu then)."""
        from diffloop.core import flux_sigmas

        default, mu = flux_sigmas(num_steps, self.image_seq_len(), self.scheduler.config)
        sigmas = default if sigmas is None else sigmas
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=self.device)

    # ------------------------------------------------------------------ sampling

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
    def sample(self, prompts: list[str], generators: list[torch.Generator], *,
               num_steps: int, eta: float, guidance_scale: float,
               negative_prompt: str = "") -> Trajectories:  # fmt: skip
        """Sample len(prompts) trajectories (module docstring); generator i alone drives sample i
        (its initial noise, its window start when random, then one draw per window step)."""
        self.check_generators(prompts, generators)
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
        extra = {
            **(extra or {}),
            "sigmas": sigmas[steps],
            "second_sigma": sigmas[1].expand(n).clone(),
        }
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
        j = first_bad_step(stds)
        if j is not None:
            raise ConfigError(
                f"sample.num_steps={num_steps}, sample.eta={eta}, sample.sde_type={self.sde_type}: "
                f"window step {first + j} has std {stds[j].item():.3g}, so its "
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
