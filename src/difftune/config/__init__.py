"""The run configuration: typed sections (sections.py; validation and the Hub in outputs.py), the whole run and its checks
across sections (run.py), reading TOML with overrides and errors by key (loading.py),
and writing the resolved config (writing.py)."""

from difftune.config.loading import (
    ConfigError,
    apply_overrides,
    build_config,
    build_section,
    load_config,
    parse_override,
    set_key,
)
from difftune.config.outputs import HubConfig, ValidationConfig
from difftune.config.run import RunConfig
from difftune.config.sections import (
    LR_SCHEDULERS,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
)
from difftune.config.writing import to_toml, with_absolute_paths

__all__ = [
    "LR_SCHEDULERS", "ConfigError", "DataConfig", "HubConfig", "ModelConfig", "ObjectiveConfig", "RunConfig",
    "TrainConfig", "ValidationConfig", "apply_overrides", "build_config", "build_section", "load_config",
    "parse_override", "set_key", "to_toml", "with_absolute_paths",
]
