"""Run configuration: dataclass sections that validate themselves (`rules.py`, `sections.py`), read from YAML with
`section.key=value` overrides or from a saved run record (`loading.py`)."""

from .loading import config_from_dict, load_config, parse_yaml
from .rules import Rule, Section
from .sections import (
    CLASS_WEIGHTS,
    COMPUTE_DTYPES,
    DTYPES,
    HEAD_SPECS,
    HEAD_TYPES,
    METRICS,
    MIXED_PRECISION,
    OPTIMIZERS,
    QUANT_BITS,
    QUANT_TYPES,
    REPO_ID,
    STORAGE_DTYPES,
    TASK_METRICS,
    TASKS,
    TOWER_MODES,
    TRACKERS,
    AugmentConfig,
    Config,
    DataConfig,
    HeadConfig,
    HeadSpec,
    HubConfig,
    LoraSettings,
    ModelConfig,
    QuantConfig,
    TowerConfig,
    TrainConfig,
)

__all__ = [
    "CLASS_WEIGHTS", "COMPUTE_DTYPES", "DTYPES", "HEAD_SPECS", "HEAD_TYPES", "METRICS", "MIXED_PRECISION",
    "OPTIMIZERS", "QUANT_BITS", "QUANT_TYPES", "REPO_ID", "STORAGE_DTYPES", "TASK_METRICS", "TASKS", "TOWER_MODES", "TRACKERS",
    "AugmentConfig", "Config", "DataConfig", "HeadConfig", "HeadSpec", "HubConfig", "LoraSettings", "ModelConfig", "QuantConfig",
    "Rule", "Section", "TowerConfig", "TrainConfig", "config_from_dict", "load_config", "parse_yaml",
]
