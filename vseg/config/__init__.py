"""Typed configuration: the schemas every composed Hydra config is checked against, and their validation.

Hydra composes YAML from `conf/`; `load_config` merges the result into the typed dataclasses (wrong types and
unknown keys fail there, naming the key), then `validate` collects every bad combination and raises once,
before anything is built or launched. Import from here; the modules are:

- `errors`      `ConfigError`, Hydra's / OmegaConf's messages on one line
- `schema`      `TrainConfig` and its groups (model, lora, data, ...), `parse_spacing`, the known names
- `checks`      `validate`: every impossible combination of a `TrainConfig`
- `trainer`     the `trainer:` group checked against `lightning.Trainer`'s signature
- `loading`     `compose` (Hydra over `conf/`) and `load_config` (schema + validate)
- `differences` a trained model's config against the one a later command gives
- `predict`     `PredictConfig` (predict.py); `serve`: `ServeConfig` (vseg serve)
"""

from vseg.config.checks import validate, validate_data, validate_feature_cache
from vseg.config.differences import (
    LORA_SHAPE_FIELDS,
    MODEL_RUNTIME_FIELDS,
    describe_differences,
    differences,
    model_differences,
)
from vseg.config.errors import ConfigError, one_line
from vseg.config.loading import CONF_DIR, compose, load_config
from vseg.config.predict import PredictConfig, load_predict_config
from vseg.config.schema import (
    MODEL_FAMILIES,
    SEG_TOKEN,
    SOURCES,
    STRATEGIES,
    TEMPLATE_NAMES,
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    FaultsConfig,
    FeatureCacheConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PlanConfig,
    Spacing,
    SpeedConfig,
    SplitConfig,
    StrategyConfig,
    TrainConfig,
    parse_spacing,
)
from vseg.config.serve import ServeConfig, load_serve_config, validate_serve

__all__ = [
    "CONF_DIR",
    "LORA_SHAPE_FIELDS",
    "MODEL_FAMILIES",
    "MODEL_RUNTIME_FIELDS",
    "SEG_TOKEN",
    "SOURCES",
    "STRATEGIES",
    "TEMPLATE_NAMES",
    "AugmentConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "FaultsConfig",
    "FeatureCacheConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PlanConfig",
    "PredictConfig",
    "ServeConfig",
    "Spacing",
    "SpeedConfig",
    "SplitConfig",
    "StrategyConfig",
    "TrainConfig",
    "compose",
    "describe_differences",
    "differences",
    "load_config",
    "load_predict_config",
    "load_serve_config",
    "model_differences",
    "one_line",
    "parse_spacing",
    "validate",
    "validate_data",
    "validate_feature_cache",
    "validate_serve",
]
