"""`vseg check`: read every record of a dataset the way training will, report what is there and what is wrong.

The same `check_dataset` runs at the start of training, which refuses a dataset with problems (listing all
of them) unless `data.skip_invalid=true`, which skips those records and says how many. `dump=DIR` writes
each sample exactly as the model receives it (after resizing, before augmentation): `<id>_image.png`,
`<id>_mask.png` and `<id>_overlay.png`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vseg.config import ConfigError, DataConfig, compose, load_config
from vseg.data.dataset import expand, split_records
from vseg.data.records import Sample, VesselRecord, inspect_sample
from vseg.data.sources import read_records

log = logging.getLogger(__name__)


class DatasetProblems(ConfigError):
    """A dataset with problems; the message is the full report."""


@dataclass
class RecordCheck:
    """What checking one record found."""

    record: VesselRecord
    original_size: tuple[int, int]
    resized: bool
    foreground: float  # share of the (merged) target mask, inside the image
    objects: int
    has_fov: bool
    digest: str  # hash of the decoded pixels (duplicate detection)
    problems: list[str] = field(default_factory=list)


@dataclass
class DatasetReport:
    """Everything `vseg check` prints; `usable` are the records training may use."""

    cfg: DataConfig
    checks: list[RecordCheck]
    train: list[VesselRecord] = field(default_factory=list)
    val: list[VesselRecord] = field(default_factory=list)
    split_error: str | None = None

    @property
    def bad(self) -> list[RecordCheck]:
        return [c for c in self.checks if c.problems]

    @property
    def usable(self) -> list[VesselRecord]:
        return [c.record for c in self.checks if not c.problems]

    @property
    def ok(self) -> bool:
        return (not self.bad or self.cfg.skip_invalid) and self.split_error is None

    def format(self, limit: int | None = None) -> str:
        c = self.cfg
        lines = [f"dataset: source={c.source}" + (f" ({c.name})" if c.name else "")]
        for source, n in Counter(ch.record.source for ch in self.checks).items():
            lines.append(f"  {n} images from {source}")
        if self.split_error is None:
            lines.append(
                f"  split ({c.split.mode}): train {len(self.train)} images, val {len(self.val)} images; "
                f"train items per epoch {len(expand(self.train, c.objects)) * c.repeats} (repeats {c.repeats})"
            )
        sizes = Counter(ch.original_size for ch in self.checks if ch.original_size != (0, 0))
        shown = ", ".join(f"{w}x{h} ({n})" for (h, w), n in sizes.most_common(6))
        lines.append(f"  original sizes (width x height): {shown}{' ...' if len(sizes) > 6 else ''}")
        target = "kept as they are" if c.image_size is None else f"{c.image_size}x{c.image_size} ({c.aspect})"
        lines.append(f"  rescaled to {target}: {sum(ch.resized for ch in self.checks)} images")
        fg = np.array([ch.foreground for ch in self.checks if ch.original_size != (0, 0)])
        if fg.size:
            lines.append(
                f"  foreground fraction: mean {fg.mean():.4f}, min {fg.min():.4f}, max {fg.max():.4f}; "
                f"empty masks: {int((fg == 0).sum())}"
            )
        objects = Counter(ch.objects for ch in self.checks)
        lines.append("  objects per image: " + ", ".join(f"{k} ({n})" for k, n in sorted(objects.items())))
        lines.append(f"  field-of-view masks: {sum(ch.has_fov for ch in self.checks)}")
        bad = self.bad
        if not bad and self.split_error is None:
            lines.append("no problems found")
            return "\n".join(lines)
        if bad:
            verb = "skipped (data.skip_invalid=true)" if c.skip_invalid else "found"
            lines.append(f"{len(bad)} of {len(self.checks)} images have problems ({verb}):")
            for ch in bad[:limit]:
                where = f" [{ch.record.image_path}]" if ch.record.image_path else ""
                for problem in ch.problems:
                    lines.append(f"  - {ch.record.id}{where}: {problem}")
            if limit is not None and len(bad) > limit:
                lines.append(f"  ... and {len(bad) - limit} more (vseg check lists them all)")
            if not c.skip_invalid:
                lines.append("fix them, or set data.skip_invalid=true to train without them (they are counted)")
        if self.split_error is not None:
            lines.append(f"split: {self.split_error}")
        return "\n".join(lines)


def check_record(record: VesselRecord, cfg: DataConfig) -> tuple[RecordCheck, Sample]:
    sample = inspect_sample(record, cfg.image_size, cfg.aspect, cfg.holes)
    problems = list(sample.problems)
    valid = sample.image.size > 0
    merged = sample.masks.any(axis=0) if valid else np.zeros((0, 0), bool)
    inside = sample.fov if sample.fov is not None else np.ones_like(merged)
    foreground = float(merged[inside].mean()) if valid and inside.any() else 0.0
    if valid and not cfg.allow_empty and not problems:  # (a broken annotation already explains an empty mask)
        if not merged.any():
            problems.append(
                "the target mask is empty (set data.allow_empty=true if images without vessels are intended)"
            )
        elif cfg.objects == "per_object":
            empty = [k for k in range(sample.masks.shape[0]) if not sample.masks[k].any()]
            if empty:
                problems.append(f"objects {empty} have empty masks at this size")
    digest = hashlib.blake2b(sample.image.tobytes(), digest_size=12).hexdigest() if valid else ""
    check = RecordCheck(
        record,
        sample.original_size,
        sample.resized,
        foreground,
        len(record.objects),
        sample.fov is not None,
        digest,
        problems,
    )
    return check, sample


def check_dataset(
    cfg: DataConfig, workers: int | None = None, progress: bool = True, dump: str | Path | None = None
) -> DatasetReport:
    """Reads and checks every record; finds duplicates; splits the usable records as training will."""
    records = read_records(cfg)
    workers = workers or max(1, min(8, (os.cpu_count() or 2)))
    dump_dir = Path(dump) if dump else None
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)

    def one(record: VesselRecord) -> RecordCheck:
        check, sample = check_record(record, cfg)
        if dump_dir is not None and sample.image.size:
            _dump(sample, cfg, dump_dir)
        return check

    with ThreadPoolExecutor(max_workers=workers) as pool:
        iterator = pool.map(one, records)
        checks = list(tqdm(iterator, total=len(records), desc="checking", unit="img", disable=not progress))
    _mark_duplicates(checks)
    report = DatasetReport(cfg, checks)
    usable = report.usable if cfg.skip_invalid else [c.record for c in checks]
    try:
        report.train, report.val = split_records(usable, cfg.split, cfg.seed)
    except ConfigError as err:
        report.split_error = str(err)
    return report


def _mark_duplicates(checks: list[RecordCheck]) -> None:
    ids: dict[str, str] = {}
    paths: dict[str, str] = {}
    pixels: dict[str, tuple[str, str]] = {}
    for ch in checks:
        r = ch.record
        if r.id in ids:
            ch.problems.append(f"duplicate id (also used by another record from {ids[r.id]})")
        ids.setdefault(r.id, r.source)
        path = str(Path(r.image_path).resolve()) if r.image_path else ""
        if path and path in paths:
            ch.problems.append(f"duplicate: the same image file as record {paths[path]}")
        elif ch.digest and ch.digest in pixels and pixels[ch.digest][1] != path:
            ch.problems.append(f"duplicate: identical pixels to record {pixels[ch.digest][0]}")
        if path:
            paths.setdefault(path, r.id)
        if ch.digest:
            pixels.setdefault(ch.digest, (r.id, path))


def _dump(sample: Sample, cfg: DataConfig, out: Path) -> None:
    planes = [(sample.id, sample.masks.any(axis=0))]
    if cfg.objects == "per_object":
        planes = [(f"{sample.id}_obj{k}", sample.masks[k]) for k in range(sample.masks.shape[0])]
    Image.fromarray(sample.image).save(out / f"{sample.id}_image.png")
    for name, mask in planes:
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{name}_mask.png")
        overlay = sample.image.copy()
        overlay[mask] = (0.5 * overlay[mask] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
        if sample.fov is not None:
            edge = sample.fov ^ np.roll(sample.fov, 1, axis=0) | sample.fov ^ np.roll(sample.fov, 1, axis=1)
            overlay[edge] = (255, 255, 0)
        Image.fromarray(overlay).save(out / f"{name}_overlay.png")


def main(overrides: list[str]) -> int:
    """`vseg check data=... [key=value ...] [dump=DIR] [workers=N]`."""
    own = {"dump": None, "workers": None}
    rest = []
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key in own:
            own[key] = value or None
        else:
            rest.append(arg)
    cfg = load_config(compose("train", rest))
    report = check_dataset(cfg.data, workers=int(own["workers"]) if own["workers"] else None, dump=own["dump"])
    print(report.format())
    if own["dump"]:
        print(f"samples as the model sees them: {Path(own['dump']).resolve()}")
    if report.bad or report.split_error:
        return 1
    return 0
