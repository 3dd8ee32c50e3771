"""The policy path: sampling, training and end to end on a real policy (the shapes model or a
random-weight SD / SDXL / SD3 / FLUX shape), each item timed and counted."""

import argparse
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from diffloop.tools.bench.measure import (
    BenchRun,
    ItemResult,
    PeakMemory,
    count_flops,
    make_item,
    median_seconds,
)
from diffloop.tools.bench.models import (
    DTYPES,
    FLUX2_SHAPES,
    FLUX_SHAPES,
    QWEN_IMAGE_SHAPES,
    SD3_SHAPES,
    SDXL_SHAPES,
    ZIMAGE_SHAPES,
    build_components,
)
from diffloop.tools.bench.plan import plan_vs_measured


def _prompts(n: int, shape: str = "tiny") -> list[str]:
    """n prompts the shape's tokenizer knows: shapes/val_pair captions for the shapes world."""
    if shape == "shapes":
        from diffloop.shapes.world import prompt_splits

        pool = prompt_splits()["val_pair"]
        return [pool[i % len(pool)] for i in range(n)]
    from diffloop.testing.tiny import PROMPT_WORDS

    return [" ".join(PROMPT_WORDS[i % 5 : i % 5 + 6]) for i in range(n)]


def _generators(n: int, device: torch.device, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(offset + i) for i in range(n)]


def train_pass(
    policy: Any, traj: Any, train_batch: int, *, eta: float, guidance_scale: float, optimizer: Any
) -> None:
    """One pass of policy-gradient training over ``traj`` through the trainer's gradient pass
    (``loops.minibatch_backward``): per minibatch of ``train_batch`` trajectories, every step j is
    backpropagated (advantage 1, ratio 1: loss_j = -mean log p_theta(x_{j+1} | x_j) in gradient;
    gradients accumulate over the T steps, as the trainer does), then one optimizer step."""
    from diffloop import loops
    from diffloop.core import policy_gradient_loss
    from diffloop.policies.base import iter_chunks

    num_steps = traj.timesteps.shape[1]
    sampler = loops.SamplerSettings(num_steps=num_steps, eta=eta, guidance_scale=guidance_scale)
    loss = loops.LossSettings(
        lambda lp, old, adv, eps: policy_gradient_loss(lp, old, adv), 1.0, ratio_to_self=True
    )
    for chunk in iter_chunks(len(traj), train_batch):
        mb = traj.index(chunk)
        device = mb.latents.device
        steps = torch.arange(num_steps, device=device).expand(len(mb), -1)  # (M, T): every step
        ones = torch.ones(len(mb), device=device)
        for _ in loops.minibatch_backward(
            policy, mb, ones, steps, sampler, loss, scale=1, on_policy=False
        ):
            pass
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def onpolicy_logprob_err(policy: Any, traj: Any, *, eta: float, guidance_scale: float) -> float:
    """max |log p recomputed by the training path - log p recorded while sampling| over every
    step of ``traj`` (``loops.onpolicy_logprob_err``): the correctness check of each speed option
    (compiled sampling vs eager or compiled training, merged LoRA, channels-last)."""
    from diffloop import loops

    sampler = loops.SamplerSettings(
        num_steps=traj.timesteps.shape[1], eta=eta, guidance_scale=guidance_scale
    )
    return loops.onpolicy_logprob_err(policy, traj, sampler)


