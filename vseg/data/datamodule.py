"""The Lightning DataModule and the loader that tells each micro-batch about its accumulation window.

Training batches come through `WindowedLoader`: it reads ahead one optimisation window (the
`accumulate_grad_batches` micro-batches of one optimizer step) and stamps every batch with the window's
mask and answer-token counts, so the losses can be normalised over the whole window (see vseg.losses).
It also owns the distributed sampler, so every rank sees a disjoint shard in a seeded order per epoch, and
stamps every batch with the seconds the training process waited for it (`batch["input_wait_s"]`): the
monitor turns them into the share of each window spent waiting for inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from vseg.config import DataConfig
from vseg.data.check import DatasetProblems, DatasetReport, check_dataset
from vseg.data.dataset import SegmentationDataset, expand
from vseg.data.workers import WorkerInit
from vseg.model.processor import Sa2VAProcessor
from vseg.model.sa2va import IGNORE_INDEX

log = logging.getLogger(__name__)


def batch_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """(masks, supervised next-token targets) in one collated batch."""
    masks = int(batch["masks_low_res"].shape[0]) if "masks_low_res" in batch else 0
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return masks, tokens


class WindowedLoader:
    """Iterates a DataLoader in windows of `accumulate` batches, adding `batch["window"]` counts.

    The last window of an epoch may be shorter; its batches carry that shorter window's counts.

    It is resumable (Lightning saves `state_dict()` in checkpoints): a run resumed mid-epoch continues the
    same epoch's sample order after the batches already trained on, instead of restarting the epoch.
    `consumed` tells how many batches of the current epoch were trained on (the trainer's count: the
    loader itself runs ahead by Lightning's prefetch); without it, the batches handed out are counted.
    """

    def __init__(self, loader: DataLoader, accumulate: int):
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.loader = loader
        self.accumulate = accumulate
        self.epoch = 0
        self.consumed: Callable[[], int] | None = None
        self._handed_out = 0
        self._skip = 0  # batches of the next epoch iterated that were already trained on
        generator = getattr(loader, "generator", None)
        self._generator_seed = generator.initial_seed() if generator is not None else None

    def state_dict(self) -> dict[str, int]:
        """The epoch being iterated and how many of its batches were trained on."""
        batches = self.consumed() if self.consumed is not None else self._handed_out
        return {"epoch": max(self.epoch - 1, 0), "batches": int(batches) if self.epoch else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = int(state["epoch"]), int(state["batches"])
        if self._skip >= len(self):  # saved on the epoch's last batch: continue with the next epoch
            self.epoch, self._skip = self.epoch + 1, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if hasattr(self.loader.dataset, "set_epoch"):  # augmentation draws (workers start fresh each epoch)
            self.loader.dataset.set_epoch(self.epoch)
        if self._generator_seed is not None:  # worker seeds: a function of the epoch, not of history
            self.loader.generator.manual_seed(self._generator_seed + self.epoch)
        self.epoch += 1
        skip, self._skip = self._skip, 0
        batches: Iterator[dict[str, Any]]
        if isinstance(sampler, _ResumableSampler):
            sampler.skip = skip * (self.loader.batch_size or 1)  # skipped by index: never loaded
            batches = iter(self.loader)
        else:
            batches = (b for i, b in enumerate(self.loader) if i >= skip)
        self._handed_out = skip
        pending: list[dict[str, Any]] = []
        for batch in _timed(batches):
            self._handed_out += 1
            pending.append(batch)
            if len(pending) == self.accumulate:
                yield from self._stamp(pending)
                pending = []
        if pending:
            yield from self._stamp(pending)

    @staticmethod
    def _stamp(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        counts = [batch_counts(b) for b in batches]
        window = {"masks": sum(c[0] for c in counts), "tokens": sum(c[1] for c in counts), "size": len(batches)}
        for b in batches:
            b["window"] = dict(window)
        return batches


def _timed(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The batches, each stamped with how long this process waited for it (host seconds, no GPU involved):
    the time blocked on the DataLoader's workers, or spent building the batch when there are none."""
    batches = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        batch["input_wait_s"] = time.perf_counter() - start
        yield batch


class _ResumableSampler(Sampler):
    """Wraps a sampler so that one iteration can start after its first `skip` indices (mid-epoch resume)."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        for i, index in enumerate(self.sampler):
            if i >= skip:
                yield index


class _EpochSeededSampler(RandomSampler):
    """Single-process shuffling with the same seed-per-epoch rule as DistributedSampler."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


class VesselDataModule(L.LightningDataModule):
    """Vessel data for Sa2VA from any source: checked, split by image, repeated, augmented, batched.

    Args:
        cfg: data settings.
        processor: the model's processor (tokenizer, image branches).
        accumulate: micro-batches per optimizer step (for window-normalised losses).
        report: a finished `check_dataset` report to reuse (training checks the data before building
            the model); None checks in `setup`.
        feature_stores: the disk feature cache's stores: training samples carry their content keys and name
            the entries already on disk, which are read as the loader pins each batch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        processor: Sa2VAProcessor,
        accumulate: int = 1,
        report: DatasetReport | None = None,
        feature_stores: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.feature_stores = feature_stores
        self.cfg = cfg
        self.processor = processor
        self.accumulate = accumulate
        self.report = report
        self.train_set: SegmentationDataset | None = None
        self.val_set: SegmentationDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c = self.cfg
        report = self.report if self.report is not None else checked_dataset(c, progress=False)
        self.report = report
        self.train_set = SegmentationDataset(
            expand(report.train, c.objects),
            self.processor,
            c,
            c.repeats,
            train=True,
            feature_stores=self.feature_stores,
        )
        self.val_set = SegmentationDataset(expand(report.val, c.objects), self.processor, c, 1, train=False)

    def _distributed(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> WindowedLoader:
        assert self.train_set is not None, "setup() first"
        world, rank = self._distributed()
        if world > 1:
            sampler = DistributedSampler(
                self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.cfg.seed
            )
        else:
            sampler = _EpochSeededSampler(self.train_set, seed=self.cfg.seed)
        loader = DataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            sampler=_ResumableSampler(sampler),
            generator=torch.Generator().manual_seed(self.cfg.seed),  # keeps the global RNG out of data loading
            collate_fn=self.processor.collate,
            num_workers=self.cfg.num_workers,
            worker_init_fn=WorkerInit(),  # workers end with this process, even after kill -9
            pin_memory=torch.cuda.is_available(),
        )
        windowed = WindowedLoader(loader, self.accumulate)
        windowed.consumed = self._batches_trained
        return windowed

    def _batches_trained(self) -> int:
        """Batches of the current epoch the trainer has finished (what a checkpoint must skip on resume)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "setup() first"
        world, rank = self._distributed()
        if world > len(self.val_set):
            raise ValueError(
                f"the validation split has {len(self.val_set)} images for {world} processes; every process needs "
                "at least one: raise data.split.val_fraction or add images"
            )
        sampler = (
            # Unrepeated: no padding duplicates, so validation metrics count every image exactly once.
            UnrepeatedDistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
            if world > 1
            else None
        )
        return DataLoader(
            self.val_set,
            batch_size=self.cfg.val_batch_size,
            sampler=sampler,
            collate_fn=self.processor.collate,
            num_workers=self.cfg.num_workers,
            worker_init_fn=WorkerInit(),
            pin_memory=torch.cuda.is_available(),
        )


def checked_dataset(cfg: DataConfig, progress: bool = True) -> DatasetReport:
    """`check_dataset` for training: raises DatasetProblems with the report when the data is not usable."""
    report = check_dataset(cfg, workers=max(cfg.num_workers, 1) if cfg.num_workers else None, progress=progress)
    if not report.ok:
        raise DatasetProblems("the dataset has problems (same report as `vseg check`):\n" + report.format(limit=50))
    if report.bad:
        log.warning(
            "data.skip_invalid=true: skipping %d of %d images with problems", len(report.bad), len(report.checks)
        )
    return report
