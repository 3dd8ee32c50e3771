"""Everything ``diffloop train`` checks before a model loads, as one function.

``diffloop train``, ``diffloop check-config`` and ``diffloop compare`` (for every run of a sweep)
call :func:`check_before_loading`, so what check-config accepts is exactly what train accepts up to
the model load. Each failure is a :class:`~diffloop.config.ConfigError`, one line naming the field.
"""

from __future__ import annotations

from diffloop.config import Config, ConfigError, RewardConfig, validate
from diffloop.config.validation import check_kl_form_supported
from diffloop.policies.families import check_local_model
from diffloop.policies.quantization import check_family_components
from diffloop.prompts import PromptError, eval_prompt_source, training_prompt_source
from diffloop.rewards.registry import RewardSpecError, check_reward_name
from diffloop.tracking import check_trackers


def check_before_loading(config: Config, num_processes: int = 1) -> None:
    """The config's invariants (:func:`~diffloop.config.validate`: ranges, enumerations, batch
    arithmetic, a writable output_dir), a local model.pretrained (present, of a supported family,
    with its component folders; a hub id is not looked up), the training and evaluation prompt
    sources (files read), every reward name (registered, or an importable ``package.module:attr``)
    and that every tracker of logging.report_to is installed. Loads no model."""
    validate(config, num_processes)
    family = check_local_model(
        config.model
    )  # a local model: exists, a supported family, its folders
    if family is not None:
        names = [c.name for c in family.components]
        check_family_components(config.model.quantization, family.label, names)
        check_kl_form_supported(
            config, family.flow_matching, f"{family.label[0].upper()}{family.label[1:]}"
        )
    check_trackers(config.logging)  # every tracker of logging.report_to is installed
    try:
        training_prompt_source(config.prompts)
    except PromptError as e:
        raise ConfigError(f"prompts.source={config.prompts.source}: {e}") from None
    try:
        eval_prompt_source(config)
    except PromptError as e:
        raise ConfigError(f"eval.prompts={config.eval.prompts}: {e}") from None
    specs = reward_specs(config.reward)
    if config.eval.reward is not None:
        specs.append(("eval.reward", config.eval.reward, config.eval.reward_kwargs))
    for where, name, kwargs in specs:
        try:
            check_reward_name(name, kwargs)
        except RewardSpecError as e:
            raise ConfigError(f"{where}={name}: {e}") from None


def reward_specs(cfg: RewardConfig) -> list[tuple[str, str, dict]]:
    """(config field, reward name, kwargs) of the reward, or of each component of a ``multi``
    one."""
    if cfg.name != "multi":
        return [("reward.name", cfg.name, cfg.kwargs)]
    from diffloop.rewards.composite import parse_components

    try:
        specs = parse_components(cfg.components)
    except ValueError as e:
        raise ConfigError(f"reward.components: {e}") from None
    return [(f"reward.components[{i}].name", s.name, s.kwargs or {}) for i, s in enumerate(specs)]