def _floating_to(cond: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``cond`` with its floating tensors (in nested dicts too) in ``dtype``; anything else (a
    None mask, Qwen-Image's img_shapes list) as it is."""
    return {
        k: _floating_to(v, dtype)
        if isinstance(v, dict)
        else v.to(dtype)
        if isinstance(v, torch.Tensor) and v.is_floating_point()
        else v
        for k, v in cond.items()
    }


def _unet_flops_per_eval_sd(policy: Any, shape: str) -> int:
    """F: FLOPs of one UNet (or flow transformer) forward at batch 1 (the policy's, LoRA
    included)."""
    if hasattr(policy, "unet_conditioning"):  # SDXL / SD3 / FLUX: pooled embeddings too
        cond = policy.unet_conditioning(_prompts(1, shape))
    else:
        cond = {"encoder_hidden_states": policy.encode_prompts(_prompts(1, shape))}
    cond = _floating_to(cond, policy.weight_dtype)  # nested dicts (SDXL's added_cond_kwargs) too
    x = torch.zeros(1, *policy.latent_shape(), device=policy.device, dtype=policy.weight_dtype)
    t = torch.tensor([500], device=policy.device)

    def forward() -> None:
        with torch.no_grad(), policy._autocast():
            policy.unet(x, t, **cond)

    return count_flops(forward)


def bench_policy(args: argparse.Namespace, device: torch.device) -> Any:
    """The policy ``--shape`` names: the shipped shapes model with the default run's LoRA (loaded as
    train loads it), or random-weight SD / SDXL / SD3 / FLUX shapes with DDPO's rank-4 adapter."""
    from diffloop.config import LoraConfig, PerformanceConfig
    from diffloop.performance import set_backend_flags

    dtype = DTYPES[args.dtype]
    set_backend_flags(PerformanceConfig(**args.perf), device)
    kwargs = {
        "device": device,
        "weight_dtype": dtype,
        "logprob_reduction": "mean",
        "gradient_checkpointing": args.gradient_checkpointing,
        "performance": PerformanceConfig(**args.perf),
    }
    if (
        args.shape == "shapes"
    ):  # the shipped model with the default run's LoRA, loaded as train does
        from diffloop.config import DEFAULT_CONFIG, load_config, packaged_config
        from diffloop.policies.families import load_policy

        default = load_config(packaged_config(DEFAULT_CONFIG))
        torch.manual_seed(0)
        return load_policy(default.model, default.lora, **kwargs)
    policy_class, components, extra = policy_parts(args, device)
    return policy_class(
        components,
        LoraConfig(rank=4, alpha=4.0),  # DDPO's adapter, as docs/performance.md measured
        **kwargs,
        **extra,
    )


def policy_parts(args: argparse.Namespace, device: torch.device) -> tuple[type, dict, dict]:
    """(policy class, components, constructor settings) of a random-weight ``--shape`` (every
    shape but ``shapes``), the components built on ``device`` (``meta``: the memory plan's)."""
    from diffloop.policies.diffusers_policy import DDIMPolicy

    policy_class, components, extra = DDIMPolicy, None, {}
    if args.shape in SDXL_SHAPES:  # random-weight SDXL shapes (diffloop.testing.tiny_sdxl)
        from diffloop.policies.sdxl import SDXLPolicy
        from diffloop.testing.tiny_sdxl import build_sdxl_components

        policy_class = SDXLPolicy
        components = build_sdxl_components(SDXL_SHAPES[args.shape], device=device)
    elif args.shape in SD3_SHAPES:  # random-weight SD3 shapes (diffloop.testing.tiny_flow)
        from diffloop.policies.sd3 import SD3Policy
        from diffloop.testing.tiny_flow import build_sd3_components

        size, resolution = SD3_SHAPES[args.shape]
        policy_class, extra = SD3Policy, {"resolution": resolution}
        components = build_sd3_components(size, device=device)
    elif args.shape in FLUX_SHAPES:  # random-weight FLUX.1-dev shapes (diffloop.testing.tiny_flux)
        from diffloop.config import SampleConfig
        from diffloop.policies.flux import FluxPolicy
        from diffloop.testing.tiny_flux import build_flux_components

        size, resolution = FLUX_SHAPES[args.shape]
        sample = SampleConfig(guidance_scale=args.guidance_scale)  # the guidance embedding's input
        policy_class, extra = FluxPolicy, {"resolution": resolution, "sample": sample}
        components = build_flux_components(size, device=device)
    elif args.shape in FLUX2_SHAPES:  # random-weight FLUX.2 shapes (diffloop.testing.tiny_flux2)
        return _flux2_bench_policy(args, device)
    elif args.shape in QWEN_IMAGE_SHAPES:  # random-weight Qwen-Image (testing.tiny_qwen_image)
        from diffloop.config import SampleConfig
        from diffloop.policies.qwen_image import QwenImagePolicy
        from diffloop.testing.tiny_qwen_image import build_qwen_image_components

        size, resolution = QWEN_IMAGE_SHAPES[args.shape]
        sample = SampleConfig(guidance_scale=args.guidance_scale)  # true CFG above 1
        policy_class, extra = QwenImagePolicy, {"resolution": resolution, "sample": sample}
        components = build_qwen_image_components(size, device=device)
    elif args.shape in ZIMAGE_SHAPES:  # random-weight Z-Image (diffloop.testing.tiny_zimage)
        from diffloop.config import SampleConfig
        from diffloop.policies.zimage import ZImagePolicy
        from diffloop.testing.tiny_zimage import build_zimage_components

        size, resolution = ZIMAGE_SHAPES[args.shape]
        sample = SampleConfig(guidance_scale=args.guidance_scale)  # CFG above 1
        policy_class, extra = ZImagePolicy, {"resolution": resolution, "sample": sample}
        layers = 2 if size == "z_image" else None  # the transformer's cost is the same
        components = build_zimage_components(size, text_encoder_layers=layers, device=device)
    return policy_class, components or build_components(args.shape, device), extra


def _flux2_bench_policy(args: argparse.Namespace, device: torch.device) -> tuple[Any, dict, dict]:
    """(policy class, components, constructor settings) of a FLUX.2 shape: dev with
    ``--guidance-scale`` as its guidance embedding's input; Klein undistilled, so CFG runs when
    ``--guidance-scale`` > 1; the text layers the shape's encoder has (``FLUX2_OUT_LAYERS``)."""
    from diffloop.config import Flux2Config, SampleConfig
    from diffloop.policies.flux2 import Flux2KleinPolicy, Flux2Policy
    from diffloop.testing.tiny_flux2 import FLUX2_OUT_LAYERS, build_flux2_components, is_klein

    size, resolution = FLUX2_SHAPES[args.shape]
    components = build_flux2_components(size, device=device)
    policy_class = Flux2KleinPolicy if is_klein(size) else Flux2Policy
    if is_klein(size):
        components["is_distilled"] = False
    extra = {
        "resolution": resolution,
        "sample": SampleConfig(guidance_scale=args.guidance_scale),
        "flux2": Flux2Config(text_encoder_out_layers=list(FLUX2_OUT_LAYERS[size])),
    }
    return policy_class, components, extra


def bench_sd(run: BenchRun) -> None:
    """Time and count sampling, decoding (latent models), training and end to end on
    ``bench_policy``'s policy, with the on-policy log-prob check, into ``run.out["items"]``."""
    args, device, out = run.args, run.device, run.out
    policy = bench_policy(args, device)
    out["options"] = {
        "performance": asdict(policy.performance),
        "gradient_checkpointing": args.gradient_checkpointing,
        "sample_batch": args.sample_batch,
        "train_batch": args.train_batch,
    }
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-6)
    steps, cfg, eta = args.steps, args.guidance_scale, 1.0
    evals_per_step = policy.evaluations_per_step(cfg)  # 2 with CFG; 1 for FLUX (distilled)
    out["floor"]["unet_flop_per_eval"] = _unet_flops_per_eval_sd(policy, args.shape)
    sb, tb = args.sample_batch, args.train_batch
    prompts = _prompts(sb, args.shape)

    def sample() -> Any:
        return policy.sample(
            prompts, _generators(sb, device), num_steps=steps, eta=eta, guidance_scale=cfg
        )

    def eager(flops: Callable[[], float]) -> Callable[[], float]:
        def counted() -> float:  # FLOPs are the work's, counted on the uncompiled modules
            with policy.uncompiled():
                return flops()

        return counted

    # Sampling (policy.sample includes text encoding and VAE decoding). Each item's FLOPs are
    # counted on one extra untimed call of exactly the timed function, so the fraction of matmul is
    # honest.
    sample_evals = sb * steps * evals_per_step
    sampled = run_item(
        run,
        "sample",
        sample,
        sb,
        eager(lambda: count_flops(sample)),
        sample_evals,
        f"policy.sample: batch {sb}, {steps} DDIM steps, CFG {cfg}, eta {eta}, incl. decode",
    )

    # Decoding alone, to show how much of sampling it costs.
    if policy.vae is not None:
        z = torch.randn(
            sb,
            *policy.latent_shape(),
            device=device,
            generator=torch.Generator(device).manual_seed(0),
        )
        run_item(
            run,
            "decode",
            lambda: policy.decode(z),
            sb,
            eager(lambda: count_flops(lambda: policy.decode(z))),
            None,
            f"policy.decode: batch {sb}",
        )

    # Training on trajectories of train_batch samples (sampled once, untimed, inside the item).
    traj: list[Any] = []

    def training_trajectories() -> Any:
        if not traj:
            traj.append(
                policy.sample(
                    _prompts(tb, args.shape),
                    _generators(tb, device, 1000),
                    num_steps=steps,
                    eta=eta,
                    guidance_scale=cfg,
                )
            )
        return traj[0]

    def train() -> None:
        train_pass(
            policy, training_trajectories(), tb, eta=eta, guidance_scale=cfg, optimizer=optimizer
        )

    def train_flops() -> float:
        training_trajectories()  # sampled outside the counter: count training only
        return count_flops(train)

    # The training trajectories, checked on-policy before any update.
    if not run.deadline.exceeded():
        out["onpolicy_logprob_err"] = onpolicy_logprob_err(
            policy, training_trajectories(), eta=eta, guidance_scale=cfg
        )
    trained = run_item(
        run,
        "train",
        train,
        tb,
        eager(train_flops),
        tb * steps * evals_per_step,
        f"log-prob + backward over {steps} steps, train batch {tb}, CFG {cfg}, AdamW step",
    )

    # End to end: sample sb images (decoded), then train on all of them in minibatches of tb.
    def end_to_end() -> None:
        train_pass(policy, sample(), tb, eta=eta, guidance_scale=cfg, optimizer=optimizer)

    def e2e_flops() -> float:
        # Training FLOPs are linear in the number of samples trained on: train flops / tb per
        # sample.
        if sampled is None or trained is None:
            return float(count_flops(end_to_end))
        return sampled.flops + trained.flops / tb * sb

    run_item(
        run,
        "end_to_end",
        end_to_end,
        sb,
        eager(e2e_flops),
        2 * sb * steps * evals_per_step,
        f"sample {sb} (incl. decode) + train on them (batch {tb})",
    )
    # The memory plan of this very setting beside the measured peaks: after the items, so none of
    # them waits for it (its meta passes take CPU seconds and no device memory).
    out["memory_plan"] = plan_vs_measured(args, policy, out["items"], device, policy_parts)


def run_item(
    run: BenchRun,
    name: str,
    fn: Callable[[], Any],
    samples: int,
    flops: Callable[[], float],
    unet_evals: int | None,
    what: str,
) -> ItemResult | None:
    """Count ``fn``'s FLOPs (``flops()``), time it, store the result in ``out["items"][name]``. An
    item past the deadline or out of device memory is listed in ``out["skipped"]`` and the run goes
    on."""
    args, device, deadline, out = run.args, run.device, run.deadline, run.out
    if deadline.exceeded():
        out["skipped"].append(f"{name}: time limit {args.time_limit_s} s reached")
        return None
    try:
        counted = float(flops())
        warm: list[float] = []
        with PeakMemory(device) as mem:
            med, times = median_seconds(fn, device, args.repeats, args.warmup, deadline, warm)
    except TimeoutError as e:
        out["skipped"].append(f"{name}: {e}")
        return None
    except torch.OutOfMemoryError as e:
        out["skipped"].append(f"{name}: out of memory ({str(e).splitlines()[0]})")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    result = make_item(name, what, samples, med, times, counted, run.matmul_rate, unet_evals, mem)
    if warm:  # compiled variants: the first call compiles; compile_s = first call - a timed call
        result.extra.update(first_call_s=warm[0], compile_s=max(0.0, warm[0] - med))
    out["items"][name] = asdict(result)
    return result
