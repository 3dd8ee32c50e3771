"""Throughput benchmark (`diffloop bench`): sampling, training and end-to-end cost per sample.

Builds SD1.5- or SDXL-shaped models with random weights from configs (nothing downloaded), runs the
real code paths (the policy's ``sample``, the trainer's gradient pass ``loops.minibatch_backward``) and
reports medians over ``--repeats`` after ``--warmup`` untimed runs, peak memory, and the ratio to a
hardware floor measured in the same process:

    matmul rate   R = 2 n^3 / t_matmul                      (FLOP/s; bf16 on CUDA, fp32 on CPU)
    UNet cost     F = FlopCounterMode count of one UNet forward at batch 1   (FLOP per evaluation)
    achieved      A = (counted FLOPs of the timed work) / (median seconds)
    fraction      A / R      (1.0 would mean the work ran at the speed of one large matmul)

Shapes: ``tiny`` (a (32, 64)-channel UNet, for the CPU test suite), ``sd15`` (SD 1.5: UNet
(320, 640, 1280, 1280), CLIP ViT-L text encoder, SD VAE, 64x64 latents), ``sdxl`` (``SDXLPolicy`` on
SDXL base 1.0's shapes: UNet, both text encoders, VAE, 1024 px) and ``tiny_xl`` (the test suite's
tiny SDXL), ``sd35`` (``SD3Policy`` on SD3.5-medium's shapes at 512 px) and ``tiny_sd3``, ``flux`` builds a FLUX.1-dev-shaped policy
(``FluxPolicy``: the real transformer config, 11.9e9 parameters, at Flow-GRPO's 512 px and 6 steps;
T5-XXL's width with 2 of its layers) and ``tiny_flux`` the test suite's tiny FLUX; a FLUX step is one
transformer evaluation whatever ``--guidance-scale`` (the guidance embedding's input, no CFG).

Reference (DDPO's code on one H200, SD1.5 shape): sampling 2.42 images/s at batch 16 (50 DDIM steps,
CFG 5, i.e. 242 UNet evals/s), training 1.91 s per sample at train batch 4, 0.803 TFLOP per UNet eval.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from typing_extensions import Self

from diffloop.errors import CommandParser

SHAPES = ("tiny", "sd15", "sdxl", "tiny_xl", "sd35", "tiny_sd3", "flux", "tiny_flux", "shapes")
# SDXL shapes: diffloop.testing.tiny_sdxl.SDXL_CONFIGS size (base 1.0 at 1024 px; the fast-test one)
SDXL_SHAPES = {"sdxl": "base", "tiny_xl": "tiny"}
# flow-matching shapes: (diffloop.testing.tiny_flow.SD3_CONFIGS size, image side or None)
SD3_SHAPES = {"sd35": ("sd35_medium", 512), "tiny_sd3": ("tiny", None)}
# (diffloop.testing.tiny_flux.FLUX_CONFIGS size, image side or None): FLUX.1-dev at 512 px
FLUX_SHAPES = {"flux": ("dev", 512), "tiny_flux": ("tiny", None)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# DDPO's reference implementation on one H200, SD1.5 shape (see the module docstring).
REFERENCE_SD15_H200 = {
    "sample_images_per_s": 2.42,
    "sample_unet_evals_per_s": 242.0,
    "train_s_per_sample": 1.91,
    "unet_tflop_per_eval": 0.803,
    "settings": "sample batch 16, 50 DDIM steps, CFG 5, train batch 4",
}

# Named settings for --variants: performance.* options (PerformanceConfig fields) and bench settings.
# The first variant listed is the baseline the others' speed-ups are computed against.
VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {},
    "eager_attention": {"perf": {"attention": "eager"}},
    "channels_last": {"perf": {"channels_last": True}},
    "compile_sampling": {"perf": {"compile": "sampling"}},
    "cudagraphs": {"perf": {"compile": "sampling", "compile_mode": "reduce-overhead"}},
    "compile_all": {"perf": {"compile": "all"}},
    # The issue's reference measurements found compiled LoRA training slower than eager (95 vs 105
    # samples/s): "fast" compiles the sampling loop (with CUDA graphs) and keeps training eager.
    "fast": {
        "perf": {"compile": "sampling", "compile_mode": "reduce-overhead", "channels_last": True}
    },
    "low_memory": {
        "perf": {"decode_batch_size": 1},
        "gradient_checkpointing": True,
        "sample_batch": 4,
        "train_batch": 1,
    },
}

# Per-shape defaults for options left unset: (sample_batch, train_batch, steps, repeats, warmup, matmul n)
SHAPE_DEFAULTS: dict[str, dict[str, int]] = {
    # SD3.5-medium at 512 px (Flow-GRPO's training resolution), its 10 training steps, batch 9
    "sd35": {
        "sample_batch": 9,
        "train_batch": 9,
        "steps": 10,
        "repeats": 3,
        "warmup": 1,
        "matmul_n": 8192,
    },
    "tiny_sd3": {
        "sample_batch": 2,
        "train_batch": 2,
        "steps": 3,
        "repeats": 1,
        "warmup": 0,
        "matmul_n": 256,
    },
    # FLUX.1-dev at 512 px with Flow-GRPO's 6 training steps and its sampling batch 3
    "flux": {
        "sample_batch": 3,
        "train_batch": 3,
        "steps": 6,
        "repeats": 3,
        "warmup": 1,
        "matmul_n": 8192,
    },
    "tiny_flux": {
        "sample_batch": 2,
        "train_batch": 2,
        "steps": 3,
        "repeats": 1,
        "warmup": 0,
        "matmul_n": 256,
    },
    "tiny": {
        "sample_batch": 2,
        "train_batch": 2,
        "steps": 2,
        "repeats": 1,
        "warmup": 0,
        "matmul_n": 256,
    },
    "tiny_xl": {
        "sample_batch": 1,
        "train_batch": 1,
        "steps": 2,
        "repeats": 1,
        "warmup": 0,
        "matmul_n": 256,
    },
    "sd15": {
        "sample_batch": 16,
        "train_batch": 4,
        "steps": 50,
        "repeats": 3,
        "warmup": 1,
        "matmul_n": 8192,
    },
    "sdxl": {
        "sample_batch": 4,
        "train_batch": 1,
        "steps": 50,
        "repeats": 3,
        "warmup": 1,
        "matmul_n": 8192,
    },
    # The embedded default (configs/shapes.yaml): sample.batch_size, train.batch_size, num_steps,
    # guidance_scale are read from that file (shapes_defaults); a 1024^2 matmul is the CPU floor.
    "shapes": {"repeats": 3, "warmup": 1, "matmul_n": 1024},
}


def shapes_defaults() -> dict[str, Any]:
    """The shapes world's bench settings from the packaged shapes.yaml (the default run's shapes)."""
    from diffloop.config import DEFAULT_CONFIG, load_config, packaged_config

    c = load_config(packaged_config(DEFAULT_CONFIG))
    return {
        "sample_batch": c.sample.batch_size,
        "train_batch": c.train.batch_size,
        "steps": c.sample.num_steps,
        "guidance_scale": c.sample.guidance_scale,
    }


# ---------------------------------------------------------------------------------------- model configs


def unet_config(shape: str) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs for ``shape`` (SD1.5 / SDXL values from their config.json)."""
    if shape == "tiny":
        from diffloop.testing.tiny import UNET_CONFIG

        return dict(UNET_CONFIG)  # the test suite's tiny UNet (diffloop.testing.tiny)
    if shape == "sd15":
        return {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        }
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _sd15_text_config(tokenizer: Any) -> Any:
    """CLIP ViT-L/14's text tower, as SD 1.5 ships it."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


SD15_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> Any:
    """Stable Diffusion's DDIM schedule (``diffloop.testing.tiny.sd_ddim_scheduler``)."""
    from diffloop.testing.tiny import sd_ddim_scheduler as build

    return build(prediction_type)


