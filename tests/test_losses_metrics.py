"""Numerics that must not drift: loss values by hand, window normalisation, metric reductions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vseg.config import LossConfig
from vseg.losses import LossSums, Window, bce_per_mask, combine, dice_loss_per_mask, mask_loss_sums
from vseg.metrics import SegmentationMetrics, dice_iou_per_image
from vseg.model.grounding import mask_logits_at, masks_at


def test_bce_and_dice_match_hand_computation():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 0.5]]])
    target = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-0.5))]
    t = [0, 1, 0, 1]
    bce = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p, t, strict=True)) / 4
    dice = 1 - (2 * (p[1] + p[3]) + 1) / (sum(p) + 2 + 1)
    assert bce_per_mask(logits, target).item() == pytest.approx(bce, rel=1e-6)
    assert dice_loss_per_mask(logits, target).item() == pytest.approx(dice, rel=1e-6)


def test_combine_weights_and_logging():
    sums = LossSums(torch.tensor(0.6), torch.tensor(0.4), 2, torch.tensor(12.0), 6)
    out = combine(sums, LossConfig(mask_weight=2.0, dice_weight=0.5, llm_weight=1.0), Window(2, 6))
    assert out["loss_mask"].item() == pytest.approx(0.3)
    assert out["loss_dice"].item() == pytest.approx(0.2)
    assert out["llm_loss"].item() == pytest.approx(2.0)
    assert out["loss"].item() == pytest.approx(2 * 0.3 + 0.5 * 0.2 + 2.0)
    assert out["loss_logged"].item() == pytest.approx(out["loss"].item())


@pytest.mark.parametrize("summed_on_device", [False, True])
def test_accumulated_gradient_equals_full_batch_gradient(summed_on_device):
    """Two micro-batches with different mask and token counts, averaged by the trainer (/2),
    give the gradient of one batch holding all of them; the window's counts may be host numbers (one rank) or
    0-dim tensors (summed over ranks on the device, never read back)."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    feats = [torch.randn(1, 4, 4, 5), torch.randn(3, 4, 4, 5)]  # 1 mask, then 3 masks
    targets = [torch.rand(1, 4, 4) > 0.5, torch.rand(3, 4, 4) > 0.5]
    tokens = [torch.randn(2, 5), torch.randn(7, 5)]  # 2 answer tokens, then 7
    cfg = LossConfig()

    def sums_of(i):
        bce, dice = mask_loss_sums(feats[i] @ w, targets[i].float())
        llm = ((tokens[i] @ w) ** 2).sum()
        return LossSums(bce, dice, feats[i].shape[0], llm, tokens[i].shape[0])

    count = torch.tensor if summed_on_device else float
    window = Window(num_masks=count(4.0), num_tokens=count(9.0), scale=2.0)
    for i in range(2):
        (combine(sums_of(i), cfg, window)["loss"] / 2).backward()  # Lightning divides by accumulation
    accumulated = w.grad.clone()
    w.grad = None
    bce, dice = mask_loss_sums(torch.cat(feats) @ w, torch.cat(targets).float())
    llm = ((torch.cat(tokens) @ w) ** 2).sum()
    combine(LossSums(bce, dice, 4, llm, 9), cfg, Window(4, 9))["loss"].backward()
    torch.testing.assert_close(accumulated, w.grad)


def test_image_size_mask_loss_upsamples_logits():
    logits = torch.zeros(2, 4, 4)
    targets = torch.zeros(2, 8, 8)
    bce, _ = mask_loss_sums(logits, targets, "image")
    assert bce.item() == pytest.approx(2 * math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="differ"):
        mask_loss_sums(logits, targets, "low_res")


def test_dice_iou_per_image_and_empty_convention():
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]]).bool()
    gt = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 1]]]).bool()
    dice, iou = dice_iou_per_image(pred, gt)
    torch.testing.assert_close(dice, torch.tensor([2 / 3, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(iou, torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))


def test_metric_averages_per_image_across_updates():
    metric = SegmentationMetrics()
    pred = torch.tensor([[[1, 1], [0, 0]]]).bool()
    gt = torch.tensor([[[1, 0], [0, 0]]]).bool()
    metric.update(pred, gt)  # dice 2/3
    metric.update(gt, gt)  # dice 1
    scores = metric.compute()
    assert scores["dice"].item() == pytest.approx((2 / 3 + 1) / 2)
    assert scores["iou"].item() == pytest.approx(0.75)


def _bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), written out in float64 numpy."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, wy = axis(x.shape[0], height)
    x0, x1, wx = axis(x.shape[1], width)
    top = x[y0][:, x0] * (1 - wx) + x[y0][:, x1] * wx
    bottom = x[y1][:, x0] * (1 - wx) + x[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


@pytest.mark.parametrize("size", [(37, 29), (64, 64), (90, 140)])
def test_masks_at_image_size_follow_the_authors_two_resizes(size):
    """Low-res logits go to the SAM-2 side first, then to the image size (Sa2VA's video-predictor path)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 16, 16, generator=g) * 4
    sam_size = 64
    got = mask_logits_at(logits, size, sam_size)
    for i in range(2):
        want = _bilinear(_bilinear(logits[i].double().numpy(), sam_size, sam_size), *size)
        np.testing.assert_allclose(got[i].numpy(), want, atol=1e-4)  # float32 arithmetic
        decided = np.abs(want) > 1e-3
        np.testing.assert_array_equal(masks_at(logits, size, sam_size)[i].numpy()[decided], (want > 0)[decided])
    if size == (sam_size, sam_size):
        return
    # One direct resize is not the same function (the defect this replaces).
    direct = torch.nn.functional.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    assert not torch.allclose(direct, got, atol=1e-3)
