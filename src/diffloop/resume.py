"""Resuming a run continues *that* run: its own config, and a record that is only appended to.

The run's config
    ``output_dir/config.yaml`` is the resolved config of the run's first session and is never
    rewritten; each later session appends a line to ``output_dir/sessions.jsonl`` whose
    ``config_changes`` ({dotted key: new value}) are applied on top, in order
    (:func:`run_config_dict`).

``diffloop train [CONFIG.yaml] [key=value ...] resume=true`` (:func:`train_config`)
    starts from the run's config, not from defaults or the packaged default file; the values that
    CONFIG.yaml and the overrides state explicitly are laid over it. Each must repeat the run's
    value, except for keys a resume may change:
    - ``num_epochs``, which may be raised (not lowered; with a linear/cosine LR schedule the
      schedule is stretched to the new length from the resumed step on);
    - ``RESUME_MAY_CHANGE``: output_dir (a moved run), logging.*, checkpoint bookkeeping and the
      memory knobs that do not change results (fsdp.*: up to float rounding; where prompt
      embeddings come from: prompts.precompute_embeddings, prompts.embedding_cache_dir,
      model.text_encoder_device; the same list
      ``diffloop compare`` accepts);
    - the keys listed in ``resume_allow=[train.learning_rate, ...]`` (a section name covers its
      keys), for a deliberate change, which is then recorded in sessions.jsonl; never those of
      ``RESUME_FIXED`` (LoRA rank, targets, on/off, the model), which fix the checkpoint's tensors.
    Any other difference is a ConfigError naming the key, both values and the fix.
    :func:`check_resume` applies the same rule to a ``Config`` handed to ``Trainer`` directly.

Interrupting (:func:`run_training`)
    Ctrl-C, or SIGTERM (a scheduler's stop), ends ``diffloop train`` with exit code 130 and one
    line saying what was kept (or that there is no checkpoint yet) and the exact command that
    resumes (:func:`interrupted_message`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from diffloop.config import (
    Config,
    ConfigError,
    config_to_dict,
    derived_arithmetic,
    from_dict,
    load_config,
    load_yaml,
    merge_dicts,
    parse_override,
    split_config_args,
    validate,
)

RESUME_MAY_CHANGE = (
    "resume", "overwrite", "resume_allow", "output_dir", "logging", "hub", "checkpoint_every",
    "keep_checkpoints", "sample.batch_size", "eval.batch_size", "performance.decode_batch_size",
    "train.gradient_checkpointing",
    # Sharding moves the same tensors between processes; a checkpoint of either kind resumes into
    # the other (diffloop.checkpoint), equal up to the float order of the gradient reduction.
    "fsdp",
    # Where prompt embeddings come from: the same bits (each prompt encoded alone), except the
    # CPU's float rounding with text_encoder_device=cpu on an accelerator run.
    "prompts.precompute_embeddings", "prompts.embedding_cache_dir", "model.text_encoder_device",
    "model.offload_text_encoders",
)  # fmt: skip
# What fixes the names and shapes of the checkpoint's trainable tensors (and the model they were
# trained on): no resume_allow can change these, since the checkpoint cannot be loaded into another.
RESUME_FIXED = {
    "lora.enabled": "the checkpoint holds LoRA matrices or full weights, not the other",
    "lora.rank": "the checkpoint's LoRA matrices are rank x features",
    "lora.target_modules": "the checkpoint holds LoRA matrices for exactly the run's modules",
    "model.pretrained": "the checkpoint's weights belong to the run's model (a moved model "
    "directory: link it at the run's path, ln -s NEW OLD)",
}
SESSION_KEYS = ("resume", "overwrite", "resume_allow")  # per-session flags, not the run's config
SESSIONS = "sessions.jsonl"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": 1e-4}} -> {"train.learning_rate": 1e-4}.

    ``kwargs`` mappings and lists are leaves (compared whole)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def covered(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """``key`` is one of ``patterns`` or lies in a section one of them names."""
    return any(key == p or key.startswith(p + ".") for p in patterns)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    for s in sections:
        d = d.setdefault(s, {})
    d[leaf] = value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; a torn line (killed mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_config_dict(output_dir: str | Path) -> dict[str, Any] | None:
    """The run's current config as a nested dict (config.yaml + each session's changes), or None."""
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"the run's config '{path}' is not valid YAML: {e}") from None
    for session in read_jsonl(Path(output_dir) / SESSIONS):
        for key, value in (session.get("config_changes") or {}).items():
            _set_dotted(data, key, value)
    return data


def load_run_config(output_dir: str | Path) -> Config | None:
    data = run_config_dict(output_dir)
    if data is None:
        return None
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        where = f"the run's config in {output_dir} (config.yaml, sessions.jsonl)"
        raise ConfigError(f"{where}: {e}") from None


def config_changes(run: Config, config: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (run's value, config's value)} for every run-config key in which they differ."""
    a, b = flatten(config_to_dict(run)), flatten(config_to_dict(config))
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not covered(k, SESSION_KEYS)
    }


