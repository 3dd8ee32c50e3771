"""Typed run configuration: dataclass defaults < YAML file < ``a.b=c`` overrides.

The defaults are the shapes-world run, so ``Config()`` is exactly what ``diffloop train`` runs with
no arguments (LOOP, K = 8, on the packaged model; ``configs/shapes.yaml`` spells the same values
out, and a test keeps the two equal). A config for another model states what it needs over them.

Every invariant is checked by :func:`validate` before any model loads; each error names the field
and the fix. The checks of single fields come from the declarations, in one place
(:func:`check_field_values`): every numeric field is declared with ``num(default, gt/ge/lt/le)`` and
must be finite and inside its range; every enumerated field is a ``Literal[...]`` and must be one of
its values (the closest is suggested). Cross-field invariants follow in :func:`validate`.
Dict-valued fields (``reward.kwargs``) merge key by key across the file and each override.
``derived_arithmetic`` gives the per-epoch numbers the run prints at start; ``field_docs`` the
documentation of every key (``diffloop train --help``), read from the attribute docstrings in
:mod:`.schema`.

Modules: :mod:`.schema` (the dataclasses and ranges), :mod:`.loading` (YAML, overrides, docs),
:mod:`.validation` (the invariants), :mod:`.arithmetic` (derived numbers, thread count).
"""

from diffloop.config.arithmetic import (
    Arithmetic,
    available_cores,
    cfg_evaluations_per_step,
    derived_arithmetic,
    effective_timestep_window,
    largest_divisor,
    num_trained_timesteps,
    resolve_cpu_threads,
    trained_step_range,
    trained_steps,
)
from diffloop.config.loading import (
    DEFAULT_CONFIG,
    config_to_dict,
    field_docs,
    from_dict,
    load_config,
    load_yaml,
    merge_dicts,
    packaged_config,
    parse_override,
    save_config,
    split_config_args,
    unvalidated_config,
)
from diffloop.config.schema import (
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    COMPILE_TARGETS,
    PATH_SOURCES,
    TRACKERS,
    AlgorithmName,
    AttentionBackend,
    CompileMode,
    CompileTarget,
    Config,
    ConfigError,
    EvalConfig,
    Flux2Config,
    FluxConfig,
    HubConfig,
    LoggingConfig,
    LogprobReduction,
    LoraConfig,
    LrScheduler,
    MixedPrecision,
    ModelConfig,
    OptimizerName,
    PerformanceConfig,
    PromptConfig,
    QwenImageConfig,
    Range,
    RewardConfig,
    SampleConfig,
    SD3Config,
    SdeType,
    SDXLConfig,
    TrainConfig,
    ZImageConfig,
    num,
)
from diffloop.config.validation import (
    check_field_values,
    check_output_dir,
    validate,
    validate_reward_form,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "COMPILE_MODES",
    "COMPILE_TARGETS",
    "DEFAULT_CONFIG",
    "PATH_SOURCES",
    "TRACKERS",
    "AlgorithmName",
    "Arithmetic",
    "AttentionBackend",
    "CompileMode",
    "CompileTarget",
    "Config",
    "ConfigError",
    "EvalConfig",
    "Flux2Config",
    "FluxConfig",
    "HubConfig",
    "LoggingConfig",
    "LogprobReduction",
    "LoraConfig",
    "LrScheduler",
    "MixedPrecision",
    "ModelConfig",
    "OptimizerName",
    "PerformanceConfig",
    "PromptConfig",
    "QwenImageConfig",
    "Range",
    "RewardConfig",
    "SD3Config",
    "SDXLConfig",
    "SampleConfig",
    "SdeType",
    "TrainConfig",
    "ZImageConfig",
    "available_cores",
    "cfg_evaluations_per_step",
    "check_field_values",
    "check_output_dir",
    "config_to_dict",
    "derived_arithmetic",
    "effective_timestep_window",
    "field_docs",
    "from_dict",
    "largest_divisor",
    "load_config",
    "load_yaml",
    "merge_dicts",
    "num",
    "num_trained_timesteps",
    "packaged_config",
    "parse_override",
    "resolve_cpu_threads",
    "save_config",
    "split_config_args",
    "trained_step_range",
    "trained_steps",
    "unvalidated_config",
    "validate",
    "validate_reward_form",
]
