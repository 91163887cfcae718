"""Shared fixtures: composed configs and a tiny built model, all on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vseg.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """The Hydra config `train.py` would see for these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


def tiny_cfg(overrides: list[str] | None = None) -> TrainConfig:
    """Validated TrainConfig for the tiny model with fast test settings plus `overrides`."""
    base = [
        "data.num_samples=8",
        "data.batch_size=2",
        "data.val_batch_size=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    return load_config(compose_cfg(base + list(overrides or [])))


def random_batch(processor, sizes=((60, 72), (60, 72)), seed: int = 0) -> dict:
    """A collated batch of random images (one per entry of `sizes`) with random masks, asking for one [SEG]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples = [
        processor.encode(
            rng.integers(0, 255, (*size, 3), dtype=np.uint8),
            "Segment the vessels.",
            "It is [SEG].",
            rng.random(size) > 0.7,
            sample_id=f"s{i}",
        )
        for i, size in enumerate(sizes)
    ]
    return processor.collate(samples)


@pytest.fixture
def cfg() -> TrainConfig:
    return tiny_cfg()


@pytest.fixture
def built(cfg):
    """(model, tokenizer, processor) for the tiny config."""
    import torch

    from vseg.artifacts import build_sa2va
    from vseg.model.processor import Sa2VAProcessor

    torch.manual_seed(0)
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)
    return model, tokenizer, processor
