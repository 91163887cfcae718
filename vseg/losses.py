"""Sa2VA's losses and how they are normalised, in one place.

Per mask: `loss_mask` is sigmoid BCE averaged over the mask's pixels, `loss_dice` is 1 - soft Dice (the
"naive" form with eps 1 on numerator and denominator, as mmdet's DiceLoss that Sa2VA uses). Per answer
token: `llm_loss` is next-token cross-entropy. The model returns *sums*; this module turns them into means
over an optimisation window (all micro-batches of one optimizer step, on all ranks), so a gradient-
accumulated step and a step on one big batch of the same samples give the same gradient, whatever the
number of masks or answer tokens in each micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vseg.config import LossConfig


def bce_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) sigmoid BCE of each mask, averaged over its pixels."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return loss.flatten(1).mean(dim=1)


def dice_loss_per_mask(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """(N,) 1 - (2 |P T| + eps) / (|P| + |T| + eps) with P = sigmoid(logits)."""
    probs = logits.float().sigmoid().flatten(1)
    targets = targets.float().flatten(1)
    numerator = 2.0 * (probs * targets).sum(dim=1) + eps
    denominator = probs.sum(dim=1) + targets.sum(dim=1) + eps
    return 1.0 - numerator / denominator


@dataclass
class LossSums:
    """Unnormalised loss terms of one micro-batch and the counts they sum over."""

    mask_bce: torch.Tensor  # sum over masks of per-mask BCE
    mask_dice: torch.Tensor  # sum over masks of per-mask Dice loss
    num_masks: int
    llm: torch.Tensor  # sum over answer tokens of CE
    num_tokens: int


def mask_loss_sums(
    logits: torch.Tensor, targets: torch.Tensor, mask_size: str = "low_res"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed BCE and Dice over masks.

    Args:
        logits: (N, h, w) mask logits.
        targets: (N, H, W) binary targets; with `mask_size="low_res"` they must already be (N, h, w).
        mask_size: "low_res" compares at the logits' size (Sa2VA); "image" upsamples the logits
            bilinearly to the targets' size, which keeps thin vessels that nearest downsampling drops.
    """
    if mask_size == "image" and logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(logits[:, None].float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)[
            :, 0
        ]
    if logits.shape != targets.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    return bce_per_mask(logits, targets).sum(), dice_loss_per_mask(logits, targets).sum()


@dataclass
class Window:
    """Totals over one optimisation window (all its micro-batches, all ranks).

    `scale` undoes the averaging done outside the loss: Lightning divides each micro-batch loss by the
    number of accumulated micro-batches and DDP/DeepSpeed average gradients over ranks, so the loss of
    each micro-batch is multiplied by (micro-batches per window x ranks) before those divisions.
    """

    num_masks: float | torch.Tensor  # a 0-dim device tensor when summed over ranks (read back, it would sync)
    num_tokens: float | torch.Tensor
    scale: float = 1.0


def _at_least_one(count: float | torch.Tensor) -> float | torch.Tensor:
    return count.clamp(min=1.0) if isinstance(count, torch.Tensor) else max(count, 1.0)


def combine(sums: LossSums, weights: LossConfig, window: Window) -> dict[str, torch.Tensor]:
    """Weighted total for backward plus per-micro-batch means for logging.

    Returns:
        `loss` (differentiable, window-normalised) and detached `loss_mask`, `loss_dice`, `llm_loss`,
        `loss_logged` (the same weighted sum over this micro-batch's own means).
    """
    masks = _at_least_one(window.num_masks)
    tokens = _at_least_one(window.num_tokens)
    loss = window.scale * (
        weights.mask_weight * sums.mask_bce / masks
        + weights.dice_weight * sums.mask_dice / masks
        + weights.llm_weight * sums.llm / tokens
    )
    own_masks, own_tokens = max(sums.num_masks, 1), max(sums.num_tokens, 1)
    bce = (sums.mask_bce / own_masks).detach()
    dice = (sums.mask_dice / own_masks).detach()
    llm = (sums.llm / own_tokens).detach()
    logged = weights.mask_weight * bce + weights.dice_weight * dice + weights.llm_weight * llm
    return {"loss": loss, "loss_mask": bce, "loss_dice": dice, "llm_loss": llm, "loss_logged": logged}
