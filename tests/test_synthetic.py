"""Tests for the seeded synthetic vessel generator."""

import numpy as np
import pytest
from scipy import ndimage

from vseg.data.synthetic import generate_vessels

STYLES = ("angiogram", "fundus")


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64).mean(axis=2)


@pytest.mark.parametrize("style", [*STYLES, "mixed"])
def test_same_seed_is_bit_identical(style: str) -> None:
    np.random.seed(1)  # global RNG state must not leak into the generator
    a_img, a_mask = generate_vessels(7, 96, style)
    np.random.seed(2)
    np.random.random(10)
    b_img, b_mask = generate_vessels(7, 96, style)
    assert np.array_equal(a_img, b_img)
    assert np.array_equal(a_mask, b_mask)


@pytest.mark.parametrize("style", [*STYLES, "mixed"])
def test_different_seeds_differ(style: str) -> None:
    a_img, a_mask = generate_vessels(1, 64, style)
    b_img, b_mask = generate_vessels(2, 64, style)
    assert not np.array_equal(a_img, b_img)
    assert not np.array_equal(a_mask, b_mask)


def test_mixed_matches_the_style_it_picks() -> None:
    picked = set()
    for seed in range(12):
        img, mask = generate_vessels(seed, 64, "mixed")
        matches = [s for s in STYLES if np.array_equal(generate_vessels(seed, 64, s)[0], img)]
        assert len(matches) == 1
        assert np.array_equal(generate_vessels(seed, 64, matches[0])[1], mask)
        picked.add(matches[0])
    assert picked == set(STYLES)


@pytest.mark.parametrize("size", [32, 100, 128])
@pytest.mark.parametrize("style", [*STYLES, "mixed"])
def test_shapes_and_dtypes(style: str, size: int) -> None:
    img, mask = generate_vessels(3, size, style)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == np.bool_


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("style", STYLES)
def test_foreground_fraction_in_range(style: str, size: int) -> None:
    fractions = np.array([generate_vessels(seed, size, style)[1].mean() for seed in range(20)])
    assert fractions.min() > 0.03 and fractions.max() < 0.25, fractions


@pytest.mark.parametrize("style", STYLES)
def test_vessels_are_darker_than_background(style: str) -> None:
    for seed in range(20):
        img, mask = generate_vessels(seed, 128, style)
        grey = _grey(img)
        # The fundus' black surround is not background tissue, so it is left out of every comparison.
        tissue = ~mask & (grey > 20)
        assert grey[mask].mean() < grey[tissue].mean() - 10
        # Local check: each vessel pixel against nearby non-vessel pixels.
        weight = ndimage.gaussian_filter(tissue.astype(float), 3)
        local_bg = ndimage.gaussian_filter(grey * tissue, 3) / np.maximum(weight, 1e-6)
        sel = mask & (weight > 0.05)
        assert grey[sel].mean() < 0.9 * local_bg[sel].mean()
        assert (grey[sel] < local_bg[sel]).mean() > 0.95


def test_fundus_mask_inside_bright_field_of_view() -> None:
    for seed in range(10):
        img, mask = generate_vessels(seed, 128, "fundus")
        grey = _grey(img)
        assert grey[0, 0] < 5 and grey[-1, -1] < 5
        assert (grey[mask] > 10).all()


@pytest.mark.parametrize("style", ["", "Fundus", "xray", None])
def test_bad_style_raises(style: object) -> None:
    with pytest.raises(ValueError, match="angiogram"):
        generate_vessels(0, 64, style)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 16, 31])
def test_small_size_raises(size: int) -> None:
    with pytest.raises(ValueError, match="size"):
        generate_vessels(0, size, "angiogram")
