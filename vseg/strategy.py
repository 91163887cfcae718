"""Hydra `strategy` choice -> Lightning strategy object. DeepSpeed configs live here and nowhere else.

Building a run's model for its strategy (ZeRO-3 included) is `vseg.training.zero3`; reading DeepSpeed
checkpoints is `vseg.artifacts.deepspeed`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from vseg.config import StrategyConfig


def deepspeed_config(cfg: StrategyConfig, micro_batch: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for ZeRO stage `cfg.stage`, optionally offloading optimizer / parameters.

    Accumulation and gradient clipping are filled in by Lightning from the trainer
    (`trainer.accumulate_grad_batches`, `trainer.gradient_clip_val`), bf16 from its precision. The
    micro-batch is set here (`data.batch_size`): Lightning cannot read it from vseg's windowed loader.
    Buckets are `strategy.bucket_size` elements: with `overlap_comm` DeepSpeed keeps about 4.5x that in
    bf16 buffers, so the 5e8 of most examples would cost ~4.5 GB of a 24 GB card; 5e7 costs ~0.45 GB.
    """
    bucket = int(cfg.bucket_size)
    zero: dict[str, Any] = {
        "stage": cfg.stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket,
    }
    if cfg.stage in (1, 2):
        zero.update({"allgather_partitions": True, "allgather_bucket_size": bucket, "reduce_scatter": True})
    if cfg.stage == 3:
        # Frozen base weights are most of the model: gather them per module, release right after.
        zero.update(
            {
                "stage3_prefetch_bucket_size": bucket,
                "stage3_param_persistence_threshold": 1e5,
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.pin_memory}
    if cfg.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.pin_memory}
    config: dict[str, Any] = {"zero_optimization": zero, "zero_allow_untested_optimizer": True}
    if micro_batch is not None:
        config["train_micro_batch_size_per_gpu"] = int(micro_batch)
    return config


class ComputeStreamDDP(DDPStrategy):
    """Lightning's DDP, with the model wrapped on the stream that then runs the forward and backward passes.

    Lightning 2.6 wraps it inside a fresh side stream (what a capture of the whole step as one CUDA graph
    needs; vseg never does that). DDP keeps each parameter's gradient accumulator, which remembers the stream
    it was created on; every backward then met a producer on another stream, synchronised the two, and torch
    (from 2.10) warned so on every rank (Lightning-AI/pytorch-lightning#21567, fixed there the same way).
    """

    def _setup_model(self, model: Module) -> DistributedDataParallel:
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)


def build_strategy(cfg: StrategyConfig, micro_batch: int | None = None) -> Strategy | str:
    """The Lightning strategy for a validated `StrategyConfig`.

    `single` returns "auto" so Lightning picks the one device (CPU, CUDA or MPS) itself. DeepSpeed
    checkpoints exclude frozen parameters (only what trains is written, by every rank its shard).
    """
    timeout = timedelta(minutes=cfg.timeout_minutes)
    if cfg.name == "single":
        return "auto"
    if cfg.name == "ddp":
        # Gradients as views of the communication buckets: one copy of the (LoRA) gradients, not two.
        return ComputeStreamDDP(
            find_unused_parameters=cfg.find_unused_parameters, timeout=timeout, gradient_as_bucket_view=True
        )
    if cfg.stage in (1, 2, 3):
        return DeepSpeedStrategy(
            config=deepspeed_config(cfg, micro_batch), timeout=timeout, exclude_frozen_parameters=True
        )
    raise ValueError(f"strategy {cfg.name!r} with stage {cfg.stage} has no builder")


def is_deepspeed(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)
