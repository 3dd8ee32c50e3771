"""The per-step score weight w_t = |d mu / d eps_hat| / sigma_t of DDIM at eta (docs/method.md,
"Which steps to train"), from diffloop's own step (``core.ddim.ddim_step_mean_std``) on diffusers'
DDIMScheduler with "leading" spacing:

    python scripts/step_weights.py            # the table in docs/method.md

mu is linear in eps_hat, so d mu / d eps_hat = mu(eps_hat = 1, x = 0) - mu(eps_hat = 0, x = 0).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from diffloop.core.ddim import ddim_step_mean_std

SCHEDULES = {
    "shapes world (linear betas)": {"beta_schedule": "linear"},
    "Stable Diffusion (scaled linear)": {
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    },
}  # fmt: skip


def step_weights(scheduler_kwargs: dict, num_steps: int, eta: float = 1.0) -> torch.Tensor:
    """(T,) w_t of each sampled step, noisiest first."""
    scheduler = DDIMScheduler(
        set_alpha_to_one=False,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
        **scheduler_kwargs,
    )
    scheduler.set_timesteps(num_steps)
    t = scheduler.timesteps
    zero, one = torch.zeros(len(t), 1, 1, 1), torch.ones(len(t), 1, 1, 1)  # (T, C, H, W)
    mu_one, sigma, _ = ddim_step_mean_std(scheduler, one, t, zero, eta)
    mu_zero, _, _ = ddim_step_mean_std(scheduler, zero, t, zero, eta)
    return ((mu_one - mu_zero).abs() / sigma).reshape(-1)


def main() -> None:
    print("| schedule | T | median w_t | largest w_t (step) |")
    print("|---|---|---|---|")
    for name, kwargs in SCHEDULES.items():
        for num_steps in (10, 20) if "shapes" in name else (50, 20):
            w = step_weights(kwargs, num_steps)
            j = int(w.argmax())
            median = float(w.sort().values[len(w) // 2 - 1 : len(w) // 2 + 1].mean())  # T even
            print(f"| {name} | {num_steps} | {median:.2f} | {w[j]:.1f} (step {j}) |")


if __name__ == "__main__":
    main()
