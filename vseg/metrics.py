"""Segmentation metrics: per-image Dice and IoU, averaged over images, reduced across ranks.

Vessel papers report the mean of per-image scores, so one huge image cannot dominate. An image where
both prediction and ground truth are empty scores 1 (nothing to find, nothing found).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from vseg.distances import surface_distances


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


class TargetScores(Metric):
    """Validation's per-target Dice and its HD95 / ASSD (pixels, and mm where the data gives a pixel size).

    Slot k < len(names) holds target `names[k]` (the object names of a per_object dataset), the last slot every
    sample. Distances follow `vseg.distances`: 0 when both masks are empty, left out of the mean and counted
    in `<key>_undefined` when only one is. States are sums and counts, so the DDP reduction is exact.
    """

    full_state_update = False
    KEYS = ("dice", "hd95", "assd", "hd95_mm", "assd_mm")

    def __init__(self, names: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.names = list(names or [])
        slots = len(self.names) + 1
        for key in self.KEYS:
            self.add_state(f"{key}_sum", default=torch.zeros(slots, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{key}_n", default=torch.zeros(slots, dtype=torch.long), dist_reduce_fx="sum")
        for key in ("hd95", "assd"):
            self.add_state(f"{key}_undefined", default=torch.zeros(slots, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        valid: torch.Tensor | None = None,
        name: str | None = None,
        spacing: tuple[float, float] | None = None,
    ) -> None:
        """Adds one sample: boolean (1, H, W) or (H, W) masks, its field of view, target name and pixel size."""
        pred, target = pred.bool().reshape(pred.shape[-2:]).cpu(), target.bool().reshape(target.shape[-2:]).cpu()
        if valid is not None:
            valid = valid.bool().cpu()
            pred, target = pred & valid, target & valid
        slots = [len(self.names)] + ([self.names.index(name)] if name is not None and name in self.names else [])
        values: dict[str, float | None] = {"dice": float(dice_iou_per_image(pred[None], target[None])[0][0])}
        values.update(surface_distances(pred.numpy(), target.numpy(), spacing))
        for slot in slots:
            for key, value in values.items():
                if value is None:
                    if key in ("hd95", "assd"):  # the mm values are undefined exactly where these are
                        getattr(self, f"{key}_undefined")[slot] += 1
                    continue
                getattr(self, f"{key}_sum")[slot] += value
                getattr(self, f"{key}_n")[slot] += 1

    def compute(self) -> dict[str, torch.Tensor]:
        """`hd95`, `assd`, their `_undefined` counts and `_mm` values over every sample; `dice/<target>`,
        `hd95/<target>`, ... per target. Keys without any defined value are left out."""
        out: dict[str, torch.Tensor] = {}
        for slot, prefix in [(len(self.names), "")] + [(k, n) for k, n in enumerate(self.names)]:
            for key in self.KEYS:
                if key == "dice" and not prefix:
                    continue  # the overall Dice is SegmentationMetrics'
                n = getattr(self, f"{key}_n")[slot]
                if int(n) > 0:
                    out[f"{key}/{prefix}" if prefix else key] = (getattr(self, f"{key}_sum")[slot] / n).float()
            if not prefix:
                for key in ("hd95", "assd"):
                    out[f"{key}_undefined"] = getattr(self, f"{key}_undefined")[slot].float()
        return out
