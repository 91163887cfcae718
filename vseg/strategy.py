"""Hydra `strategy` choice -> Lightning strategy object. DeepSpeed configs live here and nowhere else."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from vseg.config import StrategyConfig


def deepspeed_config(cfg: StrategyConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for ZeRO stage `cfg.stage`, optionally offloading optimizer / parameters.

    Batch sizes, accumulation and gradient clipping are filled in by Lightning from the trainer
    (`trainer.gradient_clip_val`), bf16 from its precision.
    """
    zero: dict[str, Any] = {
        "stage": cfg.stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if cfg.stage in (1, 2):
        zero.update({"allgather_partitions": True, "allgather_bucket_size": 5e8, "reduce_scatter": True})
    if cfg.stage == 3:
        # Frozen base weights are most of the model: gather them per module, release right after.
        zero.update(
            {
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.pin_memory}
    if cfg.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.pin_memory}
    config: dict[str, Any] = {"zero_optimization": zero, "zero_allow_untested_optimizer": True}
    return config


def build_strategy(cfg: StrategyConfig) -> Strategy | str:
    """The Lightning strategy for a validated `StrategyConfig`.

    `single` returns "auto" so Lightning picks the one device (CPU, CUDA or MPS) itself.
    """
    timeout = timedelta(minutes=cfg.timeout_minutes)
    if cfg.name == "single":
        return "auto"
    if cfg.name == "ddp":
        return DDPStrategy(find_unused_parameters=cfg.find_unused_parameters, timeout=timeout)
    if cfg.stage in (1, 2, 3):
        return DeepSpeedStrategy(config=deepspeed_config(cfg), timeout=timeout, exclude_frozen_parameters=True)
    raise ValueError(f"strategy {cfg.name!r} with stage {cfg.stage} has no builder")
