"""Run directories: the resolved config a run wrote, and its trained weights (applied by `apply_trainable`).

    RUN/config.yaml                         the resolved TrainConfig (written once every check has passed)
    RUN/weights/trainable.safetensors       the trained weights (what predict.py and `vseg export` read)
    RUN/checkpoints/step*.ckpt, last.ckpt   resumable checkpoints (`vseg.artifacts.checkpoints`)

A run's config is read here and nowhere else (`load_train_config`), so every reader gives the same message
for a config it cannot read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vseg.artifacts.loading import CheckpointError
from vseg.config import ConfigError, TrainConfig, one_line

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = Path("weights") / "trainable.safetensors"
#: how to rewrite a run's trainable weights file from its checkpoints
WEIGHTS_FIX = (
    "write it again from the run's newest checkpoint with `vseg weights ckpt={run}/checkpoints/last.ckpt` "
    "(or delete it: predict.py then reads that checkpoint itself)"
)


def load_train_config(source: Path | dict[str, Any] | DictConfig, what: str = "run") -> TrainConfig:
    """The typed TrainConfig of a run's config.yaml (or of a config dict an export carries).

    Raises:
        ConfigError: naming the file and the problem (unreadable YAML, keys of another vseg version, ...).
    """
    where = str(source) if isinstance(source, Path) else f"the {what}'s config"
    try:
        raw = OmegaConf.load(source) if isinstance(source, Path) else source
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), raw))  # type: ignore[return-value]
    except Exception as err:  # noqa: BLE001 - any unreadable config is one message
        raise ConfigError(
            f"{where}: the {what}'s config cannot be read ({type(err).__name__}: {one_line(err)})"
        ) from None


# ------------------------------------------------------------------------------------------- trained weights
def apply_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Loads a trainable-only state dict, refusing any key or shape that does not fit the model."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    # DeepSpeed (frozen parameters excluded) still saves the module's persistent buffers and the second name of
    # tied tensors (a tied lm_head's token adapter); they are rebuilt or shared, not loaded.
    known = set(model.state_dict(keep_vars=True))
    extra = sorted(k for k in weights if k in known and k not in expected)
    if extra:
        log.info("%s: %d saved tensors are buffers or tied aliases (not loaded), e.g. %s", where, len(extra), extra[:3])
    weights = {k: v for k, v in weights.items() if k not in known or k in expected}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    shapes = [
        f"{k}: {tuple(weights[k].shape)} vs {tuple(params[k].shape)}"
        for k in sorted(set(weights) & expected)
        if tuple(weights[k].shape) != tuple(params[k].shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{where} does not match the model its run config builds (a checkpoint of another model family, size or "
            f"adapter setup?): missing {len(missing)} {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}, "
            f"mismatched shapes {shapes[:5]}"
        )
    model.load_state_dict(weights, strict=False)


def config_near(ckpt: Path) -> Path:
    """config.yaml of the run a checkpoint belongs to: RUN/checkpoints/<ckpt> -> RUN/config.yaml."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise ConfigError(
        f"ckpt={ckpt}: a training checkpoint holds only the trained weights, and its run's config.yaml was not "
        f"found in {ckpt.parent} or {ckpt.parent.parent}; pass the run directory (ckpt=RUN_DIR) instead"
    )
