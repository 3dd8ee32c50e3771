"""On-policy check with the inductor backend on CPU (too slow for the test suite, which uses
aot_eager).

    OMP_NUM_THREADS=1 python scripts/inductor_ratio_check.py

Samples 2 trajectories of the bench's tiny SD policy eagerly, then with torch.compile(unet)
(inductor), and recomputes the first step's log-probs through the compiled training path (with
backward). Prints compile times and the largest log-prob differences (docs/performance.md quotes
them).
"""

from __future__ import annotations

import time

import torch

from diffloop import loops
from diffloop.config import LoraConfig, PerformanceConfig
from diffloop.policies.diffusers_policy import DDIMPolicy
from diffloop.tools.bench import build_components


def main() -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    prompts = ["a red cat", "a dog"]

    def sample(policy: DDIMPolicy):
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        start = time.perf_counter()
        traj = policy.sample(prompts, gens, num_steps=2, eta=1.0, guidance_scale=5.0)
        return traj, time.perf_counter() - start

    torch.manual_seed(0)
    eager, t_eager = sample(
        DDIMPolicy(build_components("tiny", device), LoraConfig(), device=device)
    )
    torch.manual_seed(0)
    compiled_policy = DDIMPolicy(
        build_components("tiny", device),
        LoraConfig(),
        device=device,
        performance=PerformanceConfig(compile="all"),
    )
    compiled, t_first = sample(compiled_policy)
    _, t_second = sample(compiled_policy)
    step = torch.zeros(len(prompts), dtype=torch.long)
    start = time.perf_counter()
    sampler = loops.SamplerSettings(num_steps=2, eta=1.0, guidance_scale=5.0)
    log_prob = loops.transition_log_prob(compiled_policy, compiled, step, sampler)[0]
    log_prob.sum().backward()
    t_train = time.perf_counter() - start
    print(
        f"sampling: eager {t_eager:.2f} s, compiled first call {t_first:.1f} s, second "
        f"{t_second:.2f} s"
    )
    print(f"training path, first call (compile + backward): {t_train:.1f} s")
    print(
        "max |sampled log p, compiled - eager|: "
        f"{(compiled.log_probs - eager.log_probs).abs().max():.2e}"
    )
    print(
        "max |training-path log p - sampled log p|: "
        f"{(log_prob.detach() - compiled.log_probs[:, 0]).abs().max():.2e}"
    )


if __name__ == "__main__":
    main()
