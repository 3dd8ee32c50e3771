"""The one schema of ``metrics.jsonl``: every key the trainer writes, defined once.

Each row of a run's ``metrics.jsonl`` is one epoch (``epoch`` = e >= 0) or the evaluation before
training (``epoch`` = -1, eval keys only). Every key is a :class:`Metric` below, or matches one of
the :data:`PATTERNS` (keys whose names depend on the run, e.g. ``reward_<component>_mean``) or
:data:`EVAL_CATEGORY` (``eval_reward_<category>_mean``: a reward's evaluation breakdown). The
trainer's TensorBoard / W&B tags, the report's plots, the sweep summary,
``diffloop.tools.claims`` and the key table of docs/guide.md all read names, meanings and
reductions from here; tests check that a real training run writes nothing else and that no reader
asks for a key the trainer does not write.

Reductions:
    processes: how a multi-process run turns per-process quantities into the one logged value
        gathered   computed once from the values of all processes (all-gathered): exact
        mean       mean of the per-process values (each process holds an equal share of samples)
        max        max over processes
        sum        sum over processes
        same       identical on every process (counters; quantities after the gradient all-reduce)
        main       the main process's own measurement (wall-clock)
    epochs: how a summary over a run's epochs combines the per-epoch values (None: not summarised)
        mean, max, sum, or last (a cumulative counter: its last value covers the whole run)

x axis (the report plots every key against training epochs completed when it was measured):
    samples  measured on epoch e's samples, drawn before its update   x = e
    update   measured during or after epoch e's update                 x = e + 1
    eval     evaluated after epoch e's update (epoch -1: the base)     x = e + 1
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PROCESS_REDUCTIONS = ("gathered", "mean", "max", "sum", "same", "main")
EPOCH_REDUCTIONS = ("mean", "max", "sum", "last")
MEASURED = ("bookkeeping", "samples", "update", "eval")
# What a band key holds: the spread of the values (std), or the spread turned into the standard
# error of their mean (sem: std / sqrt(n - 1), n = the images evaluated; the report computes it).
BAND_KINDS = ("std", "sem")
# Report sections, in page order.
SECTIONS = ("Rewards", "Reward components", "Policy statistics", "Over-optimisation monitors")


@dataclass(frozen=True)
class Metric:
    """One metrics.jsonl key (or, in PATTERNS, a family of keys ``prefix<name>suffix``).

    Fields:
        key:        the key, or for a pattern ``prefix<placeholder>suffix`` (one placeholder).
        meaning:    what it is, with its formula where it has one.
        processes:  one of PROCESS_REDUCTIONS (module doc).
        epochs:     one of EPOCH_REDUCTIONS, or None.
        higher_is_better: True / False where there is a better direction, else None.
        measured:   one of MEASURED: fixes the report's x axis (module doc).
        namespace:  TensorBoard / W&B tag group: tag = namespace/key, less a ``namespace_`` prefix.
        section:    the report section that plots it (one of SECTIONS), or None (not plotted).
        title:      the plot title (default: the key).
        band:       a key plotted as a +- band around this one (a std), or None.
        band_kind:  one of BAND_KINDS: the band is +- the std itself, or +- the standard error of
                    the mean made from it (the report turns a population std into s.e.).
        when:       when the key is present, if not in every row it belongs to.
    """

    key: str
    meaning: str
    processes: str
    epochs: str | None
    higher_is_better: bool | None
    measured: str
    namespace: str
    section: str | None = None
    title: str | None = None
    band: str | None = None
    when: str | None = None
    band_kind: str = "std"

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.processes, PROCESS_REDUCTIONS, "processes"),
            (self.epochs, (*EPOCH_REDUCTIONS, None), "epochs"),
            (self.measured, MEASURED, "measured"),
            (self.section, (*SECTIONS, None), "section"),
            (self.band_kind, BAND_KINDS, "band_kind"),
        ):
            if value not in allowed:
                raise ValueError(f"metric {self.key}: {what}={value!r} is not one of {allowed}")

    @property
    def x_offset(self) -> int:
        """Epochs completed at measurement = row epoch + this (module doc)."""
        return 1 if self.measured in ("update", "eval") else 0

    def tag(self, key: str | None = None) -> str:
        """TensorBoard tag of ``key`` (default: this metric's key): reward_mean -> reward/mean."""
        key = key or self.key
        prefix = self.namespace + "_"
        return f"{self.namespace}/{key.removeprefix(prefix)}"


def _m(key, meaning, processes, epochs, better, measured, namespace, **plot) -> Metric:
    return Metric(key, meaning, processes, epochs, better, measured, namespace, **plot)


# fmt: off
METRICS: dict[str, Metric] = {m.key: m for m in (
    _m("epoch", "epoch index e (0-based); -1 marks the base model's evaluation before training",
       "same", None, None, "bookkeeping", "train"),
    # --- rewards of the epoch's B x K samples (NaN/inf rewards left out and counted)
    _m("reward_mean", "mean reward of the epoch's valid samples", "gathered", "mean", True,
       "samples", "reward", section="Rewards",
       title="Training reward (mean +- std over the epoch's samples)", band="reward_std"),
    _m("reward_std", "population std of the epoch's valid rewards", "gathered", "mean", None,
       "samples", "reward"),
    _m("reward_group_std_mean", "mean over prompts of the std of the K rewards within a prompt's "
       "group: the signal leave-one-out advantages are made of", "gathered", "mean", None,
       "samples", "reward", section="Over-optimisation monitors"),
    _m("reward_zero_spread_groups", "fraction of prompts whose K rewards are all equal (zero "
       "advantage: no gradient from that group)", "gathered", "mean", False, "samples", "reward",
       section="Over-optimisation monitors"),
    _m("reward_invalid", "samples whose reward was NaN/inf this epoch (left out of baselines and "
       "loss)", "sum", "sum", False, "samples", "reward"),
    _m("advantage_abs_mean", "mean |A| over the epoch's valid samples, after train.adv_clip_max",
       "gathered", "mean", None, "samples", "train"),
    _m("advantage_clipped_frac", "fraction of the epoch's valid advantages clipped to "
       "+-train.adv_clip_max", "gathered", "mean", None, "samples", "train",
       section="Policy statistics", title="Fraction of advantages clipped (train.adv_clip_max)"),
    # --- over-optimisation monitors (diffloop.monitors.image_statistics)
    _m("monitor_brightness", "mean Rec. 601 luma of the epoch's images, in [0, 1]", "mean", "mean",
       None, "samples", "monitor", section="Over-optimisation monitors"),
    _m("monitor_saturation", "mean HSV saturation of the epoch's images, in [0, 1]", "mean", "mean",
       None, "samples", "monitor", section="Over-optimisation monitors"),
    _m("monitor_group_diversity", "mean pairwise RMS distance of 8x8-downsampled images within a "
       "prompt's group (0: the group collapsed to one picture)", "mean", "mean", None, "samples",
       "monitor", section="Over-optimisation monitors",
       when="K >= 2 (and, with several processes, groups not split across them)"),
    # --- budget counters
    _m("prompts_seen", "prompt draws so far, (e + 1) x sample.prompts_per_epoch", "same", "last",
       None, "bookkeeping", "train"),
    _m("reward_queries", "reward calls so far, (e + 1) x prompts_per_epoch x samples_per_prompt",
       "same", "last", None, "bookkeeping", "train"),
    _m("optimizer_steps", "optimizer steps so far", "same", "last", None, "update", "train"),
    _m("lr", "learning rate after the epoch's last optimizer step", "same", "last", None, "update",
       "train"),
    # --- the update (means over the epoch's (minibatch, timestep) pairs unless said otherwise)
    _m("loss", "mean training loss (the algorithm's loss, plus train.kl_coef x KL when set)",
       "mean", "mean", None, "update", "policy"),
    _m("approx_kl", "1/2 E[(log p_theta - log p_old)^2], the approximate KL(old || new)", "mean",
       "mean", None, "update", "policy", section="Policy statistics",
       title="Approximate KL(old || new), 1/2 E[(log ratio)^2]"),
    _m("clipfrac", "fraction of (sample, step) pairs with |ratio - 1| > train.clip_range", "mean",
       "mean", None, "update", "policy", section="Policy statistics",
       title="Fraction of clipped ratios"),
    _m("ratio_mean", "mean importance ratio p_theta / p_old", "mean", "mean", None, "update",
       "policy", section="Policy statistics", title="Mean importance ratio"),
    _m("grad_norm", "global gradient norm before clipping, mean over the epoch's optimizer steps",
       "same", "mean", None, "update", "policy", section="Policy statistics",
       title="Gradient norm (before clipping)"),
    _m("onpolicy_logprob_err", "max |log p_theta - log p_old| before the epoch's first optimizer "
       "step; must be ~0 (else sampling and training disagree)", "max", "max", False, "update",
       "policy"),
    _m("nonfinite_steps_skipped", "updates skipped this epoch because the loss or gradient was "
       "NaN/inf (counted, never applied)", "same", "sum", False, "update", "policy"),
    _m("kl_to_base", "mean per-step KL(p_theta || p_base) in the form train.kl_form (base: the "
       "LoRA adapter disabled)",
       "mean", "mean", None, "samples", "train", section="Over-optimisation monitors",
       when="train.kl_coef > 0 or train.log_kl_to_base"),
    # --- wall-clock
    _m("sample_time_s", "seconds spent sampling this epoch", "main", "sum", None, "bookkeeping",
       "time"),
    _m("reward_time_s", "seconds spent waiting for rewards this epoch", "main", "sum", None,
       "bookkeeping", "time"),
    _m("train_time_s", "seconds spent on the update this epoch", "main", "sum", None, "bookkeeping",
       "time"),
    _m("epoch_time_s", "seconds for the whole epoch (sampling, rewards, update; evaluation and "
       "checkpointing excluded)", "main", "sum", None, "bookkeeping", "time"),
    # --- evaluation on fixed prompts and noise (eval.*): rows of evaluated epochs, and epoch -1
    _m("eval_reward_mean", "mean reward on the eval prompts (fixed prompts and noise)", "gathered",
       None, True, "eval", "eval", section="Rewards",
       title="Held-out reward (fixed prompts and noise; mean +- standard error)",
       band="eval_reward_std", band_kind="sem",
       when="evaluated epochs (eval.every_n_epochs, the last) and epoch -1"),
    _m("eval_reward_std", "population std of the eval rewards", "gathered", None, None, "eval",
       "eval", when="evaluated epochs and epoch -1"),
    _m("eval_time_s", "seconds the evaluation took", "main", "sum", None, "eval", "eval",
       when="evaluated epochs and epoch -1"),
    # --- the shapes world's breakdown of the evaluation (diffloop.shapes.reward.eval_breakdown)
    *(_m(f"eval_binding_{a}_mean",
         f"mean over eval images of the {a} binding: mean over the caption's "
         f"phrases naming a {a} of presence x P(the object matched to the phrase has that {a})",
         "gathered", None, True, "eval", "eval",
         when="reward.name=shapes_binding, evaluated epochs and epoch -1"
              + (", captions naming a texture" if a == "texture" else ""))
      for a in ("colour", "shape", "texture")),
    _m("eval_reward_seen_mean",
       "mean eval reward of captions made only of training (colour, shape) "
       "combinations", "gathered", None, True, "eval", "eval",
       when="reward.name=shapes_binding, eval prompts with such captions"),
    _m("eval_reward_unseen_mean", "mean eval reward of captions naming a held-out (colour, shape) "
       "combination (shapes.world.UNSEEN_COMBINATIONS)", "gathered", None, True, "eval", "eval",
       when="reward.name=shapes_binding, eval prompts with such captions"),
)}
# Written only with the shapes world's reward (its eval_breakdown, diffloop.rewards.breakdown).
SHAPES_EVAL_KEYS = ("eval_binding_colour_mean", "eval_binding_shape_mean",
                    "eval_binding_texture_mean",
                    "eval_reward_seen_mean", "eval_reward_unseen_mean")

# Keys whose names the run's configuration makes (the trainer writes them).
PATTERNS: tuple[Metric, ...] = (
    _m("reward_<component>_mean", "mean score of one component of a composite (multi) reward over "
       "the epoch's samples", "gathered", "mean", True, "samples", "reward",
       section="Reward components", when="reward.name=multi"),
)
# Keys whose names the evaluation reward makes: any reward's evaluation breakdown, per category of
# eval images (diffloop.rewards.breakdown: its eval_breakdown method).
EVAL_CATEGORY = _m(
    "eval_reward_<category>_mean", "mean eval reward of the eval images in one category of the "
    "evaluation reward's breakdown (e.g. a GenEval tag or a T2I-CompBench category)", "gathered",
    None, True, "eval", "eval",
    when="an evaluation reward with an eval_breakdown; evaluated epochs and epoch -1")
# fmt: on

_PLACEHOLDER = re.compile(r"<[a-z_]+>")


def _pattern_regex(pattern: Metric) -> re.Pattern[str]:
    prefix, suffix = _PLACEHOLDER.split(pattern.key)
    return re.compile(re.escape(prefix) + r"(.+)" + re.escape(suffix))


_PATTERN_RES = tuple((_pattern_regex(p), p) for p in (*PATTERNS, EVAL_CATEGORY))


class UnknownMetricError(KeyError):
    """A key that is not in the schema (a phantom read, or an undocumented write)."""

    def __str__(self) -> str:
        return str(self.args[0])


def lookup(key: str) -> Metric | None:
    """The Metric of ``key``: an exact entry first, else the pattern it matches, else None."""
    if key in METRICS:
        return METRICS[key]
    return next((p for regex, p in _PATTERN_RES if regex.fullmatch(key)), None)


def get(key: str) -> Metric:
    """The Metric of ``key``; UnknownMetricError naming where to declare it."""
    metric = lookup(key)
    if metric is None:
        raise UnknownMetricError(
            f"metric '{key}' is not in the metrics schema: declare it in diffloop/metrics.py "
            "(METRICS or PATTERNS) with its meaning and reductions, or use a declared key"
        )
    return metric


def key(name: str) -> str:
    """``name`` itself, after checking it is declared: readers spell keys through this."""
    get(name)
    return name


def is_breakdown_key(name: str) -> bool:
    """Whether an evaluation reward's breakdown may write ``name``: ``eval_reward_<category>_mean``
    or one of the exact keys declared for a breakdown (``SHAPES_EVAL_KEYS``)."""
    return name in SHAPES_EVAL_KEYS or lookup(name) is EVAL_CATEGORY


def undeclared(keys: Iterable[str]) -> list[str]:
    """The keys (sorted) that neither METRICS nor PATTERNS nor EVAL_CATEGORY declare."""
    return sorted({k for k in keys if lookup(k) is None})


def tensorboard_tag(name: str) -> str:
    """TensorBoard / W&B tag of a key: reward_mean -> reward/mean, approx_kl -> policy/approx_kl."""
    return get(name).tag(name)


def canonical(name: str) -> str | None:
    """The metrics.jsonl key of ``name``: a key is itself; a TensorBoard-style alias such as
    ``reward/mean`` maps to ``reward_mean``. None when it is neither."""
    if lookup(name) is not None:
        return name
    namespace, _, rest = name.partition("/")
    for candidate in (f"{namespace}_{rest}", rest):
        metric = lookup(candidate)
        if metric is not None and metric.tag(candidate) == name:
            return candidate
    return None


def canonical_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row with namespaced aliases (``reward/mean``) renamed to their keys; a plain key
    wins over an alias of it; keys unknown to the schema are kept as they are."""
    out = {k: v for k, v in row.items() if canonical(k) in (k, None)}
    for k, v in row.items():
        target = canonical(k)
        if target is not None and target != k:
            out.setdefault(target, v)
    return out


def section_keys(section: str, present: Iterable[str]) -> list[str]:
    """The keys of a report section: its declared metrics in schema order, then the ``present``
    keys matching its patterns, sorted."""
    if section not in SECTIONS:
        raise ValueError(f"unknown report section {section!r}; sections: {SECTIONS}")
    exact = [k for k, m in METRICS.items() if m.section == section]
    patterned = sorted(
        k for k in set(present) if k not in METRICS and (m := lookup(k)) and m.section == section
    )
    return exact + patterned


def reduce_epochs(name: str, values: Sequence[float]) -> float:
    """Summarise one run's per-epoch values of ``name`` by its schema reduction (``epochs``)."""
    how = get(name).epochs
    if how is None:
        raise ValueError(f"metric '{name}' has no reduction over epochs")
    if not values:
        raise ValueError(f"no values of '{name}' to reduce")
    combine = {"mean": lambda v: sum(v) / len(v), "max": max, "sum": sum, "last": lambda v: v[-1]}
    return combine[how](values)


# ----------------------------------------------------------------------------- the guide's table

README_BEGIN = "<!-- metrics-schema: generated by `python -m diffloop.metrics docs/guide.md` -->"
README_END = "<!-- /metrics-schema -->"


def _better(metric: Metric) -> str:
    return {True: "higher", False: "lower", None: ""}[metric.higher_is_better]


def markdown_table() -> str:
    """The key table of docs/guide.md's run-directory section (generated, so it cannot drift)."""
    lines = [
        "| key | meaning | over processes | over epochs | better | present |",
        "|---|---|---|---|---|---|",
    ]
    for m in (*METRICS.values(), *PATTERNS, EVAL_CATEGORY):
        meaning = m.meaning.replace("|", "\\|")  # |A| must not end the table cell
        lines.append(
            f"| `{m.key}` | {meaning} | {m.processes} | {m.epochs or ''} | {_better(m)} "
            f"| {m.when or 'every epoch'} |"
        )
    return "\n".join(lines)


def readme_block() -> str:
    return f"{README_BEGIN}\n{markdown_table()}\n{README_END}"


def replace_readme_block(text: str) -> str:
    """``text`` with the block between README_BEGIN and README_END regenerated."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"no '{README_BEGIN}' ... '{README_END}' block to regenerate")
    return text[:start] + readme_block() + text[end + len(README_END) :]


def main(argv: list[str]) -> int:
    """``python -m diffloop.metrics [docs/guide.md]``: print the table, or regenerate it in the
    file."""
    if not argv:
        print(markdown_table())
        return 0
    from pathlib import Path

    path = Path(argv[0])
    path.write_text(replace_readme_block(path.read_text()))
    print(f"regenerated the metrics table in {path}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
