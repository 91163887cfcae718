"""Masks out of the service: PNG, COCO RLE, polygons; and corrected masks saved as `data=polygons` training data.

Polygons are exact: each run of foreground pixels is a rectangle on pixel borders, and runs that repeat on
consecutive rows merge into one taller rectangle. Traced outlines would be shorter but lose pixels at thin
vessel edges, and `data.holes=union` (the default) would fill every loop a vessel tree encloses; rectangles
never overlap and have no holes, so the mask `vseg check` / training rasterise from them (pycocotools) is the
mask the user saw, pixel for pixel (tested).
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from vseg.artifacts.files import atomic_write

_SAVE_LOCK = threading.Lock()  # one annotations.json per data root: read-modify-write must not interleave
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_png(mask: np.ndarray) -> str:
    """HxW bool -> base64 PNG, 0 / 255 (what predict.py writes in masks/)."""
    return png_b64(mask.astype(np.uint8) * 255)


def probability_png(probability: np.ndarray) -> str:
    """HxW float in [0, 1] -> base64 8-bit grey PNG (round(255 p)); the page thresholds it as the user slides."""
    return png_b64(np.clip(np.rint(probability * 255), 0, 255).astype(np.uint8))


def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE ({"size": [h, w], "counts": str}), as pycocotools' `encode` gives it."""
    out = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in out["size"]], "counts": out["counts"].decode("ascii")}


def polygons(mask: np.ndarray) -> list[list[float]]:
    """Rectangles `[x0, y0, x1, y0, x1, y1, x0, y1]` (COCO coordinates) whose union is exactly `mask`."""
    height = mask.shape[0]
    padded = np.zeros((height, mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    active: dict[tuple[int, int], int] = {}  # (x0, x1) run -> first row
    rects: list[tuple[int, int, int, int]] = []
    for row in range(height + 1):
        runs = set()
        if row < height:
            starts, ends = np.flatnonzero(edges[row] == 1), np.flatnonzero(edges[row] == -1)
            runs = set(zip(starts.tolist(), ends.tolist(), strict=True))
        for run in [r for r in active if r not in runs]:
            rects.append((run[0], active.pop(run), run[1], row))
        for run in runs:
            active.setdefault(run, row)
    rects.sort(key=lambda r: (r[1], r[0]))
    return [
        [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]
        for x0, y0, x1, y1 in rects
    ]


def save_annotation(
    data_root: Path, name: str, image: np.ndarray, mask: np.ndarray, text: str
) -> tuple[Path, Path, int]:
    """Writes `<data_root>/<name>.png` and adds (or replaces) its entry in `<data_root>/annotations.json`.

    The JSON is the `polygons` source's format, image paths relative to its folder, so
    `vseg check data=polygons data.annotations=<data_root>/annotations.json` and `train.py data=polygons ...`
    read it as it is. Returns (image path, annotations path, entries in the file).
    """
    if not NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"name={name!r}: letters, digits, '.', '_' or '-' (up to 100), no folders")
    if not mask.any():
        raise ValueError("the mask is empty: mark some vessel before saving (an empty object is not training data)")
    stem = name[:-4] if name.lower().endswith(".png") else name
    image_path = data_root / f"{stem}.png"
    annotations = data_root / "annotations.json"
    entry = {
        "image": image_path.name,
        "mask": [polygons(mask)],
        "text": [text],
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
    }
    with _SAVE_LOCK:
        entries = json.loads(annotations.read_text(encoding="utf-8")) if annotations.is_file() else []
        if not isinstance(entries, list):
            raise ValueError(f"{annotations} is not a list of entries; move it away to save here")
        entries = [e for e in entries if not (isinstance(e, dict) and e.get("image") == entry["image"])] + [entry]
        atomic_write(image_path, lambda p: Image.fromarray(image).save(p, format="PNG"), "annotated image")
        atomic_write(annotations, lambda p: p.write_text(json.dumps(entries)), "annotations file")
    return image_path, annotations, len(entries)
