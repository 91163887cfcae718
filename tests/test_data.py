"""Synthetic records, split, repeats, prompt phrasings, collation and accumulation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vseg.config import DataConfig, SplitConfig
from vseg.data.datamodule import VesselDataModule, WindowedLoader, batch_counts
from vseg.data.dataset import SegmentationDataset, expand, split_records
from vseg.data.records import load_sample
from vseg.data.sources import synthetic_records


def _synthetic(n: int, size: int, style: str, seed: int, **kw) -> tuple[DataConfig, list]:
    cfg = DataConfig(num_samples=n, image_size=size, style=style, seed=seed, **kw)
    return cfg, synthetic_records(cfg)


def test_records_are_deterministic_and_split_is_disjoint():
    _, a = _synthetic(10, 64, "mixed", seed=3)
    _, b = _synthetic(10, 64, "mixed", seed=3)
    for ra, rb in zip(a, b, strict=True):
        sa, sb = load_sample(ra, 64), load_sample(rb, 64)
        assert np.array_equal(sa.image, sb.image) and np.array_equal(sa.masks, sb.masks)
    split = SplitConfig(val_fraction=0.3)
    train, val = split_records(a, split, seed=1)
    assert len(val) == 3 and len(train) == 7
    assert not {r.id for r in train} & {r.id for r in val}
    assert [r.id for r in split_records(a, split, seed=1)[1]] == [r.id for r in val]
    assert [r.id for r in split_records(a, split, seed=2)[1]] != [r.id for r in val]


def test_repeats_and_prompt_phrasings(built):
    _, _, processor = built
    prompts = ["A?", "B?", "C?", "D?"]
    cfg, records = _synthetic(3, 64, "fundus", seed=0, prompts=prompts)
    ds = SegmentationDataset(expand(records, "merge"), processor, cfg, repeats=4)
    assert len(ds) == 12
    assert ds[0]["id"] == ds[3]["id"] == records[0].id
    phrasings = {ds.question_for(i, None) for i in range(len(ds))}
    assert len(phrasings) > 1 and phrasings <= set(prompts)
    assert [ds.question_for(i, None) for i in range(12)] == [ds.question_for(i, None) for i in range(12)]
    val = SegmentationDataset(expand(records, "merge"), processor, cfg, train=False)
    assert {val.question_for(i, None) for i in range(3)} == {"A?"}
    with pytest.raises(IndexError):
        ds[12]


def test_collate_pads_text_and_stacks_images(built):
    _, tokenizer, processor = built
    _, records = _synthetic(2, 64, "angiogram", seed=0)
    samples = [load_sample(r, 64) for r in records]
    questions = ["Short?", "A much longer question about the vessels here?"]
    items = [
        processor.encode(s.image, q, "It is [SEG].", s.masks, s.id) for s, q in zip(samples, questions, strict=True)
    ]
    batch = processor.collate(items)
    lengths = [len(i["input_ids"]) for i in items]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    shorter = int(np.argmin(lengths))
    assert (batch["input_ids"][shorter, min(lengths) :] == tokenizer.pad_token_id).all()
    assert batch["sam_pixel_values"].shape == (2, 3, 128, 128)
    assert batch["mllm_inputs"]["pixel_values"].shape[0] == 2  # one tile each
    assert batch["masks_low_res"].shape == (2, 32, 32)
    assert [m.shape for m in batch["masks"]] == [(1, 64, 64), (1, 64, 64)]


def test_windowed_loader_stamps_window_counts(built):
    _, _, processor = built
    cfg, records = _synthetic(5, 64, "mixed", seed=0, prompts=["Segment the vessels."])
    ds = SegmentationDataset(expand(records, "merge"), processor, cfg)
    loader = WindowedLoader(DataLoader(ds, batch_size=1, collate_fn=processor.collate), accumulate=2)
    batches = list(loader)
    assert len(batches) == 5
    sizes = [b["window"]["size"] for b in batches]
    assert sizes == [2, 2, 2, 2, 1]  # the last window of the epoch is short
    per_batch = [batch_counts(b) for b in batches]
    assert batches[0]["window"]["masks"] == per_batch[0][0] + per_batch[1][0] == 2
    assert batches[4]["window"]["tokens"] == per_batch[4][1]


def test_windowed_loader_stamps_how_long_each_batch_was_waited_for():
    """Each batch carries the seconds its fetch blocked the training process (the monitor's input-wait share)."""
    import time

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            time.sleep(0.05 if i == 2 else 0.0)
            return {"x": torch.tensor(i), "labels": torch.zeros(1, 2, dtype=torch.long)}

    def collate(items):
        return {"x": torch.stack([i["x"] for i in items]), "labels": torch.cat([i["labels"] for i in items])}

    batches = list(WindowedLoader(DataLoader(Slow(), batch_size=1, collate_fn=collate), accumulate=2))
    waits = [b["input_wait_s"] for b in batches]
    assert len(waits) == 4 and all(w >= 0.0 for w in waits)
    assert waits[2] >= 0.05 and max(waits[0], waits[1], waits[3]) < 0.05


def test_datamodule_shuffles_per_epoch_reproducibly(cfg, built):
    _, _, processor = built
    dm = VesselDataModule(cfg.data, processor)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = [tuple(b["ids"]) for b in loader]
    epoch1 = [tuple(b["ids"]) for b in loader]
    assert epoch0 != epoch1
    dm2 = VesselDataModule(cfg.data, processor)
    dm2.setup("fit")
    assert [tuple(b["ids"]) for b in dm2.train_dataloader()] == epoch0
    assert len(dm.val_set) + len(dm.train_set) == cfg.data.num_samples
    assert dm.report is not None and not dm.report.bad
    assert torch.is_tensor(next(iter(dm.val_dataloader()))["input_ids"])
