"""Throughput benchmark (`diffloop bench`): sampling, training and end-to-end cost per sample.

Builds SD1.5- or SDXL-shaped models with random weights from configs (nothing downloaded), runs the
real code paths (the policy's ``sample``, the trainer's gradient pass ``loops.minibatch_backward``)
and reports medians over ``--repeats`` after ``--warmup`` untimed runs, peak memory, and the ratio
to a hardware floor measured in the same process:

    matmul rate   R = 2 n^3 / t_matmul                      (FLOP/s; bf16 on CUDA, fp32 on CPU)
    UNet cost     F = FlopCounterMode count of one UNet forward at batch 1   (FLOP per evaluation)
    achieved      A = (counted FLOPs of the timed work) / (median seconds)
    fraction      A / R      (1.0 would mean the work ran at the speed of one large matmul)

Shapes: ``tiny`` (a (32, 64)-channel UNet, for the CPU test suite), ``sd15`` (SD 1.5: UNet
(320, 640, 1280, 1280), CLIP ViT-L text encoder, SD VAE, 64x64 latents), ``sdxl`` (``SDXLPolicy`` on
SDXL base 1.0's shapes: UNet, both text encoders, VAE, 1024 px) and ``tiny_xl`` (the test suite's
tiny SDXL), ``sd35`` (``SD3Policy`` on SD3.5-medium's shapes at 512 px) and ``tiny_sd3``, ``flux``
builds a FLUX.1-dev-shaped policy (``FluxPolicy``: the real transformer config, 11.9e9 parameters,
at Flow-GRPO's 512 px and 6 steps;
T5-XXL's width with 2 of its layers) and ``tiny_flux`` the test suite's tiny FLUX; a FLUX step is
one transformer evaluation whatever ``--guidance-scale`` (the guidance embedding's input, no CFG).

Each run also records ``diffloop.memory``'s plan of its own setting beside the peaks it measured
(``memory_plan`` in the JSON: planned and measured MiB per phase, their ratio; ``plan.py``).

Reference (DDPO's code on one H200, SD1.5 shape): sampling 2.42 images/s at batch 16 (50 DDIM steps,
CFG 5, i.e. 242 UNet evals/s), training 1.91 s per sample at train batch 4, 0.803 TFLOP per UNet
eval.
"""

from diffloop.tools.bench.main import bench_main, parse_args, parse_threads
from diffloop.tools.bench.measure import BenchRun, Deadline, count_flops, matmul_flops_per_s
from diffloop.tools.bench.models import SHAPES, build_components, shapes_defaults
from diffloop.tools.bench.policy_bench import bench_policy, bench_sd, run_item

__all__ = [
    "SHAPES",
    "BenchRun",
    "Deadline",
    "bench_main",
    "bench_policy",
    "bench_sd",
    "build_components",
    "count_flops",
    "matmul_flops_per_s",
    "parse_args",
    "parse_threads",
    "run_item",
    "shapes_defaults",
]