def build_components(shape: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Random-weight {"unet", "text_encoder", "tokenizer", "scheduler", "vae"} for an SD-style shape.

    ``tiny`` is the test suite's tiny SD (``diffloop.testing.tiny``). Others are built directly on
    ``device`` (random init of 1e9 parameters on the CPU alone takes minutes). The tokenizer is a
    word-level one (no download); CLIP's cost does not depend on which ids it sees.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffloop.testing import tiny

    tokenizer = tiny.make_word_tokenizer(tiny.PROMPT_WORDS)
    if shape == "tiny":
        return tiny.build_tiny_components(seed=seed, tokenizer=tokenizer, device=device)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(shape))
        text_encoder = CLIPTextModel(_sd15_text_config(tokenizer))
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    scheduler = sd_ddim_scheduler()
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "vae": vae,
    }


# ---------------------------------------------------------------------------------------- measurement


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch's ``FlopCounterMode`` attributes to the ops ``fn()`` runs (matmul/conv/attention;
    a multiply-add counts 2). Backward ops are counted when ``fn`` calls ``backward``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def _cpu_attention_formulas() -> dict[Any, Any]:
    """torch counts the CUDA attention kernels (flash, efficient, cudnn) but not the CPU one that
    ``scaled_dot_product_attention`` dispatches to; without this the CPU count misses QK^T and AV."""
    aten = torch.ops.aten
    mapping: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_backward
    return mapping


