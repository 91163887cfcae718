"""HD95 and ASSD on hand-made masks with known answers, pixel spacing, and the empty-mask rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vseg.config import ConfigError
from vseg.distances import parse_spacing, summarise_distances, surface_distances
from vseg.inference.scoring import score_masks

SIZE = 128


def _disc(cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


@pytest.mark.parametrize("k", [1, 3, 6])
def test_disc_grown_by_k_is_k_away_everywhere(k):
    # Every boundary point of a disc of radius r lies k from the circle of radius r + k: HD95 = ASSD = k
    # (up to the pixel grid's rounding of the two circles).
    d = surface_distances(_disc(64, 60, 20), _disc(64, 60, 20 + k))
    assert d["hd95"] == pytest.approx(k, abs=0.5)
    assert d["assd"] == pytest.approx(k, abs=0.5)


@pytest.mark.parametrize("k", [2, 5])
def test_disc_shifted_by_k(k):
    # A shift of k moves the leading and trailing edges by k (the 95th percentile reaches them) while the
    # sides hardly move: the mean distance of a point at angle t is ~k|cos t|, whose average is 2k/pi.
    d = surface_distances(_disc(64, 60, 24), _disc(64, 60 + k, 24))
    assert d["hd95"] == pytest.approx(k, abs=0.5)
    assert d["assd"] == pytest.approx(2 * k / math.pi, rel=0.2)
    assert d["assd"] < d["hd95"]


def test_thin_line_shifted_is_exactly_k():
    line = np.zeros((64, 64), bool)
    line[20, 5:60] = True  # one pixel wide: the whole line is its own boundary
    d = surface_distances(line, np.roll(line, 4, axis=0))
    assert d == {"hd95": pytest.approx(4.0), "assd": pytest.approx(4.0)}
    assert surface_distances(line, line) == {"hd95": 0.0, "assd": 0.0}


def test_spacing_scales_the_millimetre_values():
    line = np.zeros((64, 64), bool)
    line[20, 5:60] = True
    down = np.roll(line, 4, axis=0)  # 4 rows apart
    iso = surface_distances(line, down, spacing=(0.5, 0.5))
    assert iso["hd95"] == pytest.approx(4.0) and iso["hd95_mm"] == pytest.approx(2.0)
    assert iso["assd_mm"] == pytest.approx(2.0)
    # anisotropic: only the row size matters for a shift along rows, only the column size along columns
    aniso = surface_distances(line, down, spacing=(0.25, 3.0))
    assert aniso["hd95_mm"] == pytest.approx(1.0) and aniso["assd_mm"] == pytest.approx(1.0)
    column = np.zeros((64, 64), bool)
    column[5:60, 20] = True
    across = surface_distances(column, np.roll(column, 4, axis=1), spacing=(0.25, 3.0))
    assert across["hd95"] == pytest.approx(4.0) and across["hd95_mm"] == pytest.approx(12.0)


def test_empty_cases():
    empty, disc = np.zeros((SIZE, SIZE), bool), _disc(64, 64, 10)
    assert surface_distances(empty, empty, (0.5, 0.5)) == {"hd95": 0.0, "assd": 0.0, "hd95_mm": 0.0, "assd_mm": 0.0}
    for pred, truth in ((disc, empty), (empty, disc)):
        d = surface_distances(pred, truth, (0.5, 0.5))
        assert d == {"hd95": None, "assd": None, "hd95_mm": None, "assd_mm": None}


def test_summary_leaves_undefined_out_of_the_mean_and_counts_them():
    records = [
        {"hd95": 2.0, "assd": 1.0},
        {"hd95": 0.0, "assd": 0.0},  # both empty
        {"hd95": None, "assd": None},  # one empty
        {"dice": 1.0},  # not scored (no truth)
    ]
    s = summarise_distances(records)
    assert s == {"hd95": 1.0, "assd": 0.5, "hd95_undefined": 1, "assd_undefined": 1}
    assert summarise_distances([{"hd95": None, "assd": None}])["hd95"] is None


def test_score_masks_adds_distances_inside_the_field_of_view():
    truth = _disc(64, 60, 20)
    pred = _disc(64, 63, 20)
    scores = score_masks(pred, truth, spacing=(0.2, 0.2))
    assert scores["hd95"] == pytest.approx(3.0, abs=0.5) and scores["hd95_mm"] == pytest.approx(scores["hd95"] * 0.2)
    assert "hd95_mm" not in score_masks(pred, truth)
    fov = np.zeros((SIZE, SIZE), bool)
    fov[:, :30] = True  # neither mask reaches inside: both empty there
    assert score_masks(pred, truth, fov)["hd95"] == 0.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (0.3, (0.3, 0.3)), ([0.3, 0.25], (0.3, 0.25)), ((2, 2), (2.0, 2.0)), ([1.5], (1.5, 1.5))],
)
def test_parse_spacing(value, expected):
    assert parse_spacing(value) == expected


@pytest.mark.parametrize("value", [0, -1.0, [0.1, 0.2, 0.3], "0.3mm", [0.1, "x"], True, float("nan")])
def test_parse_spacing_refuses_bad_values_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"data\.pixel_spacing=.*millimetres"):
        parse_spacing(value)
