"""`vseg cache [train overrides]`: encodes a run's training images once into the disk feature cache.

Same config as train.py (the same overrides give the same model, data, split, variants and precision), so
training then reads every frozen feature from disk from its first step: the partitioned encoders of a ZeRO-3
run are never called, and the first epoch is as fast as the rest. Without this pass the cache fills on each
image's first visit. One process on one device (the first GPU, or the CPU); entries already on disk are
skipped, so an interrupted pass continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vseg.config import ConfigError, TrainConfig, compose, load_config
from vseg.training.feature_cache import FrozenFeatures, encoder_dtype

log = logging.getLogger(__name__)


class _Visits(Dataset):
    """Every (item, variant) the training set can show: each image once, or each of its fixed variants."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        c = dataset.cfg.augment
        variants = list(range(c.variants)) if (c.enabled and c.variants >= 1) else [None]
        self.visits = [(i, v) for i in range(len(dataset.items)) for v in variants]

    def __len__(self) -> int:
        return len(self.visits)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item, variant = self.visits[index]
        return self.dataset.sample(item, variant)


def cache_config(overrides: list[str]) -> TrainConfig:
    """The training config of `overrides` with the cache on and its directory resolved."""
    cfg = load_config(compose("train", ["feature_cache.enabled=true", *overrides]))
    if not cfg.feature_cache.dir:
        if not cfg.run_dir:
            raise ConfigError(
                "feature_cache.dir is not set: give feature_cache.dir=DIR (node-local; pass the same to train.py) "
                "or run_dir=RUN (the cache goes to RUN/feature_cache, where train.py run_dir=RUN looks)"
            )
        fc = dataclasses.replace(cfg.feature_cache, dir=f"{cfg.run_dir}/feature_cache")
        cfg = dataclasses.replace(cfg, feature_cache=fc)
    if cfg.model.path is None and cfg.strategy.stage == 3:
        raise ConfigError(
            "a random-init base (model.path=null) is drawn differently under ZeRO-3; its cache fills on "
            "first visit during training instead"
        )
    return cfg


@contextlib.contextmanager
def _encoding_as_in_training(cfg: TrainConfig, model: Any, device: torch.device) -> Iterator[None]:
    """The frozen encoders' numerics of the training run: DeepSpeed with bf16/fp16 casts the parameters and runs
    without autocast; Lightning's `*-mixed` autocasts; `*-true` converts the module."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    half = encoder_dtype(precision)
    if half is not None and (cfg.strategy.stage > 0 or precision.endswith("-true")):
        for p in model.parameters():
            p.data = p.data.to(half)
        yield
    elif half is not None and precision.endswith("-mixed"):
        with torch.autocast(device.type, dtype=half):
            yield
    else:
        yield


def fill(cfg: TrainConfig, progress: bool = True) -> FrozenFeatures:
    """Encodes every training visit (image x variant) not yet on disk; returns the cache with its counts."""
    import lightning as L

    from vseg.data.datamodule import checked_dataset
    from vseg.data.dataset import SegmentationDataset, expand
    from vseg.model.processor import Sa2VAProcessor
    from vseg.training.zero3 import model_for_run

    report = checked_dataset(cfg.data, progress=progress)
    # Seeded and built as train.py builds it (model.init_device included): a random-init base is the same.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, tokenizer, _ = model_for_run(cfg)  # ZeRO-3: the CPU-loaded base of a model.path run
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval()
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)  # PIL, as training
    items = expand(report.train, cfg.data.objects)
    # entries already on disk are read (and checked) as the loader pins each batch, next to the encoding
    stores = FrozenFeatures.from_config(cfg).stores
    dataset = SegmentationDataset(items, processor, cfg.data, 1, train=True, feature_stores=stores)
    visits = _Visits(dataset)
    loader = DataLoader(
        visits,
        batch_size=cfg.data.batch_size,
        collate_fn=processor.collate,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    cache = FrozenFeatures.from_config(cfg)
    with torch.no_grad(), _encoding_as_in_training(cfg, model, device):
        for batch in tqdm(loader, desc="vseg cache", unit="batch", disable=not progress):
            batch = {**batch, "sam_pixel_values": batch["sam_pixel_values"].to(device)}
            cache.inputs(batch, model, agree=lambda flag: flag)
    return cache


def main(overrides: list[str]) -> int:
    """`vseg cache [model=...] [data=...] [feature_cache.dir=DIR | run_dir=RUN] [train overrides]`."""
    cfg = cache_config(overrides)
    cache = fill(cfg)
    print(f"vseg cache: {cache.summary()}")
    for part, store in cache.stores.items():
        print(f"  {part}: {store.disk_bytes() / 2**30:.2f} GiB on disk in {store.dir}")
    return 0
