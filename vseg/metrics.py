"""Segmentation metrics: per-image Dice and IoU, averaged over images, reduced across ranks.

Vessel papers report the mean of per-image scores, so one huge image cannot dominate. An image where
both prediction and ground truth are empty scores 1 (nothing to find, nothing found).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def dice_iou_per_image(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) Dice and IoU of boolean (N, H, W) masks, counting only pixels where `valid` (H, W) is true."""
    pred = pred.bool().flatten(1)
    target = target.bool().flatten(1)
    if valid is not None:
        keep = valid.bool().flatten().to(pred.device)
        pred, target = pred[:, keep], target[:, keep]
    inter = (pred & target).sum(1).double()
    p, t = pred.sum(1).double(), target.sum(1).double()
    union = p + t - inter
    empty = (p + t) == 0
    dice = torch.where(empty, torch.ones_like(inter), 2 * inter / (p + t).clamp(min=1))
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp(min=1))
    return dice, iou


class SegmentationMetrics(Metric):
    """Mean per-image Dice and IoU; state is sums and a count so DDP reduction is exact."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("dice_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Adds boolean predictions and targets of shape (N, H, W), optionally within a field of view (H, W)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if valid is not None and tuple(valid.shape) != tuple(pred.shape[-2:]):
            raise ValueError(f"field of view {tuple(valid.shape)} and masks {tuple(pred.shape[-2:])} differ")
        dice, iou = dice_iou_per_image(pred, target, valid)
        self.dice_sum += dice.sum()
        self.iou_sum += iou.sum()
        self.count += dice.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1).double()
        return {"dice": (self.dice_sum / n).float(), "iou": (self.iou_sum / n).float()}
