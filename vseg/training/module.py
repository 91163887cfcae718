"""The LightningModule: Sa2VA training and validation steps, optimizer, logging, trainable-only checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from vseg.config import ConfigError, TrainConfig
from vseg.data.dataset import target_names
from vseg.losses import LossSums, Window, combine, mask_loss_sums
from vseg.metrics import SegmentationMetrics, TargetScores
from vseg.model.compile import resume_compiled, step_begin, suspend_compiled, uncompile_blocks
from vseg.model.grounding import BackboneCache, masks_at
from vseg.model.preprocess import SAM_MEAN_BF16, SAM_STD_BF16
from vseg.model.sa2va import Positions, Sa2VA
from vseg.training.faults.guard import NonFiniteGuard
from vseg.training.feature_cache import FrozenFeatures, any_rank
from vseg.training.speed import GradsOutsideGraphs, MasterWeights, SideStreamCopy, apply_speed

log = logging.getLogger(__name__)


def trainable_state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters that train, by name: the whole checkpoint of a LoRA run (the frozen base is not saved)."""
    return {prefix + n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def host_scalar(value: float) -> torch.Tensor:
    """A number to `self.log` as a CPU tensor. Lightning turns a Python number into a tensor on the module's
    device: a copy from pageable host memory, which waits for every kernel queued before it, once per step."""
    return torch.tensor(float(value))


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's `LightningOptimizer` wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _one_dtype_for_zero3(model: torch.nn.Module, ds_config: dict[str, Any]) -> None:
    """ZeRO-3 flattens each optimizer group into one buffer and asserts a single dtype (seen on GPUs: bf16
    adapters next to fp32 heads). DeepSpeed keeps fp32 master weights itself, so every trainable tensor is
    handed over in the training dtype of the DeepSpeed config."""
    if ds_config.get("bf16", {}).get("enabled"):
        target = torch.bfloat16
    elif ds_config.get("fp16", {}).get("enabled"):
        target = torch.float16
    else:
        target = torch.float32
    cast = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shard = getattr(p, "ds_tensor", None)
        if shard is not None and shard.dtype != target:
            shard.data = shard.data.to(target)
            cast.append(name)
        if p.dtype != target:
            p.data = p.data.to(target)  # under ZeRO-3 an empty placeholder; otherwise the full tensor
            if shard is None:
                cast.append(name)
    if cast:
        log.info("ZeRO-3: %d trainable tensors cast to %s (one dtype per group), e.g. %s", len(cast), target, cast[:4])


class Sa2VAModule(L.LightningModule):
    """Trains Sa2VA with window-normalised mask / Dice / LM losses; validates with Dice and IoU.

    Args:
        model: the built Sa2VA with its training setup applied.
        cfg: the full training config (loss weights, optimizer, strategy).
    """

    def __init__(self, model: Sa2VA | None, cfg: TrainConfig, builder: Callable[[Any], Sa2VA] | None = None):
        super().__init__()
        # ZeRO-3: model is None and `builder(strategy)` makes it in configure_model, where DeepSpeed
        # partitions each parameter as it is created (vseg.training.zero3.build_sa2va_zero3).
        self.model = model
        self._builder = builder
        self._val_batches_max: int | None = None  # ZeRO-3: most validation batches of any rank
        self.cfg = cfg
        self.val_metrics = SegmentationMetrics()
        self.target_scores = TargetScores()  # HD95 / ASSD, and per target once `setup` knows the object names
        # Checkpoints hold only trainable weights; on_load_checkpoint checks they are all there.
        self.strict_loading = False
        self.overlays = int(cfg.callbacks.get("val_overlays", 4))
        # NaN/Inf losses or gradients: the optimizer step is skipped on every rank and counted.
        self.guard = NonFiniteGuard(cfg.faults.max_bad_steps, cfg.faults.check_grads)
        where = cfg.model.sam_feature_cache
        self.sam_cache = BackboneCache(where) if where != "none" else None  # training batches only
        self.masters: MasterWeights | None = None  # speed.bf16_weights: the optimizer's float32 copies
        self.compiled: str | None = None  # speed.compile: what was compiled
        self.graphs: GradsOutsideGraphs | None = None  # speed.cuda_graphs, where it applies
        self._suspended: list = []  # compiled blocks running eagerly during validation
        # The disk cache of frozen encoder outputs (feature_cache.*), training batches only.
        self.feature_cache = FrozenFeatures.from_config(cfg) if cfg.feature_cache.enabled else None
        self._copy = SideStreamCopy() if cfg.speed.overlap_steps else None

    def setup(self, stage: str) -> None:
        val_set = getattr(getattr(self._trainer, "datamodule", None), "val_set", None)
        if val_set is not None:
            self.target_scores = TargetScores(target_names(val_set.items))

    def configure_model(self) -> None:
        if self.sam_cache is not None and self._zero3():  # e.g. strategy=auto chose ZeRO-3 after validation
            raise ConfigError(
                f"model.sam_feature_cache={self.sam_cache.where} is not supported with ZeRO-3 (the strategy chosen "
                "for this run): set model.sam_feature_cache=none, or pick ddp / zero2 / zero2_offload"
            )
        if self.model is None and self._builder is not None:
            self.model = self._builder(self.trainer.strategy)
            _one_dtype_for_zero3(self.model, self.trainer.strategy.config)
        self._speed_setup()

    def _speed_setup(self) -> None:
        """The `speed:` switches that change the model; before DDP wraps it (its buckets take the dtypes)."""
        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
        if self.masters is None and self.compiled is None:
            trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]  # checkpoint names
            self.masters, self.compiled, graphs = apply_speed(
                self.model,
                trainable,
                self.cfg,
                str(self.trainer.precision),
                deepspeed,
                self._zero3(),
                self.trainer.strategy.root_device.type,
            )
            self.graphs = GradsOutsideGraphs(p for _, p in trainable) if graphs else None

    def on_train_epoch_end(self) -> None:
        cache = self.sam_cache
        if cache is not None:
            seen = cache.hits + cache.misses
            log.info(
                "rank %d: SAM-2 feature cache holds %d images (%.2f GB, %s); %d of %d image encodings reused",
                self.global_rank,
                len(cache),
                cache.nbytes / 2**30,
                cache.where,
                cache.hits,
                seen,
            )

    def _zero3(self) -> bool:
        return self._trainer is not None and getattr(self.trainer.strategy, "zero_stage_3", False)

    # ---------------------------------------------------------------- steps
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self._copy is None:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return self._copy(
            batch, device, lambda b, d: super(Sa2VAModule, self).transfer_batch_to_device(b, d, dataloader_idx)
        )

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` is True on any rank: a collective under multi-rank ZeRO-3 (the feature cache's
        agreement on running the partitioned encoders), `flag` itself elsewhere."""
        if not self._zero3() or self.trainer.world_size == 1:
            return flag
        return any_rank(flag, self.device)

    def _forward(self, batch: dict[str, Any]) -> tuple[Any, LossSums]:
        backbone = None
        mllm_inputs = batch["mllm_inputs"]
        if self.feature_cache is not None and self.training and "content_keys" in batch:
            backbone, mllm_inputs = self.feature_cache.inputs(batch, self.model, self._any_rank)
        elif self.sam_cache is not None and self.training:
            keys = list(batch.get("image_ids", batch["ids"]))
            backbone = self.sam_cache.features(keys, batch["sam_pixel_values"], self.model.grounding)
        out = self.model(
            batch["input_ids"],
            # no padding (known on the host): no mask, and so no check of it that waits for the GPU
            batch["attention_mask"] if batch.get("padded", True) else None,
            batch["labels"],
            batch["sam_pixel_values"],
            mllm_inputs,
            backbone=backbone,
            positions=self._positions(batch),
        )
        mode = self.cfg.loss.mask_size
        if mode == "image":
            targets = torch.cat([m.float() for m in batch["masks"]]).to(out.mask_logits.device)
        else:
            targets = batch["masks_low_res"].to(out.mask_logits.device)
        if targets.shape[0] != out.mask_logits.shape[0]:
            raise RuntimeError(
                f"batch {batch['ids']}: {out.mask_logits.shape[0]} [SEG] tokens but {targets.shape[0]} target masks"
            )
        bce, dice = mask_loss_sums(out.mask_logits, targets, mode)
        sums = LossSums(bce, dice, int(targets.shape[0]), out.llm_loss_sum, int(out.llm_tokens))
        return out, sums

    def _positions(self, batch: dict[str, Any]) -> Positions | None:
        """speed.host_positions: the collate's [SEG] / answer positions, so the step's gathers need no host sync."""
        if self.cfg.speed.host_positions and "seg_positions" in batch:
            return Positions(batch["seg_positions"], batch["answer_positions"])
        return None

    def _window(self, batch: dict[str, Any], sums: LossSums) -> Window:
        info = batch.get("window")
        if info is None:  # a batch from a plain loader: it is its own window
            return Window(sums.num_masks, sums.num_tokens, 1.0)
        world = self.trainer.world_size if self._trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if world == 1:  # the loader's own counts: host numbers, nothing to wait for
            return Window(float(info["masks"]), float(info["tokens"]), float(accumulate))
        # Summed over ranks on the device and used there: reading the sum back to the host would wait for
        # the whole forward pass queued before it. float32 holds these counts exactly (< 2^24).
        counts = torch.tensor([info["masks"], info["tokens"]], dtype=torch.float32)
        counts = self.trainer.strategy.reduce(counts.to(self.device, non_blocking=True), reduce_op="sum")
        return Window(counts[0], counts[1], float(accumulate * world))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.graphs is not None:
            step_begin()  # the previous micro-batch's graph outputs are done with
            self.graphs.ensure()
        _, sums = self._forward(batch)
        losses = combine(sums, self.cfg.loss, self._window(batch, sums))
        loss = losses["loss"]
        self.guard.observe(loss, batch["ids"])
        size = len(batch["ids"])
        self.log("train/loss", losses["loss_logged"], prog_bar=True, batch_size=size)
        for key in ("loss_mask", "loss_dice", "llm_loss"):
            self.log(f"train/{key}", losses[key], batch_size=size)
        if self._trainer is not None and self.trainer.lr_scheduler_configs:
            lr = self.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
            self.log("train/lr", host_scalar(lr), batch_size=size)
        return loss

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        # with CUDA graphs the gradients stay in place, zeroed (GradsOutsideGraphs); otherwise freed
        optimizer.zero_grad(set_to_none=self.graphs is None)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Applies the optimizer step only if every loss and gradient of it was finite on every rank.

        Runs at the last micro-batch of each accumulation window. A bad step is skipped whole: no
        optimizer update (no moment update, no weight decay), gradients dropped; the global step and the
        LR schedule still advance, as with AMP's skipped steps. Under fp16 AMP the GradScaler keeps
        handling gradient overflow itself (only losses are checked); under DeepSpeed the ZeRO optimizer
        skips non-finite gradients itself and its overflow flag is counted here.
        """
        trainer = self.trainer
        params = [p for p in self.model.parameters() if p.requires_grad]
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # DeepSpeed accumulates itself; its engine says whether this micro-batch ends the window. Asked
            # before `step`, which advances the engine's micro-step count.
            boundary = trainer.model.is_gradient_accumulation_boundary()
            optimizer.step(closure=optimizer_closure)
            if boundary:
                overflow = bool(getattr(getattr(trainer.model, "optimizer", None), "overflow", False))
                overflow &= not str(trainer.precision).startswith("16")  # fp16: loss scaling's routine overflow
                self.guard.decide(self, torch.tensor(overflow))
                self.log("train/bad_steps", host_scalar(self.guard.total), batch_size=1)
            return
        closure_result = optimizer_closure()  # forward + backward of the window's last micro-batch
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        check = self.guard.check_grads and scaler is None
        grads_bad = NonFiniteGuard.grads_bad(params) if check else None
        inner = _torch_optimizer(optimizer)
        on_device = self.cfg.speed.overlap_steps and scaler is None and inner.defaults.get("fused")
        if on_device:
            # The decision stays on the device: fused AdamW skips the whole update itself when `found_inf` is
            # set (no moments, no weight decay, its step count restored: GradScaler's protocol), so the host
            # goes on to the next batch (its copy to the GPU, the next forward) while this backward still
            # runs. The guard reports the outcome at the next optimizer step.
            inner.found_inf = self.guard.defer(self, grads_bad)
            skip = False
        else:
            skip = self.guard.decide(self, grads_bad)
        self.log("train/bad_steps", host_scalar(self.guard.total), batch_size=1)
        if skip:
            optimizer.zero_grad(set_to_none=True)
            for p in params:  # with bf16 weights the gradients are still on the model, not yet on the masters
                p.grad = None
            return
        try:
            optimizer.step(closure=lambda: closure_result)
        finally:
            if on_device:
                del inner.found_inf
        if self.masters is not None:  # after a step skipped on the device this copies the unchanged masters back
            self.masters.masters_to_model()

    def on_validation_epoch_start(self) -> None:
        if self.compiled:  # validation runs eagerly: see suspend_compiled
            self._suspended = suspend_compiled(self.model)
        # ZeRO-3 gathers every layer's weights from all ranks in each forward: a rank with fewer validation
        # batches (the split need not divide evenly) would leave the others waiting forever. Agree on the
        # most batches any rank has; ranks with fewer repeat their last batch's forward (results discarded).
        self._val_batches_max = None
        if self._zero3() and self.trainer.world_size > 1:
            own = self._own_val_batches()
            most = self.trainer.strategy.reduce(torch.tensor(float(own), device=self.device), reduce_op="max")
            self._val_batches_max = int(most)

    def _own_val_batches(self) -> int:
        counts = self.trainer.num_sanity_val_batches if self.trainer.sanity_checking else self.trainer.num_val_batches
        return int(counts[0]) if counts else 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.val_metrics.device != self.device:
            # DeepSpeed ZeRO-3 does not move the LightningModule's own children; NCCL cannot reduce CPU states.
            self.val_metrics.to(self.device)
        out, sums = self._forward(batch)
        if self._val_batches_max is not None and batch_idx == self._own_val_batches() - 1:
            with torch.no_grad():
                for _ in range(self._val_batches_max - self._own_val_batches()):
                    self._forward(batch)
        losses = combine(sums, self.cfg.loss, Window(sums.num_masks, sums.num_tokens))
        size = len(batch["ids"])
        self.log("val/loss", losses["loss_logged"], sync_dist=True, batch_size=size)
        predictions = []
        for i, masks in enumerate(batch["masks"]):
            logits = out.mask_logits[out.seg_sample_index == i]
            pred = masks_at(logits, tuple(masks.shape[-2:]), self.model.grounding.image_size)
            fov = batch["fov"][i] if "fov" in batch else None
            self.val_metrics.update(pred.cpu(), masks.cpu(), fov)
            name = batch["targets"][i] if "targets" in batch else None
            spacing = batch["pixel_spacings"][i] if "pixel_spacings" in batch else None
            self.target_scores.to(self.device).update(pred, masks, fov, name, spacing)
            predictions.append(pred)
        if batch_idx == 0 and self.overlays > 0:
            self._log_overlays(batch, predictions)

    def on_validation_epoch_end(self) -> None:
        resume_compiled(self._suspended)
        self._suspended = []
        # compute() has already gathered every rank's states, so each rank holds the same value; sync_dist
        # averages identical numbers (exact) and tells Lightning the value is global, which it otherwise warns about.
        scores = self.val_metrics.compute()
        self.log("val/dice", scores["dice"], prog_bar=True, sync_dist=True)
        self.log("val/iou", scores["iou"], sync_dist=True)
        self.val_metrics.reset()
        for key, value in self.target_scores.compute().items():
            self.log(f"val/{key}", value, sync_dist=True)  # val/hd95, val/hd95_undefined, val/dice/<target>, ...
        self.target_scores.reset()
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log.info(
                "step %d  val/dice %.4f  val/iou %.4f", self.global_step, float(scores["dice"]), float(scores["iou"])
            )

    def _log_overlays(self, batch: dict[str, Any], predictions: list[torch.Tensor]) -> None:
        """Image | ground truth | prediction rows, from the SAM-branch pixels (un-normalised)."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or not self.trainer.is_global_zero:
            return
        mean = torch.tensor(SAM_MEAN_BF16)[:, None, None]
        std = torch.tensor(SAM_STD_BF16)[:, None, None]
        rows = []
        for i in range(min(self.overlays, len(predictions))):
            gt = batch["masks"][i][0].float().cpu()
            pred = predictions[i][0].float().cpu()
            size = gt.shape
            raw = batch["sam_pixel_values"][i].cpu()
            pixels = raw.float() / 255.0 if raw.dtype == torch.uint8 else raw.float() * std + mean
            image = torch.nn.functional.interpolate(pixels[None], size=size, mode="bilinear")[0].clamp(0, 1)
            overlay = image.clone()
            overlay[0] = torch.where(pred > 0, 1.0, overlay[0])
            overlay[1] = torch.where(gt > 0, 1.0, overlay[1])
            rows.append(torch.cat([image, gt.expand(3, *size), pred.expand(3, *size), overlay], dim=2))
        grid = torch.cat(rows, dim=1).numpy()
        experiment.add_image("val/overlay", np.clip(grid, 0, 1), self.global_step, dataformats="CHW")

    # ---------------------------------------------------------------- optimizer
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.masters is not None:  # before Lightning clips the optimizer's (the masters') gradients
            self.masters.grads_to_masters()

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        inner = _torch_optimizer(optimizer)
        if (
            not gradient_clip_val
            or not inner.defaults.get("fused")
            or isinstance(self.trainer.strategy, DeepSpeedStrategy)
        ):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        # Lightning's AMP plugin refuses to clip for any fused optimizer, as one that could unscale fp16 gradients
        # itself. vseg fuses AdamW only where no GradScaler runs (configure_optimizers), so these gradients are
        # the true ones and are clipped as Lightning would clip them.
        params = [p for group in inner.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_train_end(self) -> None:
        self.guard.settle()  # the last step's deferred report (and the stop, were it one too many)
        if self.masters is not None:  # final weights, last.ckpt and exports in float32
            self.masters.restore_fp32()
            self.masters = None
            if self.compiled:  # the graphs were made for the bf16 weights
                uncompile_blocks(self.model)
                self.compiled = None
        if self.feature_cache is not None:
            log.info("rank %d: feature cache: %s", self.global_rank, self.feature_cache.summary())

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                p = self.masters.master_of(p) if self.masters is not None else p
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.cfg.strategy.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: deepspeed loads only with CPU offload

            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas))
        else:
            # Fused (one kernel set for every tensor; the guard's device-side skip needs it), except under fp16
            # AMP, where Lightning's gradient clipping refuses optimizers that unscale internally.
            fused = not str(self.trainer.precision).startswith("16")
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=int(o.warmup_ratio * total),
            num_training_steps=total,
            min_lr_rate=o.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = set(trainable_state_dict(self, prefix=""))
        state = checkpoint.get("state_dict")
        if state is not None:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}
            if self.masters is not None:  # the float32 masters, not their bf16 roundings
                checkpoint["state_dict"].update(self.masters.state())
        checkpoint["vseg"] = {"trainable_keys": sorted(keep)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = set(trainable_state_dict(self))
        if "state_dict" not in checkpoint:
            # DeepSpeed: the engine restored the weights itself (strictly for the saved trainable ones); the
            # client state only carries the names they were saved under.
            saved = set(checkpoint.get("vseg", {}).get("trainable_keys", expected))
            if saved != expected:
                raise RuntimeError(
                    "DeepSpeed checkpoint was written for other trainable weights "
                    f"(missing {sorted(expected - saved)[:5]}, unexpected {sorted(saved - expected)[:5]}); "
                    "was it written with the same model / lora config?"
                )
            return
        state = checkpoint["state_dict"]
        if self.masters is not None:  # resume: the masters from the saved float32 values
            self.masters.load(state)
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise RuntimeError(
                "checkpoint does not match this model's trainable weights "
                f"(missing {len(missing)}: {missing[:5]}, unexpected {len(unexpected)}: {unexpected[:5]}); "
                "was it written with the same model / lora config?"
            )