def check_resume(config: Config) -> dict[str, Any]:
    """For ``resume=true``: ConfigError unless ``config`` differs from the run's only where allowed.

    Returns the allowed changes {dotted key: new value} (empty when there is no run to compare to).
    """
    if not config.resume:
        return {}
    run = load_run_config(config.output_dir)
    if run is None:
        return {}
    known = flatten(config_to_dict(config))
    for key in config.resume_allow:
        if not any(covered(k, [key]) for k in known):
            raise ConfigError(
                f"resume_allow names '{key}', which is not a config key (e.g. train.learning_rate)"
            )
    allowed = (*RESUME_MAY_CHANGE, "num_epochs", *config.resume_allow)
    changes = config_changes(run, config)
    no_lora = not (run.lora.enabled or config.lora.enabled)  # full fine-tuning: lora.* unused
    for key, why in RESUME_FIXED.items():
        if key in changes and not (no_lora and key.startswith("lora.")):
            old, new = changes[key]
            raise ConfigError(
                f"resume=true: {key}={new!r} differs from the run's {key}={old!r}, and a resume "
                f"cannot change {key} (not even with resume_allow): {why}. Keep {key}={old!r}, "
                f"or train with {key}={new!r} as a new run (another output_dir)"
            )
    errors = [
        f"{k}={new!r} differs from the run's {k}={old!r}"
        for k, (old, new) in changes.items()
        if not covered(k, allowed)
    ]
    if (
        "num_epochs" in changes
        and config.num_epochs < run.num_epochs
        and "num_epochs" not in config.resume_allow
    ):
        errors.append(
            f"num_epochs={config.num_epochs} is below the run's num_epochs={run.num_epochs} "
            "(it may only be raised)"
        )
    if errors:
        keys = ",".join(k for k in changes if not covered(k, allowed)) or "num_epochs"
        raise ConfigError(
            f"resume=true continues the run in {config.output_dir} with its own config: "
            f"{'; '.join(errors)}. Drop the differing value, or pass resume_allow=[{keys}] to "
            "change it on purpose"
        )
    return {k: new for k, (_, new) in changes.items()}


def train_config(args: list[str]) -> Config:
    """The config of ``diffloop train ARGS``: as ``load_config`` gives it, except that with
    ``resume=true`` and a run in output_dir it is the run's config with the explicitly given values
    laid over it (then :func:`check_resume`)."""
    path, overrides = split_config_args(args)
    explicit_file = bool(args) and "=" not in args[0]
    stated = _stated_values(path, overrides)  # None: load_config reports what is wrong
    if stated is None or not _flag(stated.get("resume", False)):
        return load_config(path, overrides)
    run = run_config_dict(str(stated.get("output_dir", Config.output_dir)))
    if run is None:  # nothing there yet: a fresh start (the Trainer warns)
        return load_config(path, overrides)
    explicit = stated if explicit_file else _stated_values(None, overrides)
    config = from_dict(Config, merge_dicts(run, explicit))
    validate(config)
    check_resume(config)
    return config


def stated_output_dir(args: list[str]) -> str:
    """The output_dir ``diffloop train ARGS`` works in, found without reading anything there (it
    is locked first): as CONFIG.yaml or an override states it, else the default; a CONFIG that
    cannot be read as stated (a packaged name) is loaded (ConfigError as train_config gives it)."""
    path, overrides = split_config_args(args)
    stated = _stated_values(path, overrides)
    if stated is None:
        return str(load_config(path, overrides).output_dir)
    return str(stated.get("output_dir", Config.output_dir))


def _stated_values(path: str | None, overrides: list[str]) -> dict[str, Any] | None:
    """The file's mapping (if any) with the overrides merged in, as written (no defaults)."""
    data: Any = {}
    if path is not None:
        try:
            data = load_yaml(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        if not isinstance(data, dict):
            return None
    for text in overrides:
        data = merge_dicts(data, parse_override(text))
    return copy.deepcopy(data)


def _flag(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"))


def interrupted_message(output_dir: str | Path) -> str:
    """One line: what an interrupted ``diffloop train`` kept, and how to resume."""
    from diffloop.checkpoint import latest_checkpoint, resume_command  # torch: only when needed

    latest = latest_checkpoint(output_dir)
    if not (Path(output_dir) / "config.yaml").is_file():
        return f"diffloop: interrupted during set-up; nothing was written to {output_dir}"
    if latest is None:
        kept = "no checkpoint yet (resuming restarts from epoch 0)"
    else:
        done = json.loads((latest / "state.json").read_text())["epochs_completed"]
        kept = f"kept checkpoint {latest} ({done} epochs done)"
    return f"diffloop: interrupted; {kept}; resume with: {resume_command(output_dir)}"


def process_count_change(config: Config, saved: int | None, now: int) -> str | None:
    """The warning for a resume on ``now`` processes of a checkpoint written by ``saved`` (None:
    not recorded), when that changes the optimizer steps per epoch, else None. The samples and
    their noise do not depend on the process count, but each process's share does, hence the
    minibatches per process and the steps an epoch takes (unless the algorithm takes one update
    per batch); scaling train.gradient_accumulation_steps by saved / now keeps them."""
    if saved is None or saved == now:
        return None
    before = derived_arithmetic(config, saved).gradient_updates_per_epoch
    after = derived_arithmetic(config, now).gradient_updates_per_epoch
    if before == after:
        return None
    g = config.train.gradient_accumulation_steps
    fix = (
        f"train.gradient_accumulation_steps={g * saved // now}"
        if (g * saved) % now == 0
        else f"train.gradient_accumulation_steps scaled by {saved}/{now}"
    )
    return (
        f"the checkpoint was written by {saved} process(es) and this run has {now}: optimizer "
        f"steps per epoch change from {before} to {after} (each averages another number of "
        f"samples); to keep {before}, resume with resume_allow=[train.gradient_accumulation_steps] "
        f"and {fix}"
    )