def _sdpa_forward(
    q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _sdpa_backward(
    grad_shape: Any,
    q_shape: Any,
    k_shape: Any,
    v_shape: Any,
    *args: Any,
    out_shape: Any = None,
    **kw: Any,
) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class Deadline:
    """Wall-clock budget for the whole run; items check it before each timed repeat."""

    def __init__(self, limit_s: float | None) -> None:
        self.start = time.perf_counter()
        self.limit_s = limit_s

    def exceeded(self) -> bool:
        return self.limit_s is not None and time.perf_counter() - self.start > self.limit_s


def median_seconds(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int,
    warmup: int,
    deadline: Deadline,
    warmup_times: list[float] | None = None,
) -> tuple[float, list[float]]:
    """Median over ``repeats`` timed calls after ``warmup`` untimed ones (their times appended to
    ``warmup_times``: the first includes torch.compile's compilation). Stops early at the deadline
    once at least one call is timed; raises TimeoutError if none could be."""
    for _ in range(warmup):
        if deadline.exceeded():
            break
        seconds = time_once(fn, device)
        if warmup_times is not None:
            warmup_times.append(seconds)
    times: list[float] = []
    for _ in range(repeats):
        if times and deadline.exceeded():
            break
        if not times and deadline.exceeded():
            raise TimeoutError("time limit reached before the first timed repeat")
        times.append(time_once(fn, device))
    return statistics.median(times), times


class PeakMemory:
    """Peak memory of a block: CUDA max allocated (MiB), or growth of the process's peak resident set
    on CPU (MiB; 0 when earlier work already reached that peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss_growth"

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss0 = _peak_rss_mib()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mib = _peak_rss_mib() - self._rss0


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale * 1.0


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Hardware floor: R = 2 n^3 / t for one (n, n) @ (n, n) ``torch.matmul``, best of ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, allocation
    best = min(time_once(lambda: torch.matmul(a, b), device) for _ in range(repeats))
    return 2.0 * n**3 / best


# ---------------------------------------------------------------------------------------- results


@dataclass
class ItemResult:
    """One timed item. ``per_sample_s`` = median_s / samples; ``flops`` = counted FLOPs of one timed
    call; ``fraction_of_matmul`` = flops / median_s / matmul rate."""

    name: str
    what: str
    samples: int
    median_s: float
    times_s: list[float]
    per_sample_s: float
    samples_per_s: float
    flops: float
    tflops_per_s: float
    fraction_of_matmul: float
    unet_evals_per_s: float | None = None
    peak_memory_mib: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def make_item(
    name: str,
    what: str,
    samples: int,
    median_s: float,
    times_s: list[float],
    flops: float,
    matmul_rate: float,
    unet_evals: int | None,
    mem: PeakMemory,
) -> ItemResult:
    achieved = flops / median_s
    return ItemResult(
        name=name,
        what=what,
        samples=samples,
        median_s=median_s,
        times_s=times_s,
        per_sample_s=median_s / samples,
        samples_per_s=samples / median_s,
        flops=flops,
        tflops_per_s=achieved / 1e12,
        fraction_of_matmul=achieved / matmul_rate,
        unet_evals_per_s=None if unet_evals is None else unet_evals / median_s,
        peak_memory_mib=mem.mib,
    )


# ---------------------------------------------------------------------------------------- SD policy path


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
    """max |log p recomputed by the training path - log p recorded while sampling| over every step of
    ``traj`` (``loops.onpolicy_logprob_err``): the correctness check of each speed option (compiled
    sampling vs eager or compiled training, merged LoRA, channels-last)."""
    from diffloop import loops

    sampler = loops.SamplerSettings(
        num_steps=traj.timesteps.shape[1], eta=eta, guidance_scale=guidance_scale
    )
    return loops.onpolicy_logprob_err(policy, traj, sampler)


def _unet_flops_per_eval_sd(policy: Any, shape: str) -> int:
    """F: FLOPs of one UNet (or flow transformer) forward at batch 1 (the policy's, LoRA included)."""
    if hasattr(policy, "unet_conditioning"):  # SDXL / SD3 / FLUX: pooled embeddings too
        cond = policy.unet_conditioning(_prompts(1, shape))
    else:
        cond = {"encoder_hidden_states": policy.encode_prompts(_prompts(1, shape))}
    from diffloop.policies.diffusers_policy import cat_branches

    cond = cat_branches([cond], policy.weight_dtype)  # nested dicts (SDXL's added_cond_kwargs) too
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
    from diffloop.policies.diffusers_policy import DDIMPolicy
    from diffloop.trainer import set_backend_flags

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
    return policy_class(
        components or build_components(args.shape, device),
        LoraConfig(rank=4, alpha=4.0),  # DDPO's adapter, as docs/performance.md measured
        **kwargs,
        **extra,
    )


def bench_sd(
    args: argparse.Namespace,
    device: torch.device,
    matmul_rate: float,
    deadline: Deadline,
    out: dict[str, Any],
) -> None:
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

    def item(
        name: str,
        fn: Callable[[], Any],
        samples: int,
        flops: Callable[[], float],
        unet_evals: int | None,
        what: str,
    ) -> ItemResult | None:
        def eager_flops() -> float:  # FLOPs are the work's, counted on the uncompiled modules
            with policy.uncompiled():
                return flops()

        return run_item(
            args,
            device,
            matmul_rate,
            deadline,
            out,
            name,
            fn,
            samples,
            eager_flops,
            unet_evals,
            what,
        )

    # Sampling (policy.sample includes text encoding and VAE decoding). Each item's FLOPs are counted
    # on one extra untimed call of exactly the timed function, so the fraction of matmul is honest.
    sample_evals = sb * steps * evals_per_step
    sampled = item(
        "sample",
        sample,
        sb,
        lambda: count_flops(sample),
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
        item(
            "decode",
            lambda: policy.decode(z),
            sb,
            lambda: count_flops(lambda: policy.decode(z)),
            None,
            f"policy.decode: batch {sb}",
        )

    # Training on trajectories of train_batch samples (sampled once, untimed, inside the item).
    traj: list[Any] = []

    def train() -> None:
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
        train_pass(policy, traj[0], tb, eta=eta, guidance_scale=cfg, optimizer=optimizer)

    def train_flops() -> float:
        train()  # samples the trajectories outside the counter: count training only
        return count_flops(train)

    if not deadline.exceeded():  # the training trajectories, checked on-policy before any update
        traj.append(
            policy.sample(
                _prompts(tb, args.shape),
                _generators(tb, device, 1000),
                num_steps=steps,
                eta=eta,
                guidance_scale=cfg,
            )
        )
        out["onpolicy_logprob_err"] = onpolicy_logprob_err(
            policy, traj[0], eta=eta, guidance_scale=cfg
        )
    trained = item(
        "train",
        train,
        tb,
        train_flops,
        tb * steps * evals_per_step,
        f"log-prob + backward over {steps} steps, train batch {tb}, CFG {cfg}, AdamW step",
    )

    # End to end: sample sb images (decoded), then train on all of them in minibatches of tb.
    def end_to_end() -> None:
        train_pass(policy, sample(), tb, eta=eta, guidance_scale=cfg, optimizer=optimizer)

    def e2e_flops() -> float:
        # Training FLOPs are linear in the number of samples trained on: train flops / tb per sample.
        if sampled is None or trained is None:
            return float(count_flops(end_to_end))
        return sampled.flops + trained.flops / tb * sb

    item(
        "end_to_end",
        end_to_end,
        sb,
        e2e_flops,
        2 * sb * steps * evals_per_step,
        f"sample {sb} (incl. decode) + train on them (batch {tb})",
    )


def run_item(
    args: argparse.Namespace,
    device: torch.device,
    matmul_rate: float,
    deadline: Deadline,
    out: dict[str, Any],
    name: str,
    fn: Callable[[], Any],
    samples: int,
    flops: Callable[[], float],
    unet_evals: int | None,
    what: str,
) -> ItemResult | None:
    """Count ``fn``'s FLOPs (``flops()``), time it, store the result in ``out["items"][name]``. An item
    past the deadline or out of device memory is listed in ``out["skipped"]`` and the run goes on."""
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
    result = make_item(name, what, samples, med, times, counted, matmul_rate, unet_evals, mem)
    if warm:  # compiled variants: the first call compiles; compile_s = first call - a timed call
        result.extra.update(first_call_s=warm[0], compile_s=max(0.0, warm[0] - med))
    out["items"][name] = asdict(result)
    return result


# ---------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = CommandParser(prog="diffloop bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="bf16 on CUDA, fp32 on CPU")
    p.add_argument("--sample-batch", type=int, default=None)
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps T")
    p.add_argument("--guidance-scale", type=float, default=None, help="5 (shapes: shapes.yaml's)")
    p.add_argument(
        "--threads",
        default=None,
        help="torch CPU thread counts to run the whole bench at, one after another, each with its own "
        "matmul floor: comma-separated (1,2,4) or 'all' (1 .. the available cores); default: as set",
    )
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument(
        "--matmul-n", type=int, default=None, help="side of the square matmul for the floor"
    )
    p.add_argument(
        "--perf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a performance.* option of the trainer (repeatable), e.g. --perf compile=all "
        "--perf channels_last=true",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute UNet activations in backward",
    )
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated named settings run one after another, the first as the baseline of "
        f"the speed-ups (each adds to --perf): {', '.join(VARIANTS)}",
    )
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="skip the remaining items (each keeps what it timed) once exceeded",
    )
    args = p.parse_args(argv)
    defaults = {
        **(shapes_defaults() if args.shape == "shapes" else {}),
        **SHAPE_DEFAULTS[args.shape],
    }
    if args.guidance_scale is None:
        args.guidance_scale = defaults.pop("guidance_scale", 5.0)
    defaults.pop("guidance_scale", None)
    try:
        args.threads = parse_threads(args.threads)
    except ValueError as e:
        p.error(str(e))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    for key in ("sample_batch", "train_batch", "steps", "repeats", "matmul_n"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.variants is not None:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown or not args.variants:
            p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        args.perf = performance_options(args.perf, args.dtype)
    except ValueError as e:  # ConfigError names the field and the fix
        p.error(str(e))
    return args


def parse_threads(text: str | None, cores: int | None = None) -> list[int] | None:
    """``--threads``: "1,2,4" -> [1, 2, 4]; "all" -> [1, ..., available cores]; None -> None."""
    from diffloop.config import available_cores

    if text is None:
        return None
    if text.strip() == "all":
        return list(range(1, (cores or available_cores()) + 1))
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(
            f"--threads must be 'all' or comma-separated counts >= 1 (e.g. 1,2), got {text!r}"
        )
    return list(dict.fromkeys(counts))  # each count once, in the order given


def performance_options(items: list[str], dtype: str) -> dict[str, Any]:
    """``["compile=all", ...]`` -> validated PerformanceConfig fields (as the trainer checks them)."""
    from diffloop.config import load_config

    precision = {"fp32": "no"}.get(dtype, dtype)
    overrides = [f"train.mixed_precision={precision}", *(f"performance.{kv}" for kv in items)]
    return asdict(load_config(None, overrides).performance)


def variant_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """``args`` with variant ``name``'s settings on top (its perf options added to --perf)."""
    spec = VARIANTS[name]
    merged = argparse.Namespace(**vars(args))
    merged.perf = performance_options(
        [f"{k}={v}" for k, v in {**args.perf, **spec.get("perf", {})}.items()], args.dtype
    )
    for key in ("gradient_checkpointing", "sample_batch", "train_batch"):
        if key in spec:
            setattr(merged, key, spec[key])
    return merged


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def format_table(result: dict[str, Any]) -> str:
    """The results as a fixed-width text table (one row per timed item)."""
    head = (
        f"{'item':<16}{'median s':>10}{'s/sample':>10}{'samples/s':>11}{'UNet ev/s':>11}"
        f"{'TFLOP/s':>9}{'of matmul':>10}{'peak MiB':>10}"
    )
    lines = [
        (
            f"diffloop bench: shape={result['settings']['shape']} device={result['device_name']} "
            f"dtype={result['settings']['dtype']} torch={result['torch']} diffusers={result['diffusers']}"
        ),
        (
            f"floor: matmul {result['floor']['matmul_tflops_per_s']:.3g} TFLOP/s "
            f"(n={result['settings']['matmul_n']}, {result['torch_threads']} thread(s) unless per thread count below), "
            f"UNet {result['floor'].get('unet_flop_per_eval', 0) / 1e9:.4g} GFLOP per eval (batch 1)"
        ),
        head,
        "-" * len(head),
    ]
    for name, it in result["items"].items():
        evals = "-" if it["unet_evals_per_s"] is None else f"{it['unet_evals_per_s']:.4g}"
        mem = "n/a" if it["peak_memory_mib"] is None else f"{it['peak_memory_mib']:.0f}"
        lines.append(
            f"{name:<16}{it['median_s']:>10.4g}{it['per_sample_s']:>10.4g}{it['samples_per_s']:>11.4g}"
            f"{evals:>11}{it['tflops_per_s']:>9.3g}{it['fraction_of_matmul']:>10.2%}{mem:>10}"
        )
    for name, it in result["items"].items():
        lines.append(f"  {name}: {it['what']}")
    lines += [f"note: {n}" for n in result["notes"]]
    lines += [f"skipped: {s}" for s in result["skipped"]]
    speedups = result.get("vs_reference_sd15_h200")
    if speedups:
        parts = [f"{k.removesuffix('_speedup')} {v:.2f}x" for k, v in speedups.items()]
        lines.append(
            f"speed-up over DDPO on one H200: {', '.join(parts)} "
            f"(reference: {REFERENCE_SD15_H200['settings']})"
        )
    return "\n".join(lines)


def run_variants(
    args: argparse.Namespace,
    device: torch.device,
    matmul_rate: float,
    deadline: Deadline,
    out: dict[str, Any],
) -> None:
    """Each variant on a fresh policy, results under ``out["variants"][name]``; the first variant's
    items are also the top-level ``items``, and each variant gets its speed-ups over it."""
    import gc

    out["variants"] = {}
    for name in args.variants:
        sub: dict[str, Any] = {"floor": {}, "items": {}, "skipped": [], "notes": []}
        try:
            bench_sd(variant_args(args, name), device, matmul_rate, deadline, sub)
        except Exception as e:  # noqa: BLE001 - a failed variant must not lose the others' numbers
            sub["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out["variants"][name] = sub
        out["skipped"] += [f"{name}/{s}" for s in sub["skipped"]]
        gc.collect()
        torch._dynamo.reset()  # compiled graphs of this variant's modules
        if device.type == "cuda":
            torch.cuda.empty_cache()
    first = out["variants"][args.variants[0]]
    out["items"] = first["items"]
    out["floor"].update(first["floor"])
    for sub in out["variants"].values():
        sub["speedup_vs_first"] = {
            k: first["items"][k]["median_s"]
            / it["median_s"]
            * (it["samples"] / first["items"][k]["samples"])
            for k, it in sub["items"].items()
            if k in first["items"]
        }


def format_variants(result: dict[str, Any]) -> str:
    """One row per variant: per-sample cost of each item, speed-up over the first, peak memory, ratio check."""
    items = ("sample", "train", "end_to_end")
    head = f"{'variant':<18}" + "".join(f"{i + ' s/sample':>20}{'x':>7}" for i in items)
    head += f"{'peak MiB':>10}{'logp err':>10}{'compile s':>10}"
    lines = ["", "variants (s/sample and speed-up over the first row):", head, "-" * len(head)]
    for name, sub in result["variants"].items():
        row = f"{name:<18}"
        for i in items:
            it = sub["items"].get(i)
            row += (
                f"{it['per_sample_s']:>20.4g}{sub['speedup_vs_first'][i]:>6.2f}x"
                if it
                else f"{'-':>20}{'-':>7}"
            )
        peaks = [
            it["peak_memory_mib"]
            for it in sub["items"].values()
            if it["peak_memory_mib"] is not None
        ]
        row += f"{max(peaks):>10.0f}" if peaks else f"{'-':>10}"
        err = sub.get("onpolicy_logprob_err")
        row += f"{err:>10.2g}" if err is not None else f"{'-':>10}"
        compile_s = [it["extra"].get("compile_s", 0.0) for it in sub["items"].values()]
        row += (
            f"{sum(compile_s):>10.3g}" if compile_s else f"{'-':>10}"
        )  # first calls minus steady ones
        lines.append(row + (f"  error: {sub['error']}" if "error" in sub else ""))
    return "\n".join(lines)


def compare_to_reference(items: dict[str, Any]) -> dict[str, float]:
    """Speed-ups over DDPO's H200 numbers (> 1 = faster than the reference), for the items timed."""
    ref = REFERENCE_SD15_H200
    out: dict[str, float] = {}
    if "sample" in items:
        out["sample_speedup"] = items["sample"]["samples_per_s"] / ref["sample_images_per_s"]
    if "train" in items:
        out["train_speedup"] = ref["train_s_per_sample"] / items["train"]["per_sample_s"]
    return out


def _device(name: str) -> torch.device:
    """``--device`` as a torch.device that exists here, else a one-line DiffloopError."""
    from diffloop.errors import DiffloopError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffloopError(
            f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffloopError(
            f"--device {name}: no CUDA device here (torch.cuda.is_available() is False)"
        )
    return device


def run_shape(
    args: argparse.Namespace,
    device: torch.device,
    matmul_rate: float,
    deadline: Deadline,
    out: dict[str, Any],
) -> None:
    """The items of ``args.shape`` (and its ``--variants``) into ``out``, at the current thread count."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if args.variants:
            run_variants(args, device, matmul_rate, deadline, out)
        else:
            bench_sd(args, device, matmul_rate, deadline, out)


def run_thread_counts(
    args: argparse.Namespace,
    device: torch.device,
    matmul_dtype: torch.dtype,
    deadline: Deadline,
    out: dict[str, Any],
) -> None:
    """The whole bench at each ``--threads`` count, into ``out["threads"][str(n)]``, each with its own
    matmul floor at that count (so each fraction is of the same threads' matmul rate); the first
    count's results are also the top-level ones."""
    out["threads"] = {}
    for n in args.threads:
        torch.set_num_threads(n)
        rate = matmul_flops_per_s(device, matmul_dtype, args.matmul_n)
        sub: dict[str, Any] = {
            "floor": {"matmul_tflops_per_s": rate / 1e12},
            "items": {},
            "skipped": [],
            "notes": [],
        }
        run_shape(args, device, rate, deadline, sub)
        out["threads"][str(n)] = sub
        out["skipped"] += [f"threads={n}/{s}" for s in sub["skipped"]]
    first = out["threads"][str(args.threads[0])]
    out["items"] = first["items"]
    out["floor"].update(first["floor"])
    out["notes"] += first["notes"]
    if "variants" in first:
        out["variants"] = first["variants"]


def format_threads(result: dict[str, Any]) -> str:
    """One row per thread count: the matmul floor, sampling and training throughput, each as a
    fraction of that floor, and the end-to-end speed-up over the first count."""
    head = (f"{'threads':>7}{'matmul GFLOP/s':>16}{'sample img/s':>14}{'UNet ev/s':>11}{'of matmul':>10}"
            f"{'train smp/s':>13}{'of matmul':>10}{'e2e smp/s':>11}{'e2e x':>7}{'logp err':>10}")  # fmt: skip
    lines = [
        "",
        "per thread count (each fraction is of that thread count's own matmul rate):",
        head,
        "-" * len(head),
    ]
    first_e2e = None
    for n, sub in result["threads"].items():
        it = sub["items"]
        row = f"{n:>7}{sub['floor']['matmul_tflops_per_s'] * 1e3:>16.4g}"
        for name, width in (("sample", 14), ("train", 13)):
            if name not in it:
                row += f"{'-':>{width}}" + (f"{'-':>11}" if name == "sample" else "") + f"{'-':>10}"
                continue
            row += f"{it[name]['samples_per_s']:>{width}.4g}"
            if name == "sample":
                row += f"{it[name]['unet_evals_per_s']:>11.4g}"
            row += f"{it[name]['fraction_of_matmul']:>10.2%}"
        e2e = it.get("end_to_end", {}).get("samples_per_s")
        first_e2e = first_e2e or e2e
        row += f"{e2e:>11.4g}{e2e / first_e2e:>6.2f}x" if e2e else f"{'-':>11}{'-':>7}"
        err = sub.get("onpolicy_logprob_err")  # with --variants: each variant's, in its own table
        lines.append(row + (f"{err:>10.2g}" if err is not None else f"{'-':>10}"))
    return "\n".join(lines)


def bench_main(argv: list[str] | None = None) -> int:
    """``diffloop bench``: run the benchmark, print the table, optionally write JSON. Returns 0."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    import diffusers

    device = _device(args.device)
    deadline = Deadline(args.time_limit_s)
    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict[str, Any] = {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "settings": vars(args).copy(),
        "floor": {"matmul_dtype": str(matmul_dtype)},
        "memory_kind": PeakMemory(device).kind,
        "items": {},
        "notes": [],
        "skipped": [],
    }
    if args.shape == "sd15":
        result["reference_sd15_h200"] = REFERENCE_SD15_H200
    before = torch.get_num_threads()
    try:
        if args.threads:
            run_thread_counts(args, device, matmul_dtype, deadline, result)
        else:
            result["floor"]["matmul_tflops_per_s"] = (
                matmul_flops_per_s(device, matmul_dtype, args.matmul_n) / 1e12
            )
            run_shape(args, device, result["floor"]["matmul_tflops_per_s"] * 1e12, deadline, result)
    finally:
        torch.set_num_threads(before)
    result["wall_s"] = time.perf_counter() - deadline.start
    if args.shape == "sd15":
        result["vs_reference_sd15_h200"] = compare_to_reference(result["items"])
    print(format_table(result))
    if args.threads:
        print(format_threads(result))
        if args.variants:
            for n, sub in result["threads"].items():
                print(f"\nthreads={n}:" + format_variants(sub))
    elif args.variants:
        print(format_variants(result))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(bench_main())
