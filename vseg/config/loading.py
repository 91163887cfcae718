"""Composing `conf/` with Hydra and merging the result into the typed `TrainConfig`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vseg.config.checks import validate
from vseg.config.errors import ConfigError, one_line
from vseg.config.schema import TrainConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def load_config(cfg: DictConfig | dict) -> TrainConfig:
    """Merges a composed config into the typed schema and validates it.

    Raises:
        ConfigError: naming the key for type errors and unknown keys, or listing every invalid combination.
    """
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key `{key}`: {one_line(err)}") from None
    typed: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(typed)
    return typed


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Composes `conf/<config_name>.yaml` with command-line overrides; a bad override is a ConfigError."""
    # Hydra is imported by the commands that compose (not by every reader of these schemas).
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    if not CONF_DIR.is_dir():
        raise ConfigError(f"config directory {CONF_DIR} not found; install vseg from its repository (pip install -e .)")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{config_name} config with overrides {list(overrides)}: {one_line(err)}") from None
