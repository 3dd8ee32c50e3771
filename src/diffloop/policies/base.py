"""The policy interface: what the trainer needs from a text-to-image diffusion model.

Shape notation used throughout diffloop:
    N  samples (trajectories) held by this process
    T  denoising steps per trajectory
    C, H, W  latent (or pixel) channels, height, width
    L, D  text tokens and text-embedding width

A policy samples trajectories with a stochastic sampler whose every step is a Gaussian with a known
variance (DDIM with eta > 0 for SD 1.x/2.x and the shapes world; an SDE form of the flow sampler for
flow-matching models), records each step's log-probability, and returns each step's Gaussian under
its current parameters (from which ``diffloop.loops`` recomputes the log-probability). SDXL and
flow-matching models implement the same interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch

from diffloop.errors import DiffloopError


@dataclass
class Trajectories:
    """Trajectories sampled by a policy, held on one process.

    Fields:
        latents:     (N, T+1, C, H, W) x_T ... x_0, the state before each step and the final sample.
        timesteps:   (N, T) long, the scheduler timestep of each step.
        log_probs:   (N, T) float32, log p_old(x_{t-1} | x_t, c) recorded at sampling time.
        prompt_embeds:          (N, L, D) conditional text embeddings.
        negative_prompt_embeds: (N, L, D) unconditional / negative-prompt embeddings (for CFG).
        images:      (N, 3, H_img, W_img) float32 in [0, 1], decoded final samples.
    Extra conditioning a model needs (SDXL's pooled embeddings and time ids) goes in ``extra``,
    a dict of tensors with leading dimension N.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    images: torch.Tensor
    extra: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def index(self, idx: torch.Tensor | slice) -> Trajectories:
        """The subset of trajectories ``idx`` (every per-sample field indexed on dim 0)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif isinstance(value, dict):
                out[f.name] = {k: v[idx] for k, v in value.items()}
            else:
                out[f.name] = value[idx]
        return Trajectories(**out)

    @staticmethod
    def cat(parts: list[Trajectories]) -> Trajectories:
        """Concatenate along the sample dimension."""
        out = {}
        for f in fields(Trajectories):
            values = [getattr(p, f.name) for p in parts]
            if values[0] is None:
                out[f.name] = None
            elif isinstance(values[0], dict):
                out[f.name] = {k: torch.cat([v[k] for v in values]) for k in values[0]}
            else:
                out[f.name] = torch.cat(values)
        return Trajectories(**out)


@runtime_checkable
class DiffusionPolicy(Protocol):
    """The only thing the trainer and the tools (``diffloop.loops``) call on a model.

    Every family implements it on ``diffloop.policies.denoiser.DenoiserPolicy`` (the DDIM one for
    SD 1.x/2.x and the shapes model: ``diffloop.policies.diffusers_policy``).
    Log-probabilities are not computed by the policy: ``diffloop.loops.transition_log_prob`` applies
    ``diffloop.core.gaussian_log_prob`` (reduced by ``logprob_reduction``) to the Gaussian that
    ``step_distribution`` returns, and ``sample`` must record its log-probs with that same function
    (``core.ddim_step_with_logprob`` does), so the on-policy ratio is exactly 1.

    Conditioning: everything ``step_distribution`` needs besides the latents and timesteps must be
    carried by the trajectories ``sample`` returns (``prompt_embeds``, ``negative_prompt_embeds``,
    and ``extra`` for e.g. SDXL's pooled embeddings and time ids), so no caller branches on the
    model.
    """

    device: torch.device
    logprob_reduction: str
    """"mean" or "sum" over latent elements (``train.logprob_reduction``)."""

    def sample(self, prompts: list[str], generators: list[torch.Generator], *,
               num_steps: int, eta: float, guidance_scale: float,
               negative_prompt: str) -> Trajectories:  # fmt: skip
        """Sample one trajectory per prompt, recording every step's log-prob; generator i drives
        every random draw of sample i, so a sample does not depend on which other samples share its
        batch or process."""
        ...

    def step_distribution(
        self,
        traj: Trajectories,
        step: torch.Tensor,
        *,
        eta: float,
        guidance_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the Gaussian p_theta(x_{t-1} | x_t, c) under the current parameters.

        ``step``: (M,) long step index j into ``traj`` (x_t = latents[:, j], t = timesteps[:, j])
        for the M trajectories of ``traj``. mean (M, C, H, W) carries gradient; std broadcastable to
        it.
        """
        ...

    def check_sampling(self, num_steps: int, eta: float) -> None:
        """Raise ``ConfigError`` (naming the setting to change) unless every step sampled at
        ``num_steps`` and ``eta`` is a Gaussian with a positive finite std (a log-density
        exists)."""
        ...

    def stored_steps(self, num_steps: int) -> int:
        """Steps with a log-prob each trajectory sampled at ``num_steps`` stores (the steps training
        draws from): every step for DDIM, the SDE window's length for a flow-matching model."""
        ...

    def evaluations_per_step(self, guidance_scale: float) -> int:
        """Denoiser evaluations per sample in one step: 2 with classifier-free guidance (both
        branches, one doubled batch), 1 at guidance_scale 1 or for a guidance-distilled model."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which the policy computes with the *base* model (LoRA disabled), for KL."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def export(self, path: str) -> None:
        """Write the fine-tuned weights in the model family's own format (diffusers LoRA, or a
        full pipeline) so that diffusers loads them."""
        ...

    def train(self, mode: bool = True) -> None:
        """Train mode (True) for the gradient pass, eval mode (False) for sampling."""
        ...


class CheckpointMismatchError(DiffloopError, ValueError):
    """A checkpoint's trainable tensors are not this model's (names or shapes differ)."""


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices [0:size], [size:2 size], ... covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
