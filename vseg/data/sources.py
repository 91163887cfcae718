"""Dataset sources: each turns its `data.*` settings into a list of `VesselRecord`s.

- `synthetic`: the seeded generator (no files).
- `folders`: images matched by a regex with named groups under `data.root`; the mask (and optional
  field-of-view mask) path is a template filled with those groups. DRIVE: `training/images/21_training.tif`
  -> `training/1st_manual/21_manual1.gif` and `training/mask/21_training_mask.gif`.
- `polygons`: the Sa2VA fine-tuning JSON, a list of `{"image": path, "mask": [polygons per object],
  "text": [phrase per object], "width"?, "height"?}`.
- `coco`: a COCO instances JSON (polygon and RLE segmentations), filtered by category names.

Readers never drop anything: an entry that cannot be used becomes a record carrying its `issues`, so the
checker reports it (and `data.skip_invalid` can skip it, counted).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from vseg.config import ConfigError, DataConfig
from vseg.data.geometry import AnnotationError, parse_object_polygons
from vseg.data.io import is_image_file
from vseg.data.records import ObjectAnnotation, VesselRecord


class DataSourceError(ConfigError):
    """A dataset that cannot be read at all (no images, invalid JSON, unknown category)."""


def read_records(cfg: DataConfig) -> list[VesselRecord]:
    """The records of the configured source, in a stable order."""
    readers = {
        "synthetic": synthetic_records,
        "folders": folder_records,
        "polygons": polygon_records,
        "coco": coco_records,
    }
    if cfg.source not in readers:
        raise DataSourceError(f"data.source={cfg.source!r}: expected one of {sorted(readers)}")
    records = readers[cfg.source](cfg)
    if not records:
        raise DataSourceError(f"data.source={cfg.source}: the dataset has no records")
    return records


def synthetic_records(cfg: DataConfig) -> list[VesselRecord]:
    """Image i is the same on every machine for the same seed."""
    size = cfg.image_size or 128
    return [
        VesselRecord(
            id=f"synthetic_{i:05d}",
            source="synthetic",
            synthetic=(cfg.seed * 1_000_003 + i, size, cfg.style),
            objects=(ObjectAnnotation(phrase="blood vessels"),),
        )
        for i in range(cfg.num_samples)
    ]


def folder_records(cfg: DataConfig) -> list[VesselRecord]:
    root = Path(cfg.root or "")
    if not root.is_dir():
        raise DataSourceError(f"data.root={cfg.root}: no such directory")
    pattern = re.compile(cfg.image_pattern)
    source = f"folders:{root}"
    records = []
    seen = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        seen.append(relative)
        match = pattern.fullmatch(relative)
        if match is None or not is_image_file(path):
            continue
        groups = {k: v for k, v in match.groupdict().items() if v is not None}
        mask = root / cfg.mask_pattern.format(**groups)
        fov = root / cfg.fov_pattern.format(**groups) if cfg.fov_pattern else None
        issues = []
        if not mask.is_file():
            issues.append(f"mask file not found: {mask} (data.mask_pattern={cfg.mask_pattern!r})")
        if fov is not None and not fov.is_file():
            issues.append(f"field-of-view file not found: {fov} (data.fov_pattern={cfg.fov_pattern!r})")
        records.append(
            VesselRecord(
                id=groups["id"],
                source=source,
                image_path=str(path),
                objects=(ObjectAnnotation(phrase="blood vessels", mask_path=str(mask)),) if mask.is_file() else (),
                fov_path=str(fov) if fov is not None and fov.is_file() else None,
                group=groups.get("split"),
                issues=tuple(issues),
            )
        )
    if not records:
        sample = ", ".join(seen[:5]) or "no files at all"
        raise DataSourceError(
            f"data.root={root}: no file matches data.image_pattern={cfg.image_pattern!r} (a regex on the path "
            f"under root; files seen: {sample})"
        )
    return records


def _load_json(path: str | None, what: str) -> Any:
    file = Path(path or "")
    if not file.is_file():
        raise DataSourceError(f"data.annotations={path}: no such file")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataSourceError(
            f"data.annotations={file}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            f"expected {what}"
        ) from None
    except UnicodeDecodeError as err:
        raise DataSourceError(f"data.annotations={file}: not UTF-8 text ({err})") from None


def _image_root(cfg: DataConfig) -> Path:
    return Path(cfg.image_root) if cfg.image_root else Path(cfg.annotations or ".").parent


def _unique_ids(stems: list[str]) -> list[str]:
    counts = Counter(stems)
    return [f"{s}_{i:05d}" if counts[s] > 1 else s for i, s in enumerate(stems)]


def polygon_records(cfg: DataConfig) -> list[VesselRecord]:
    entries = _load_json(cfg.annotations, 'a list of {"image": ..., "mask": [...], "text": [...]}')
    if not isinstance(entries, list):
        raise DataSourceError(
            f"data.annotations={cfg.annotations}: expected a JSON list of entries, got {type(entries).__name__}"
        )
    image_root = _image_root(cfg)
    source = f"polygons:{cfg.annotations}"
    stems = [
        Path(str(e.get("image", f"entry{i}"))).stem if isinstance(e, dict) else f"entry{i}"
        for i, e in enumerate(entries)
    ]
    records = []
    for i, (entry, rid) in enumerate(zip(entries, _unique_ids(stems), strict=True)):
        issues: list[str] = []
        if not isinstance(entry, dict):
            records.append(VesselRecord(rid, source, issues=(f"entry {i} is not an object: {str(entry)[:60]}",)))
            continue
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            issues.append(f'entry {i}: "image" must be a file path')
        path = (image_root / image) if isinstance(image, str) and image else None
        objects_raw = entry.get("mask")
        texts = entry.get("text")
        if not isinstance(objects_raw, list) or not objects_raw:
            issues.append(f'entry {i}: "mask" must be a non-empty list of objects (polygons per object)')
            objects_raw = []
        if texts is None:
            texts = [None] * len(objects_raw)
        elif isinstance(texts, str):
            texts = [texts] * len(objects_raw)
        elif not isinstance(texts, list) or len(texts) != len(objects_raw):
            issues.append(
                f'entry {i}: "text" has {len(texts) if isinstance(texts, list) else "no"} phrases for {len(objects_raw)} objects'
            )
            texts = [None] * len(objects_raw)
        objects = []
        for k, (raw, text) in enumerate(zip(objects_raw, texts, strict=True)):
            try:
                objects.append(ObjectAnnotation(phrase=text, polygon_sets=(tuple(parse_object_polygons(raw)),)))
            except AnnotationError as err:
                issues.append(f"object {k}: {err}")
        frame = None
        if "width" in entry or "height" in entry:
            w, h = entry.get("width"), entry.get("height")
            if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
                frame = (h, w)
            else:
                issues.append(f'entry {i}: "width"/"height" must both be positive integers, got {w!r}/{h!r}')
        records.append(
            VesselRecord(
                id=rid,
                source=source,
                image_path=str(path) if path is not None else None,
                objects=tuple(objects),
                frame=frame,
                group=entry.get("split") if isinstance(entry.get("split"), str) else None,
                issues=tuple(issues),
            )
        )
    return records


def coco_records(cfg: DataConfig) -> list[VesselRecord]:
    data = _load_json(cfg.annotations, "a COCO instances file (images, annotations, categories)")
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise DataSourceError(
            f"data.annotations={cfg.annotations}: not a COCO instances file (needs images, annotations, categories)"
        )
    names = {c["id"]: str(c["name"]) for c in data["categories"]}
    if cfg.categories is not None:
        unknown = sorted(set(cfg.categories) - set(names.values()))
        if unknown:
            raise DataSourceError(
                f"data.categories: unknown category {unknown}; {cfg.annotations} has {sorted(set(names.values()))}"
            )
        keep = {cid for cid, name in names.items() if name in set(cfg.categories)}
    else:
        keep = set(names)
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        if ann.get("category_id") in keep:
            by_image.setdefault(ann.get("image_id"), []).append(ann)
    image_root = _image_root(cfg)
    source = f"coco:{cfg.annotations}"
    images = sorted(data["images"], key=lambda im: str(im.get("file_name", "")))
    ids = _unique_ids([Path(str(im.get("file_name", im.get("id")))).stem for im in images])
    records = []
    for image, rid in zip(images, ids, strict=True):
        issues: list[str] = []
        per_category: dict[int, dict[str, list]] = {}
        for ann in by_image.get(image.get("id"), []):
            parts = per_category.setdefault(ann["category_id"], {"polygons": [], "rles": []})
            seg = ann.get("segmentation")
            if isinstance(seg, dict):
                parts["rles"].append(seg)
            elif isinstance(seg, list) and seg:
                try:
                    parts["polygons"].append(tuple(parse_object_polygons(seg)))
                except AnnotationError as err:
                    issues.append(f"annotation {ann.get('id')}: {err}")
            else:
                issues.append(f"annotation {ann.get('id')}: no segmentation (polygons or RLE)")
        objects = tuple(
            ObjectAnnotation(phrase=names[cid], polygon_sets=tuple(p["polygons"]), rles=tuple(p["rles"]))
            for cid, p in sorted(per_category.items())
        )
        frame = (int(image["height"]), int(image["width"])) if "height" in image and "width" in image else None
        records.append(
            VesselRecord(
                id=rid,
                source=source,
                image_path=str(image_root / str(image.get("file_name", ""))),
                objects=objects,
                frame=frame,
                issues=tuple(issues),
            )
        )
    return records
