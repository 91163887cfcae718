"""Training augmentation that keeps image, masks and field of view aligned.

Geometry (flips, 90-degree rotations, zoom with crop or pad) is applied identically to the image, every mask
plane and the field-of-view mask; colour (brightness, contrast, saturation, gamma) to the image only. Every
draw comes from the generator passed in, so an (epoch, index) pair always gives the same sample.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vseg.config import AugmentConfig


class Augmenter:
    """Applies `AugmentConfig` to (image, masks, fov); a disabled config returns its inputs unchanged."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, fov: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        c = self.cfg
        if not c.enabled:
            return image, masks, fov
        fov = np.ones(image.shape[:2], bool) if fov is None and c.scale[0] < 1.0 else fov
        planes = [image, masks.transpose(1, 2, 0)] + ([fov] if fov is not None else [])
        if rng.random() < c.hflip:
            planes = [p[:, ::-1] for p in planes]
        if rng.random() < c.vflip:
            planes = [p[::-1] for p in planes]
        if rng.random() < c.rot90:
            k = int(rng.integers(1, 4))
            planes = [np.rot90(p, k, axes=(0, 1)) for p in planes]
        if c.scale[1] > c.scale[0] or c.scale[0] != 1.0:
            planes = _zoom(planes, float(rng.uniform(c.scale[0], c.scale[1])), rng)
        image = _colour(np.ascontiguousarray(planes[0]), c, rng)
        masks = np.ascontiguousarray(planes[1].transpose(2, 0, 1))
        fov = np.ascontiguousarray(planes[2]) if len(planes) > 2 else None
        return image, masks, fov


def _resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    if plane.dtype == bool:  # labels: area-weighted then thresholded, never blurred
        if plane.ndim == 3:
            return np.stack([_resize(plane[..., i], height, width) for i in range(plane.shape[2])], axis=2)
        pil = Image.fromarray(plane.astype(np.uint8) * 255).resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(pil) >= 128
    return np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.BICUBIC))


def _zoom(planes: list[np.ndarray], scale: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Zooms by `scale` around a random point, keeping the output size: > 1 crops, < 1 pads (outside the fov)."""
    height, width = planes[0].shape[:2]
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    out = []
    if scale >= 1.0:
        top, left = int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))
        for p in planes:
            out.append(_resize(np.ascontiguousarray(p), h, w)[top : top + height, left : left + width])
    else:
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        for p in planes:
            canvas = np.zeros((height, width, *p.shape[2:]), dtype=p.dtype)
            canvas[top : top + h, left : left + w] = _resize(np.ascontiguousarray(p), h, w)
            out.append(canvas)
    return out


def _colour(image: np.ndarray, c: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    if not (c.brightness or c.contrast or c.saturation or c.gamma[0] != 1.0 or c.gamma[1] != 1.0):
        return image
    x = image.astype(np.float32) / 255.0
    if c.brightness:
        x = x * (1.0 + rng.uniform(-c.brightness, c.brightness))
    if c.contrast:
        x = (x - x.mean()) * (1.0 + rng.uniform(-c.contrast, c.contrast)) + x.mean()
    if c.saturation:
        grey = x.mean(axis=2, keepdims=True)
        x = (x - grey) * (1.0 + rng.uniform(-c.saturation, c.saturation)) + grey
    x = np.clip(x, 0.0, 1.0)
    if c.gamma[0] != 1.0 or c.gamma[1] != 1.0:
        x = x ** rng.uniform(c.gamma[0], c.gamma[1])
    return (x * 255.0 + 0.5).astype(np.uint8)
