"""The memory plan (``diffloop.memory``) of the very setting a bench run measures, beside the peaks
it measured.

The plan is arithmetic (``memory_plan``'s terms for the bench's model, resolution, text length,
batches, LoRA, dtype, gradient checkpointing and guidance); the measured peak of a phase is its
item's ``torch.cuda.max_memory_allocated`` (``PeakMemory``, reset at each item's start):

    phase      item         planned                              measured
    sampling   sample       resident + sampling terms            peak of ``policy.sample``
    training   train        resident + training terms            peak of the training pass
    peak       end_to_end   resident + the largest phase         peak of sample + train

and ``measured_over_planned`` = measured / planned (> 1: the plan is short). On CPU nothing is
measured in these units (the items' peaks are growth of the process's resident set): measured is
null there.
"""

import argparse
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

PHASE_ITEMS = {"sampling": "sample", "training": "train", "peak": "end_to_end"}
"""The plan's phase -> the bench item whose measured peak it is compared with."""

NOT_IN_PLAN = (
    (
        "in the measured peaks, not in the plan: the trajectories kept for training (every "
        "step's latents and log-probs) and the decoded images, the decode item's input latents, "
        "kernels' workspaces (cuBLAS, attention), autocast's fp32 copies and the allocator's "
        "rounding"
    ),
    (
        "AdamW's states exist only after the first optimizer step: the plan counts them "
        "resident, the sample item (timed before any training) has none"
    ),
    (
        "in neither: a reward model (the bench scores nothing), the CUDA context (not an "
        "allocation) and what the caching allocator reserves beyond what is allocated"
    ),
)


def plan_overrides(args: argparse.Namespace, policy: Any) -> list[str]:
    """``key=value`` overrides of the training config equivalent to the run (its
    ``model.pretrained`` aside): the dtype, batches, steps, guidance, gradient checkpointing, the
    rank-4 adapter, the ``--perf`` options changed, the policy's resolution and text length.
    ``sample.prompts_per_epoch`` is set only so that the config validates (train.batch_size must
    divide the samples of an epoch); the plan does not read it."""
    from diffloop.config import PerformanceConfig

    precision = {"fp32": "no"}.get(args.dtype, args.dtype)
    settings: dict[str, Any] = {
        "train.mixed_precision": precision,
        "train.gradient_checkpointing": args.gradient_checkpointing,
        "train.batch_size": args.train_batch,
        "sample.batch_size": args.sample_batch,
        "sample.num_steps": args.steps,
        "sample.guidance_scale": args.guidance_scale,
        "sample.prompts_per_epoch": math.lcm(args.sample_batch, args.train_batch, 2),
    }
    if args.shape != "shapes":  # the shipped model keeps the default run's LoRA and resolution
        settings |= {"lora.rank": 4, "lora.alpha": 4.0, "model.resolution": policy.image_size()}
        field = getattr(policy, "settings_field", None)
        tokens = getattr(policy, "max_sequence_length", None)
        if field is not None and tokens is not None:
            settings[f"model.{field}.max_sequence_length"] = tokens
    defaults = asdict(PerformanceConfig())
    settings |= {f"performance.{k}": v for k, v in args.perf.items() if defaults.get(k) != v}
    return [f"{k}={'null' if v is None else v}" for k, v in settings.items()]


def bench_architecture(args: argparse.Namespace, build_parts: Callable[..., Any]) -> Any:
    """The bench's own model on ``meta`` as ``diffloop.memory.Architecture``: the components
    ``build_parts`` (``policy_bench.policy_parts``) builds (the same configs and text-encoder
    depths as the measured model), or for ``shapes`` the shipped model through
    ``diffloop.memory.architecture``."""
    from diffloop.memory import Architecture, architecture

    if args.shape == "shapes":
        from diffloop.config import DEFAULT_CONFIG, load_config, packaged_config

        return architecture(load_config(packaged_config(DEFAULT_CONFIG)).model.pretrained)
    with torch.random.fork_rng(devices=[]):  # the builders seed the global generator
        policy_class, components, _ = build_parts(args, torch.device("meta"))
    modules = {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}
    return Architecture(
        family=policy_class.family_name,
        source=f"the bench's random-weight {args.shape} components, built on meta",
        components=modules,
        denoiser_name=policy_class.lora_component,
        text_encoder_names=tuple(n for n in policy_class.text_encoder_names if n in modules),
    )


