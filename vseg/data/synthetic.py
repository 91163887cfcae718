"""Seeded synthetic blood-vessel images with exact segmentation masks.

Produces angiogram-like (grey X-ray) or fundus-like (retinal photograph) images containing branching,
smoothly curving, tapering vessel trees, together with the binary mask of exactly the drawn geometry.
Meant for smoke tests, demos and sanity checks of the fine-tuning pipeline when no real data is at hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

STYLES = ("angiogram", "fundus")
_SS = 2  # supersampling: anti-aliased coverage lets the mask be the exact 50 % coverage set

Branch = tuple[list[tuple[float, float, float]], float]  # ([(x, y, width), ...], contrast)


@dataclass(frozen=True)
class VesselStyle:
    """Vessel-tree parameters of one image style; widths and areas are fractions of the image size."""

    trunk_width: tuple[float, float]
    contrast: tuple[float, float]
    area: tuple[float, float]  # target summed vessel area (before overlaps) as a fraction of the image
    branch_prob: float  # per step
    taper: float  # per-step width factor, so vessels thin towards their tips
    wiggle: float  # std of the per-step curvature change, radians
    max_trees: int


_STYLES = {
    "angiogram": VesselStyle((0.04, 0.06), (0.45, 0.7), (0.06, 0.12), 0.07, 0.986, 0.03, 5),
    "fundus": VesselStyle((0.025, 0.04), (0.45, 0.7), (0.06, 0.12), 0.09, 0.982, 0.03, 10),
}


def _grow_tree(
    rng: np.random.Generator,
    root: tuple[float, float],
    heading: float,
    width: float,
    bend: float,
    contrast: float,
    style: VesselStyle,
    step: float,
    inside: Callable[[float, float], bool],
    budget: float,
) -> tuple[list[Branch], float]:
    """Grows one vessel tree by a random walk of headings; returns its branches and summed area.

    Pending side branches are dropped once the tree's area exceeds `budget`, which keeps the foreground
    fraction in a predictable range without cutting any drawn vessel short.
    """
    branches: list[Branch] = []
    area = 0.0
    stack = [(root[0], root[1], heading, width, bend)]
    while stack and area < budget:
        x, y, h, w, b = stack.pop()
        pts = [(x, y, w)]
        k = 0.0
        for _ in range(500):
            # Curvature is itself a damped random walk, so headings change smoothly rather than jitter.
            k = 0.8 * k + rng.normal(0.0, style.wiggle)
            h += k + b
            x, y, w = x + step * np.cos(h), y + step * np.sin(h), w * style.taper
            if w < 0.6 or not inside(x, y):
                break
            pts.append((x, y, w))
            area += max(w, 1.0) * step  # drawn vessels are never thinner than 1 px
            if w > 1.2 and rng.random() < style.branch_prob:
                ratio = rng.uniform(0.45, 0.8)
                side = 1.0 if rng.random() < 0.5 else -1.0
                stack.append((x, y, h + side * rng.uniform(0.45, 1.1), w * ratio, rng.normal(0.0, 0.012)))
                # Murray's law (w^3 conserved) keeps the parent plausibly thick after the split.
                w *= (1.0 - ratio**3) ** (1.0 / 3.0)
                h -= side * rng.uniform(0.05, 0.3)
        if len(pts) > 1:
            branches.append((pts, contrast))
    return branches, area


def _rasterise(branches: list[Branch], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws all branches supersampled; returns (exact mask, darkening in [0, 1]) at output size."""
    hi = Image.new("L", (size * _SS, size * _SS), 0)
    draw = ImageDraw.Draw(hi)
    # A narrower, darker core pass mimics the longer X-ray / light path through a tube's centre.
    for scale, gain in ((1.0, 0.75), (0.5, 1.0)):
        for pts, contrast in branches:
            fill = int(255 * contrast * gain)
            # Never thinner than one output pixel, so sub-pixel tips still get their full-contrast core.
            widths = [max(round(w * _SS * scale), 2) for _, _, w in pts[1:]]
            start = 0
            # Runs of equal integer width become one curved-joint polyline: smoother edges, fewer calls.
            for i in range(1, len(widths) + 1):
                if i < len(widths) and widths[i] == widths[start]:
                    continue
                wd = widths[start]
                run = [(x * _SS, y * _SS) for x, y, _ in pts[start : i + 1]]
                draw.line(run, fill=fill, width=wd, joint="curve")
                for px, py in (run[0], run[-1]):
                    draw.ellipse([px - wd / 2, py - wd / 2, px + wd / 2, py + wd / 2], fill=fill)
                start = i
    arr = np.asarray(hi, dtype=np.float32).reshape(size, _SS, size, _SS)
    mask = (arr > 0).mean(axis=(1, 3)) >= 0.5
    return mask, arr.mean(axis=(1, 3)) / 255.0


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Unit-variance smooth random field with features of about `scale` * size pixels."""
    n = max(8, size // 4)  # filter at quarter resolution: large-sigma filters at full size are slow
    field = ndimage.gaussian_filter(rng.normal(size=(n, n)), sigma=scale * n, mode="wrap")
    field = ndimage.zoom(field, size / n, order=1)[:size, :size]
    return (field - field.mean()) / (field.std() + 1e-8)


def generate_vessels(seed: int, size: int = 128, style: str = "mixed") -> tuple[np.ndarray, np.ndarray]:
    """Generates one synthetic vessel image and its exact vessel mask.

    Args:
        seed: Seed of the private random generator; equal arguments give bit-identical outputs.
        size: Side length of the square output in pixels (at least 32).
        style: "angiogram", "fundus", or "mixed" (style picked from the seed; for a given seed "mixed"
            returns exactly what the picked style returns).

    Returns:
        (image, mask): uint8 RGB array of shape (size, size, 3) and bool array of shape (size, size).

    Raises:
        ValueError: If `style` is not one of the allowed values or `size` < 32.

    """
    if style not in (*STYLES, "mixed"):
        raise ValueError(f"style must be one of {(*STYLES, 'mixed')}, got {style!r}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    rng = np.random.default_rng(seed)
    picked = STYLES[int(rng.integers(2))]  # always drawn so "mixed" and explicit styles share streams
    style = picked if style == "mixed" else style
    params = _STYLES[style]
    fundus = style == "fundus"
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = size / 2 + rng.uniform(-0.02, 0.02, 2) * size
    radius = size * rng.uniform(0.44, 0.485)
    if fundus:
        side = 1.0 if rng.random() < 0.5 else -1.0  # which eye: optic disc left or right of the macula
        disc = (c[0] - side * radius * rng.uniform(0.4, 0.55), c[1] + rng.normal(0.0, 0.04) * size)

        def inside(x: float, y: float) -> bool:
            return (x - c[0]) ** 2 + (y - c[1]) ** 2 < (radius - 1.5) ** 2
    else:

        def inside(x: float, y: float) -> bool:
            return -0.05 * size < x < 1.05 * size and -0.05 * size < y < 1.05 * size

    target = rng.uniform(*params.area) * size * size
    branches: list[Branch] = []
    area, tree = 0.0, 0
    while (tree < params.max_trees and area < target) or tree < 2 or not branches:
        width = rng.uniform(*params.trunk_width) * size * (0.75 if tree >= 4 else 1.0)
        contrast = rng.uniform(*params.contrast)
        if fundus:
            # Arcades alternate above/below the disc and bend towards the macula; later trees go nasal.
            up = -1.0 if tree % 2 == 0 else 1.0
            temporal = tree % 4 < 2
            base = 0.0 if side > 0 else np.pi
            heading = base + up * side * rng.uniform(0.9, 1.3) if temporal else base + np.pi - up * side
            bend = -up * side * rng.uniform(0.012, 0.022) if temporal else rng.normal(0.0, 0.01)
            root = (disc[0] + rng.normal(0.0, 0.01) * size, disc[1] + up * rng.uniform(0.0, 0.02) * size)
        else:
            # Roots sit on a border and head inwards, like vessels entering the field of view.
            edge, t = int(rng.integers(4)), rng.uniform(0.1, 0.9) * size
            root = ((t, 0.0), (size, t), (t, size), (0.0, t))[edge]
            heading, bend = edge * np.pi / 2 + np.pi / 2 + rng.normal(0.0, 0.4), rng.normal(0.0, 0.01)
        budget = max(target - area, 0.3 * target)
        new, new_area = _grow_tree(rng, root, heading, width, bend, contrast, params, size / 60, inside, budget)
        branches += new
        area += new_area
        tree += 1

    mask, dark = _rasterise(branches, size)
    dark = ndimage.gaussian_filter(dark, 0.5)  # soft edges; coverage >= 50 % keeps mask pixels dark
    amp = 0.06 if fundus else 0.1
    texture = amp * _smooth_noise(rng, size, 0.12) + amp * 0.4 * _smooth_noise(rng, size, 0.03)
    r2 = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / radius**2
    if fundus:
        mask &= r2 < ((radius - 1.5) / radius) ** 2
        dr = 0.075 * size
        d2 = ((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2) / dr**2
        mac = (c[0] + side * radius * 0.05, disc[1])
        m2 = ((xx - mac[0]) ** 2 + (yy - mac[1]) ** 2) / (0.14 * size) ** 2
        light = (1.0 + texture) * (1.0 - 0.45 * r2) * (1.0 - 0.25 * np.exp(-m2))
        base = np.array([0.85, 0.38, 0.16]) * rng.uniform(0.85, 1.1, 3)
        rgb = light[..., None] * base + np.exp(-(d2**2))[..., None] * np.array([0.15, 0.45, 0.35])
        rgb *= 1.0 - dark[..., None] * np.array([0.6, 0.9, 0.85])
        rgb *= np.clip(radius - np.sqrt(r2) * radius, 0.0, 1.0)[..., None]  # 1 px soft FOV edge
        rgb += rng.normal(0.0, 0.012, rgb.shape)
    else:
        grey = rng.uniform(0.55, 0.72) * (1.0 + texture) * (1.0 - rng.uniform(0.2, 0.4) * r2 / 2)
        grey = ndimage.gaussian_filter(grey * (1.0 - 0.85 * dark), 0.4) + rng.normal(0.0, 0.025, dark.shape)
        rgb = np.repeat(grey[..., None], 3, axis=2)
    image = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image, mask
