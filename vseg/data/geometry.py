"""Sizes, rescaling and polygons: everything that maps annotation coordinates onto pixels.

Coordinates are continuous image coordinates (COCO convention): pixel (row r, column c) covers
[c, c+1) x [r, r+1), so a polygon with corners (0, 0) and (4, 4) covers 4 x 4 pixels. Rescaling an image by
its own factors (sx = out_w / w, sy = out_h / h) maps coordinate x to x * out_w / w exactly, so an outline
drawn for an 800x800 image and rescaled lands on the same pixels as the outline drawn directly at 512x512.
Polygons are rasterised with pycocotools (what Sa2VA's own data loaders use).

Holes: `union` (default; COCO and Sa2VA: all polygons of an object are merged, so a polygon inside another
adds nothing) or `even_odd` (a pixel is foreground when it lies inside an odd number of the object's
polygons, so inner rings cut holes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


class AnnotationError(ValueError):
    """An annotation that cannot be turned into a mask; the message says what is wrong with it."""


@dataclass(frozen=True)
class Resize:
    """How one image of size (height, width) is brought to the training size.

    `stretch` scales both sides to `size` (what Sa2VA's branches do to any image); `pad` scales the longer
    side to `size`, keeps the aspect ratio and pads bottom/right with zeros (outside the field of view).
    """

    height: int
    width: int
    out_height: int  # the content's size after scaling (before padding)
    out_width: int
    canvas: tuple[int, int]  # (height, width) after padding

    @classmethod
    def plan(cls, height: int, width: int, size: int | None, aspect: str = "stretch") -> Resize:
        if size is None:
            return cls(height, width, height, width, (height, width))
        if aspect == "stretch":
            return cls(height, width, size, size, (size, size))
        if aspect == "pad":
            scale = size / max(height, width)
            h, w = max(1, round(height * scale)), max(1, round(width * scale))
            return cls(height, width, h, w, (size, size))
        raise ValueError(f"aspect={aspect!r}: stretch|pad")

    @property
    def changes_size(self) -> bool:
        return self.canvas != (self.height, self.width)  # the canvas equals the original only when nothing changes

    def points(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) x/y coordinates of the original image -> coordinates on the canvas (multiply first: exact)."""
        out = np.empty_like(xy, dtype=np.float64)
        out[:, 0] = xy[:, 0] * self.out_width / self.width
        out[:, 1] = xy[:, 1] * self.out_height / self.height
        return out

    def _pad(self, array: np.ndarray) -> np.ndarray:
        if self.canvas == array.shape[:2]:
            return array
        canvas = np.zeros(self.canvas + array.shape[2:], dtype=array.dtype)
        canvas[: array.shape[0], : array.shape[1]] = array
        return canvas

    def image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8, bicubic (antialiased when shrinking)."""
        if (self.out_height, self.out_width) != image.shape[:2]:
            pil = Image.fromarray(image).resize((self.out_width, self.out_height), Image.Resampling.BICUBIC)
            image = np.asarray(pil)
        return self._pad(image)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """HxW bool, without blurring labels: area-weighted (bilinear, antialiased) then thresholded at 0.5."""
        if (self.out_height, self.out_width) != mask.shape:
            pil = Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (self.out_width, self.out_height), Image.Resampling.BILINEAR
            )
            mask = np.asarray(pil) >= 128
        return self._pad(mask.astype(bool))


def parse_polygon(raw: Any) -> np.ndarray:
    """One polygon, flat `[x1, y1, x2, y2, ...]` or `[[x, y], ...]`, as an (N, 2) float64 array."""
    try:
        array = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationError(f"polygon is not a list of numbers: {str(raw)[:80]}") from None
    if array.ndim == 1:
        if array.size % 2:
            raise AnnotationError(f"flat polygon has an odd number of values ({array.size})")
        array = array.reshape(-1, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise AnnotationError(f"polygon has shape {array.shape}; expected [x1, y1, ...] or [[x, y], ...]")
    if not np.isfinite(array).all():
        raise AnnotationError("polygon has NaN or infinite coordinates")
    return array


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)


def parse_object_polygons(raw: Any) -> list[np.ndarray]:
    """The polygons of one object: a single polygon (flat or pairs) or a list of polygons."""
    if not isinstance(raw, list) or not raw:
        raise AnnotationError(f"object has no polygons: {str(raw)[:80]}")
    if _is_number_list(raw):  # one flat polygon
        return [parse_polygon(raw)]
    if all(_is_number_list(p) and len(p) == 2 for p in raw):  # one polygon as [[x, y], ...]
        return [parse_polygon(raw)]
    return [parse_polygon(p) for p in raw]


def polygon_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def polygon_problems(polygons: Sequence[np.ndarray], height: int, width: int) -> list[str]:
    """What is wrong with an object's polygons in a (height, width) frame: degenerate or outside the image."""
    problems = []
    for k, xy in enumerate(polygons):
        if len(xy) < 3:
            problems.append(f"polygon {k} has {len(xy)} point(s); at least 3 are needed")
        elif polygon_area(xy) == 0.0:
            problems.append(f"polygon {k} has zero area (all points on a line)")
        outside = (xy[:, 0] < 0) | (xy[:, 0] > width) | (xy[:, 1] < 0) | (xy[:, 1] > height)
        if outside.any():
            x, y = xy[np.argmax(outside)]
            problems.append(
                f"polygon {k}: {int(outside.sum())} of {len(xy)} points outside the {width}x{height} image "
                f"(e.g. x={x:g}, y={y:g})"
            )
    return problems


def rasterize(polygons: Sequence[np.ndarray], height: int, width: int, holes: str = "union") -> np.ndarray:
    """An HxW bool mask of one object's polygons (pycocotools rasterisation, COCO coordinates)."""
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), dtype=bool)
    for xy in polygons:
        if len(xy) < 3:
            raise AnnotationError(f"polygon with {len(xy)} point(s) cannot be drawn")
        rle = mask_utils.frPyObjects([xy.reshape(-1).tolist()], height, width)
        drawn = mask_utils.decode(rle)[..., 0].astype(bool)
        if holes == "even_odd":
            mask ^= drawn
        else:
            mask |= drawn
    return mask


def decode_rle(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    """A COCO RLE segmentation (compressed string or uncompressed list counts) as an HxW bool mask."""
    from pycocotools import mask as mask_utils

    size = rle.get("size")
    if size is None or list(size) != [height, width]:
        raise AnnotationError(f"RLE size {size} does not match the image's [height, width] = [{height}, {width}]")
    counts = rle.get("counts")
    if isinstance(counts, list):
        if sum(counts) != height * width:
            raise AnnotationError(f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width}")
        rle = mask_utils.frPyObjects(rle, height, width)
    elif isinstance(counts, str):
        rle = {"size": [height, width], "counts": counts.encode("ascii")}
    elif not isinstance(counts, bytes):
        raise AnnotationError(f"RLE counts must be a list or a string, got {type(counts).__name__}")
    try:
        return mask_utils.decode(rle).astype(bool)
    except Exception as err:  # pycocotools raises plain exceptions on corrupt strings
        raise AnnotationError(f"RLE cannot be decoded: {err}") from None
