"""What a person reads at the end of a run: the held-out verdict (base -> trained, and for the shapes
world per attribute and seen / unseen combinations) and the labelled before/after image grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def summary_lines(
    base: dict[str, Any],
    trained: dict[str, Any],
    reward: str,
    source: str,
    num_prompts: int,
    k: int,
    prompts: list[str],
) -> list[str]:
    """The end-of-run verdict from the base (epoch -1) and last evaluation rows: the held-out
    reward, then whichever per-attribute and seen / unseen means the rows hold
    (``diffloop.shapes.reward.eval_breakdown``), as base -> trained (difference)."""
    label = "binding reward" if reward == "shapes_binding" else f"{reward} reward"
    verdict = (f"{label} on held-out prompts: base {base['eval_reward_mean']:.4f} -> trained "
               f"{trained['eval_reward_mean']:.4f} ({source}, {num_prompts} prompts x {k} images)")  # fmt: skip
    lines = [verdict]

    def change(key: str, name: str) -> str:
        if key not in base or key not in trained:
            return f"    {name:<30} n/a"
        b, t = base[key], trained[key]
        return f"    {name:<30} base {b:.4f} -> trained {t:.4f} ({t - b:+.4f})"

    if any(key.startswith("eval_binding_") for key in base):
        lines.append("  per attribute (the matched object is there and has the named attribute):")
        lines += [change(f"eval_binding_{a}_mean", a) for a in ("colour", "shape", "texture")]
    if "eval_reward_seen_mean" in base or "eval_reward_unseen_mean" in base:
        from diffloop.shapes.world import uses_unseen_combination

        unseen = sum(uses_unseen_combination(p) for p in prompts)
        lines.append("  by combination (binding reward):")
        lines.append(change("eval_reward_seen_mean", f"seen ({len(prompts) - unseen} prompts)"))
        lines.append(change("eval_reward_unseen_mean", f"unseen ({unseen} prompts)")
                     + ("" if unseen else ": no eval prompt names a held-out combination"))  # fmt: skip
    return lines


def write_before_after(
    before: Path, after: Path, out: Path, k: int, after_heading: str = "after"
) -> int:
    """eval/<tag>.npz of the base and the last evaluation -> the labelled grid at ``out``
    (``diffloop.images.labelled_before_after``); returns the number of prompt rows."""
    from PIL import Image

    from diffloop.images import labelled_before_after

    b, a = np.load(before), np.load(after)
    rows = min(len(b["prompts"]), len(a["prompts"]))
    n = rows * k
    as_float = lambda x: torch.from_numpy(x[:n]).float() / 255.0
    grid = labelled_before_after(as_float(b["images"]), as_float(a["images"]), [str(p) for p in b["prompts"][:rows]],
                                 b["scores"][:n].tolist(), a["scores"][:n].tolist(), per_row=k,
                                 upscale=max(1, 128 // b["images"].shape[-1]),
                                 headings=("before: base model", after_heading))  # fmt: skip
    Image.fromarray(grid).save(out)
    return rows
