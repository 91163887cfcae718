"""Records, the training dataset and the deterministic split.

A source yields `VesselRecord`s (an id and a way to load image + mask). `SegmentationDataset` repeats the
records, draws a prompt phrasing per item from a seeded generator, and hands the sample to the model's
processor, so training, validation and prediction share one path from pixels to tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vseg.data.synthetic import generate_vessels
from vseg.model.processor import Sa2VAProcessor


@dataclass(frozen=True)
class VesselRecord:
    """One image with its vessel mask, loaded on demand."""

    id: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # -> (HxWx3 uint8 image, HxW bool mask)


def synthetic_records(num_samples: int, size: int, style: str, seed: int) -> list[VesselRecord]:
    """Records of the seeded synthetic vessel generator; image i is the same on every machine."""

    def loader(i: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        return lambda: generate_vessels(seed=seed * 1_000_003 + i, size=size, style=style)

    return [VesselRecord(id=f"synthetic_{i:05d}", load=loader(i)) for i in range(num_samples)]


def split_records(
    records: Sequence[VesselRecord], val_fraction: float, seed: int
) -> tuple[list[VesselRecord], list[VesselRecord]]:
    """Deterministic train/val split by seed; at least one record on each side."""
    if len(records) < 2:
        raise ValueError(f"need at least 2 records to split, got {len(records)}")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(max(1, round(val_fraction * len(records))), len(records) - 1)
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [records[i] for i in train], [records[i] for i in val]


class SegmentationDataset(Dataset):
    """Records x repeats, each turned into model features with a seeded prompt phrasing.

    Args:
        records: the distinct images.
        processor: turns (image, question, answer, mask) into tensors.
        prompts: question phrasings; item i uses a phrasing drawn from a generator seeded by (seed, i),
            so the repeats of one image see different phrasings, identically on every run.
        answer: the supervised answer (one [SEG]).
        repeats: how many times each record appears per epoch.
        seed: seed of the phrasing draw.
        fixed_prompt: always use the first phrasing (validation).
    """

    def __init__(
        self,
        records: Sequence[VesselRecord],
        processor: Sa2VAProcessor,
        prompts: Sequence[str],
        answer: str,
        repeats: int = 1,
        seed: int = 0,
        fixed_prompt: bool = False,
    ):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if not prompts:
            raise ValueError("no prompt phrasings given")
        self.records = list(records)
        self.processor = processor
        self.prompts = list(prompts)
        self.answer = answer
        self.repeats = repeats
        self.seed = seed
        self.fixed_prompt = fixed_prompt

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def prompt_for(self, index: int) -> str:
        if self.fixed_prompt:
            return self.prompts[0]
        rng = np.random.default_rng([self.seed, index])
        return self.prompts[int(rng.integers(len(self.prompts)))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        record = self.records[index % len(self.records)]
        image, mask = record.load()
        return self.processor.encode(image, self.prompt_for(index), self.answer, mask, sample_id=record.id)
