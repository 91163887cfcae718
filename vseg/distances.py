"""Boundary distances clinicians read: HD95 and ASSD, in pixels and (given the pixel size) in millimetres.

Both come from MONAI (`compute_hausdorff_distance(percentile=95)`, `compute_average_surface_distance(
symmetric=True)`), which measure between the masks' boundary pixels with a Euclidean distance transform that
honours an anisotropic `spacing` (row, column). HD95 is the larger of the two directed 95th percentiles of the
boundary-to-boundary distances; ASSD the mean over the boundary pixels of both masks of the distance to the
other boundary.

Empty masks (the same rule in results.jsonl, summary.json and validation):
- both empty: nothing to find, nothing found, distance 0;
- exactly one empty: no boundary to measure to, so the distance is undefined: `None` (null in JSON, NaN in
  tensors), left out of every mean and counted instead (`hd95_undefined`, `assd_undefined`).

Only pixels inside the field of view count, as for Dice (the caller restricts both masks first).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from vseg.config import Spacing, parse_spacing

# MONAI 1.5+ warns on every call about an argument it passes to itself; it says nothing about our inputs.
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)

DISTANCES = ("hd95", "assd")

__all__ = ["DISTANCES", "Spacing", "parse_spacing", "summarise_distances", "surface_distances"]


def _monai(pred: np.ndarray, truth: np.ndarray, spacing: Spacing) -> tuple[float, float]:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    # MONAI wants (batch, channel, H, W); our single channel is the foreground, not a background to drop.
    p = torch.from_numpy(np.ascontiguousarray(pred))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth))[None, None]
    hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=list(spacing))
    assd = compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=list(spacing))
    return float(hd95.item()), float(assd.item())


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Spacing | None = None) -> dict[str, float | None]:
    """HD95 and ASSD of two boolean HxW masks: `hd95`, `assd` in pixels, and `hd95_mm`, `assd_mm` with `spacing`.

    Args:
        pred: the predicted mask.
        truth: the ground-truth mask of the same size.
        spacing: (row, column) size of one pixel in mm; None: the millimetre keys are left out.

    Returns:
        Distances, 0.0 when both masks are empty, None when exactly one is (see the module docstring).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
    pred, truth = pred.astype(bool), truth.astype(bool)
    keys = ["hd95", "assd"] + (["hd95_mm", "assd_mm"] if spacing is not None else [])
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return dict.fromkeys(keys, 0.0)
    if has_pred != has_truth:
        return dict.fromkeys(keys, None)
    hd95, assd = _monai(pred, truth, (1.0, 1.0))
    out: dict[str, float | None] = {"hd95": hd95, "assd": assd}
    if spacing is not None:
        if spacing[0] == spacing[1]:  # square pixels: the same nearest points, every distance scaled
            out["hd95_mm"], out["assd_mm"] = hd95 * spacing[0], assd * spacing[0]
        else:  # anisotropic: the nearest boundary point itself may change, so measure again
            out["hd95_mm"], out["assd_mm"] = _monai(pred, truth, spacing)
    return out


def distance_keys(with_mm: bool) -> tuple[str, ...]:
    return ("hd95", "assd", "hd95_mm", "assd_mm") if with_mm else ("hd95", "assd")


def summarise_distances(records: Sequence[dict[str, Any]] | Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Means over the records where each distance is defined, and `<key>_undefined` counts where it is not.

    Keys absent from every record (no millimetres without a pixel size) are left out of the summary.
    """
    records = list(records)
    out: dict[str, Any] = {}
    for key in distance_keys(True):
        present = [r for r in records if key in r]
        if not present:
            continue
        defined = [float(r[key]) for r in present if r[key] is not None and math.isfinite(float(r[key]))]
        out[key] = float(np.mean(defined)) if defined else None
        if not key.endswith("_mm"):  # the mm values are undefined exactly where the pixel ones are
            out[f"{key}_undefined"] = len(present) - len(defined)
    return out
