"""Items, the deterministic split and the training dataset.

Records are split by image (never by repeat or object, so nothing leaks between train and val). Each record
then becomes one item (`data.objects=merge`: all objects form one vessel mask) or one item per object
(`per_object`: prompted with the object's phrase). `SegmentationDataset` repeats the items, draws a phrasing
and an augmentation per (epoch, index) from seeded generators, and hands the sample to the model's
processor, so training, validation and prediction share one path from pixels to tensors.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vseg.artifacts.feature_store import FeatureStore, content_key
from vseg.config import AugmentConfig, DataConfig, SplitConfig, parse_spacing
from vseg.data.augment import Augmenter
from vseg.data.geometry import Resize
from vseg.data.records import VesselRecord, load_sample
from vseg.data.sources import DataSourceError
from vseg.model.processor import Sa2VAProcessor


@dataclass(frozen=True)
class Item:
    """A record and which of its objects is the target (None: all objects merged into one mask)."""

    record: VesselRecord
    object_index: int | None = None

    @property
    def id(self) -> str:
        return self.record.id if self.object_index is None else f"{self.record.id}_obj{self.object_index}"


def expand(records: Sequence[VesselRecord], objects: str) -> list[Item]:
    """Records -> items: one per record (merge) or one per object (per_object)."""
    if objects == "per_object":
        return [Item(r, k) for r in records for k in range(max(len(r.objects), 1))]
    return [Item(r) for r in records]


def target_names(items: Sequence[Item]) -> list[str]:
    """The object names of per-object items, sorted (validation scores each: val/dice/<name>); [] for merged."""
    names = set()
    for item in items:
        objects = item.record.objects
        if item.object_index is not None and item.object_index < len(objects) and objects[item.object_index].phrase:
            names.add(str(objects[item.object_index].phrase))
    return sorted(names)


def _read_ids(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]


def split_records(
    records: Sequence[VesselRecord], split: SplitConfig, seed: int
) -> tuple[list[VesselRecord], list[VesselRecord]]:
    """Deterministic train/val split; raises DataSourceError when a record would end up in neither."""
    if split.mode == "random":
        if len(records) < 2:
            raise DataSourceError(f"need at least 2 images to split, got {len(records)}")
        order = np.random.default_rng(seed).permutation(len(records))
        n_val = min(max(1, round(split.val_fraction * len(records))), len(records) - 1)
        val, train = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
        return [records[i] for i in train], [records[i] for i in val]
    if split.mode == "field":
        train_tags, val_tags = set(split.train_values), set(split.val_values)
        stray = sorted({str(r.group) for r in records if r.group not in train_tags | val_tags})
        if stray:
            raise DataSourceError(
                f"data.split.mode=field: records tagged {stray} are in neither data.split.train_values="
                f"{sorted(train_tags)} nor val_values={sorted(val_tags)}"
            )
        train = [r for r in records if r.group in train_tags]
        val = [r for r in records if r.group in val_tags]
    else:
        train_ids, val_ids = _read_ids(split.train_file or ""), _read_ids(split.val_file or "")
        known = {r.id for r in records}
        unknown = sorted((set(train_ids) | set(val_ids)) - known)
        both = sorted(set(train_ids) & set(val_ids))
        missing = sorted(known - set(train_ids) - set(val_ids))
        problems = []
        if unknown:
            problems.append(f"ids not in the dataset: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        if both:
            problems.append(f"ids in both files: {both[:10]}")
        if missing:
            problems.append(f"{len(missing)} records in neither file: {missing[:10]}")
        if problems:
            raise DataSourceError(f"data.split files {split.train_file} / {split.val_file}: " + "; ".join(problems))
        train_set, val_set = set(train_ids), set(val_ids)
        train = [r for r in records if r.id in train_set]
        val = [r for r in records if r.id in val_set]
    if not train or not val:
        raise DataSourceError(
            f"data.split ({split.mode}): {len(train)} train and {len(val)} val images; both need some"
        )
    return train, val


class SegmentationDataset(Dataset):
    """Items x repeats at the training size, augmented (training only) and encoded by the processor.

    Args:
        items: what to serve (records with their target object).
        processor: turns (image, question, answer, mask) into tensors.
        cfg: data settings (size, aspect, holes, phrasings, answer, augmentation).
        repeats: how many times each item appears per epoch.
        train: draw phrasings and augmentation; False: first phrasing, no augmentation (validation).
        content_keys: add `content_keys` to each sample, hashes of the encoders' inputs (`sam`: SAM-2 pixels,
            `vision`: the MLLM's image tensor) that the disk feature cache files its entries under.
        feature_stores: the disk feature cache's stores by part: each sample also carries `cached_features`,
            a `StoredEntry` per part already on disk (read when the loader pins the batch, off the training
            step's path), None where the step must encode.
    """

    def __init__(
        self,
        items: Sequence[Item],
        processor: Sa2VAProcessor,
        cfg: DataConfig,
        repeats: int = 1,
        train: bool = True,
        content_keys: bool = False,
        feature_stores: dict[str, FeatureStore] | None = None,
    ):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.items = list(items)
        self.processor = processor
        self.cfg = cfg
        self.repeats = repeats
        self.train = train
        self.augment = Augmenter(cfg.augment if train else AugmentConfig(enabled=False))
        self.feature_stores = feature_stores or {}
        self.content_keys = content_keys or bool(self.feature_stores)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Augmentation and phrasing draws depend on the epoch (workers are re-created per epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def question_for(self, index: int, phrase: str | None) -> str:
        per_object = self.cfg.objects == "per_object"
        choices = self.cfg.object_prompts if per_object else self.cfg.prompts
        pick = 0
        if self.train:
            rng = np.random.default_rng([self.cfg.seed, index])
            pick = int(rng.integers(len(choices)))
        text = choices[pick]
        return text.format(phrase=phrase or "blood vessels") if per_object else text

    def variant_of(self, index: int) -> int | None:
        """Which fixed augmented variant visit `index` of this epoch sees (`data.augment.variants`); None: a
        fresh draw (variants 0) or no augmentation."""
        variants = self.cfg.augment.variants
        if not (self.train and self.augment.cfg.enabled and variants >= 1):
            return None
        return int(np.random.default_rng([self.cfg.seed, self.epoch, index, 3]).integers(variants))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.sample(index, self.variant_of(index))

    def sample(self, index: int, variant: int | None = None) -> dict[str, Any]:
        """Visit `index` (item `index % len(items)`); `variant`: that fixed augmented variant of its image (the
        same pixels for every object of the image, every epoch and every rank), None: this visit's own draw."""
        item = self.items[index % len(self.items)]
        c = self.cfg
        sample = load_sample(item.record, c.image_size, c.aspect, c.holes)
        if item.object_index is None:
            masks, phrase = sample.masks.any(axis=0, keepdims=True), None
        else:
            masks, phrase = sample.masks[item.object_index : item.object_index + 1], sample.phrases[item.object_index]
        image, fov = sample.image, sample.fov
        if self.train and variant is not None:
            rng = np.random.default_rng([c.seed, zlib.crc32(item.record.id.encode()), variant, 4])
            image, masks, fov = self.augment(image, masks, fov, rng)
        elif self.train:
            rng = np.random.default_rng([c.seed, self.epoch, index, 1])
            image, masks, fov = self.augment(image, masks, fov, rng)
        features = self.processor.encode(image, self.question_for(index, phrase), c.answer, masks, sample_id=item.id)
        if self.content_keys:
            features["content_keys"] = {
                "sam": content_key(features["sam_pixel_values"]),
                "vision": content_key(features["mllm_inputs"]["pixel_values"]),
                "tiles": int(features["mllm_inputs"]["pixel_values"].shape[0]),
            }
        if self.feature_stores:  # None where not on disk (yet): the training step encodes it
            keys = features["content_keys"]
            features["cached_features"] = {part: s.entry(keys[part]) for part, s in self.feature_stores.items()}
        if fov is not None:
            features["fov"] = fov
        features["image_id"] = item.record.id  # the objects of one image share its SAM-2 features
        if phrase:
            features["target"] = phrase  # per-target validation scores (val/dice/<target>)
        if c.pixel_spacing is not None:
            features["pixel_spacing"] = scaled_spacing(c, sample.original_size)
        return features


def scaled_spacing(cfg: DataConfig, original_size: tuple[int, int]) -> tuple[float, float] | None:
    """`data.pixel_spacing` (mm per pixel of the original image) at the training size: resizing a side by a
    factor divides its pixel size by that factor (padding adds pixels of the same size)."""
    spacing = parse_spacing(cfg.pixel_spacing)
    if spacing is None:
        return None
    plan = Resize.plan(*original_size, cfg.image_size, cfg.aspect)
    return spacing[0] * plan.height / plan.out_height, spacing[1] * plan.width / plan.out_width
