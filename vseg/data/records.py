"""Records (what a dataset lists) and samples (what a record becomes at the training size).

A `VesselRecord` is cheap and picklable: paths, polygons, RLEs, never pixels. `load_sample` reads it and
brings everything to the configured size in one place: the image (bicubic), mask files and RLEs
(label-preserving), polygons (coordinates scaled by the image's own factors, then rasterised), and the
field-of-view mask. It reports *every* problem of a record, so `vseg check` can list them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vseg.data.geometry import AnnotationError, Resize, decode_rle, polygon_problems, rasterize
from vseg.data.io import DataFileError, read_image, read_mask
from vseg.data.synthetic import generate_vessels


@dataclass(frozen=True, eq=False)
class ObjectAnnotation:
    """One target object: the union of its parts (polygon sets, RLEs, a mask file)."""

    phrase: str | None = None  # the object's text / category name (per-object prompts)
    polygon_sets: tuple[tuple[np.ndarray, ...], ...] = ()  # each set: one instance's polygons (holes rule inside)
    rles: tuple[dict[str, Any], ...] = ()
    mask_path: str | None = None


@dataclass(frozen=True, eq=False)
class VesselRecord:
    """One image and its annotations, as a source lists them."""

    id: str
    source: str  # e.g. "folders:/data/DRIVE" (reports count per source)
    image_path: str | None = None
    objects: tuple[ObjectAnnotation, ...] = ()
    fov_path: str | None = None  # field-of-view mask file
    frame: tuple[int, int] | None = None  # (height, width) the annotation coordinates refer to, when stated
    group: str | None = None  # the dataset's own split tag (DRIVE: training / test)
    issues: tuple[str, ...] = ()  # problems found while reading the annotation file
    synthetic: tuple[int, int, str] | None = None  # (seed, size, style) of a generated image


@dataclass
class Sample:
    """A record at the training size; `masks` has one plane per object."""

    id: str
    image: np.ndarray  # HxWx3 uint8
    masks: np.ndarray  # (K, H, W) bool
    phrases: list[str | None]
    fov: np.ndarray | None  # HxW bool; metrics count only inside it
    original_size: tuple[int, int]  # (height, width) before resizing
    resized: bool
    problems: list[str] = field(default_factory=list)


def load_sample(record: VesselRecord, image_size: int | None, aspect: str = "stretch", holes: str = "union") -> Sample:
    """Reads a record and brings it to `image_size`; raises DataFileError listing every problem."""
    sample = inspect_sample(record, image_size, aspect, holes)
    if sample.problems:
        where = f" ({record.image_path})" if record.image_path else ""
        raise DataFileError(f"record {record.id}{where}: " + "; ".join(sample.problems))
    return sample


def inspect_sample(
    record: VesselRecord, image_size: int | None, aspect: str = "stretch", holes: str = "union"
) -> Sample:
    """Like `load_sample`, but problems are collected in `sample.problems` instead of raised."""
    problems = list(record.issues)
    if record.synthetic is not None:
        seed, size, style = record.synthetic
        image, mask = generate_vessels(seed=seed, size=size, style=style)
        plan = Resize.plan(size, size, image_size, aspect)
        return Sample(
            record.id, plan.image(image), plan.mask(mask)[None], [None], None, (size, size), plan.changes_size
        )
    try:
        image = read_image(record.image_path or "")
    except DataFileError as err:
        return Sample(
            record.id,
            np.zeros((0, 0, 3), np.uint8),
            np.zeros((0, 0, 0), bool),
            [],
            None,
            (0, 0),
            False,
            [*problems, str(err)],
        )
    height, width = image.shape[:2]
    plan = Resize.plan(height, width, image_size, aspect)
    if record.frame is not None and tuple(record.frame) != (height, width):
        problems.append(
            f"annotation is for a {record.frame[1]}x{record.frame[0]} image but {record.image_path} is "
            f"{width}x{height} (width x height)"
        )
    masks, phrases = [], []
    for k, obj in enumerate(record.objects):
        try:
            masks.append(_object_mask(obj, height, width, plan, holes))
        except (AnnotationError, DataFileError) as err:
            problems.append(f"object {k}: {err}" if len(record.objects) > 1 else str(err))
            masks.append(np.zeros(plan.canvas, bool))
        phrases.append(obj.phrase)
    if not masks:  # no annotated object: one empty target (the checker flags it unless data.allow_empty)
        masks.append(np.zeros(plan.canvas, bool))
        phrases.append(None)
    fov = None
    if record.fov_path is not None:
        try:
            raw = read_mask(record.fov_path)
            if raw.shape != (height, width):
                problems.append(
                    f"field-of-view mask {record.fov_path} is {raw.shape[1]}x{raw.shape[0]}, image {width}x{height}"
                )
            else:
                fov = plan.mask(raw)
        except DataFileError as err:
            problems.append(str(err))
    if fov is None and plan.canvas != (plan.out_height, plan.out_width):  # padding is outside the image
        fov = plan.mask(np.ones((height, width), bool))
    return Sample(
        record.id, plan.image(image), np.stack(masks), phrases, fov, (height, width), plan.changes_size, problems
    )


def _object_mask(obj: ObjectAnnotation, height: int, width: int, plan: Resize, holes: str) -> np.ndarray:
    canvas = np.zeros(plan.canvas, bool)
    for polygons in obj.polygon_sets:
        bad = polygon_problems(polygons, height, width)
        if bad:
            raise AnnotationError("; ".join(bad))
        canvas |= rasterize([plan.points(p) for p in polygons], *plan.canvas, holes=holes)
    for rle in obj.rles:
        canvas |= plan.mask(decode_rle(rle, height, width))
    if obj.mask_path is not None:
        mask = read_mask(obj.mask_path)
        if mask.shape != (height, width):
            raise DataFileError(
                f"mask {obj.mask_path} is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}"
            )
        canvas |= plan.mask(mask)
    return canvas


def relative_to(path: str | Path, root: str | Path) -> str:
    """`path` shown relative to `root` when it lies under it (for compact reports)."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