def bench_plan(
    args: argparse.Namespace, policy: Any, build_parts: Callable[..., Any]
) -> tuple[Any, list[str]]:
    """(``MemoryPlan`` of the run, the config overrides it was made from; ``build_parts``: see
    ``bench_architecture``)."""
    from diffloop.config import DEFAULT_CONFIG, load_config, packaged_config
    from diffloop.memory import Settings, plan_for

    overrides = plan_overrides(args, policy)
    base = packaged_config(DEFAULT_CONFIG) if args.shape == "shapes" else None
    settings = Settings.from_config(load_config(base, overrides))
    return plan_for(bench_architecture(args, build_parts), settings), overrides


def _mib(n: float) -> float:
    return n / 2**20


def plan_vs_measured(
    args: argparse.Namespace,
    policy: Any,
    items: dict[str, Any],
    device: torch.device,
    build_parts: Callable[..., Any],
) -> dict[str, Any]:
    """The ``memory_plan`` section of the JSON: planned and measured MiB per phase, their ratio,
    the plan's terms and what it leaves out. A plan that cannot be made is an ``error`` line; the
    bench's measurements stand either way."""
    try:
        plan, overrides = bench_plan(args, policy, build_parts)
    except Exception as e:  # noqa: BLE001 - the plan must not cost the bench its numbers
        why = " ".join(str(e).split())
        return {"error": f"{type(e).__name__}: {why}"[:300], "phases": {}}
    cuda = device.type == "cuda"
    phases: dict[str, Any] = {}
    for phase, item in PHASE_ITEMS.items():
        planned = plan.peak if phase == "peak" else plan.resident + plan.phase_bytes(phase)
        measured = items[item]["peak_memory_mib"] if cuda and item in items else None
        phases[phase] = {
            "item": item,
            "planned_mib": _mib(planned) if plan.terms else None,
            "measured_mib": measured,
            "measured_over_planned": measured / _mib(planned)
            if measured is not None and plan.terms and planned > 0
            else None,
        }
    return {
        "what": "diffloop.memory's plan of this setting (arithmetic) beside each item's "
        "torch.cuda.max_memory_allocated (null: not measured on this device)",
        "source": plan.source,
        "config_overrides": overrides,
        "peak_phase": plan.peak_phase,
        "phases": phases,
        "terms": [asdict(t) for t in plan.terms],
        "unknown": list(plan.unknown),
        "not_in_plan": list(NOT_IN_PLAN),
    }


def format_plan(section: dict[str, Any]) -> str:
    """The plan-vs-measured rows of the printed table (one per phase)."""
    lines = ["", "memory plan vs measured (MiB; measured = torch.cuda.max_memory_allocated):"]
    if "error" in section:
        return "\n".join([*lines, f"  not computed: {section['error']}"])
    head = f"{'phase':<10}{'item':<12}{'planned':>10}{'measured':>10}{'meas/plan':>10}"
    lines += [head, "-" * len(head)]
    for phase, row in section["phases"].items():

        def cell(value: float | None, spec: str) -> str:
            return f"{'-':>10}" if value is None else f"{value:>10{spec}}"

        lines.append(
            f"{phase:<10}{row['item']:<12}{cell(row['planned_mib'], '.0f')}"
            f"{cell(row['measured_mib'], '.0f')}{cell(row['measured_over_planned'], '.3f')}"
        )
    lines += [f"  plan: unknown {u}" for u in section["unknown"]]
    lines += [f"  plan: {n}" for n in section["not_in_plan"]]
    return "\n".join(lines)
