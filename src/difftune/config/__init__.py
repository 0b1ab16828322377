"""The run configuration: typed sections (sections.py), reading TOML with overrides and
errors by key (loading.py), and writing the resolved config (writing.py)."""

from difftune.config.loading import (
    ConfigError,
    apply_overrides,
    build_config,
    build_section,
    load_config,
    parse_override,
    set_key,
)
from difftune.config.sections import (
    LR_SCHEDULERS,
    METHOD_KINDS,
    PIPELINE_COMPONENTS,
    DataConfig,
    DreamBoothSettings,
    EmaSettings,
    HubConfig,
    LoraSettings,
    MethodConfig,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
    ValidationConfig,
)
from difftune.config.writing import to_toml, with_absolute_paths

__all__ = [
    "LR_SCHEDULERS", "METHOD_KINDS", "PIPELINE_COMPONENTS", "ConfigError", "DataConfig", "DreamBoothSettings",
    "EmaSettings", "HubConfig", "LoraSettings", "MethodConfig", "ModelConfig", "ObjectiveConfig", "RunConfig",
    "TrainConfig", "ValidationConfig", "apply_overrides", "build_config", "build_section", "load_config",
    "parse_override", "set_key", "to_toml", "with_absolute_paths",
]
