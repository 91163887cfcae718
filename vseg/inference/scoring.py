"""Per-image mask scores for prediction: Dice, IoU, precision, recall, clDice, HD95 and ASSD, inside a field of view.

Conventions (shared with `vseg.metrics`): an image whose prediction and truth are both empty scores 1 on every
measure (nothing to find, nothing found); with only one of them empty, the ratios that have a zero denominator
score 0. clDice (Shit et al., CVPR 2021) compares skeletons with masks: topology precision is the share of the
predicted skeleton inside the true mask, topology sensitivity the share of the true skeleton inside the
predicted mask, clDice their harmonic mean. Skeletons come from scikit-image's `skeletonize` (the reference
implementation the clDice paper uses), computed on the masks already restricted to the field of view.
HD95 and ASSD (pixels, and millimetres given a pixel size) and their empty-mask rules are `vseg.distances`.
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import skeletonize

from vseg.distances import Spacing, surface_distances

SCORES = ("dice", "iou", "precision", "recall", "cldice")


def _ratio(numerator: float, denominator: float, both_empty: bool) -> float:
    if both_empty:
        return 1.0
    return float(numerator / denominator) if denominator > 0 else 0.0


def skeleton(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide skeleton of a boolean HxW mask."""
    return skeletonize(mask.astype(bool))


def cldice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Centerline Dice of two boolean HxW masks."""
    if not pred.any() and not truth.any():
        return 1.0
    sp, st = skeleton(pred), skeleton(truth)
    tprec = _ratio(float((sp & truth).sum()), float(sp.sum()), False)
    tsens = _ratio(float((st & pred).sum()), float(st.sum()), False)
    return 2 * tprec * tsens / (tprec + tsens) if tprec + tsens > 0 else 0.0


def score_masks(
    pred: np.ndarray, truth: np.ndarray, fov: np.ndarray | None = None, spacing: Spacing | None = None
) -> dict[str, float | None]:
    """Every score of one boolean HxW prediction against its truth, counting only pixels inside `fov`.

    `SCORES`, plus `hd95` / `assd` in pixels and, with `spacing` ((row, column) mm per pixel), `hd95_mm` /
    `assd_mm`; a distance is None when exactly one of the masks is empty (`vseg.distances`).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
    pred, truth = pred.astype(bool), truth.astype(bool)
    if fov is not None:
        if fov.shape != pred.shape:
            raise ValueError(f"field of view {fov.shape} and masks {pred.shape} differ in size")
        fov = fov.astype(bool)
        pred, truth = pred & fov, truth & fov
    tp = float((pred & truth).sum())
    p, t = float(pred.sum()), float(truth.sum())
    empty = p + t == 0
    return {
        "dice": _ratio(2 * tp, p + t, empty),
        "iou": _ratio(tp, p + t - tp, empty),
        "precision": _ratio(tp, p, empty),
        "recall": _ratio(tp, t, empty),
        "cldice": cldice(pred, truth),
        **surface_distances(pred, truth, spacing),
    }
