"""Feeding predict.py's loop: loader workers build small chunks, the chunks of a batch are merged on the device.

A DataLoader worker builds one whole `collate_fn` result at a time. With batches of 32, the first batch is ready
only after one worker has read and encoded 32 images while the GPU waits (on 512 PNGs that wait was most of
the loop's 28 % input share). Here each worker task is a chunk of a few images (`chunk_size`: the batch spread
over the workers), every worker works on the first batch at once, and the chunks, pinned by the loader, are
copied to the GPU without blocking and concatenated there: no host-side copy of the batch's pixels.

The merged batch is what `vseg.inference.inputs.collate` would have built from the same samples (text padded on
the right to the longest sample of the batch), with its tensors already on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from vseg.inference.engine import to_device

#: per-sample lists of a collated batch, concatenated in order when chunks are merged
_LISTS = (
    "ids",
    "image_ids",
    "image_sizes",
    "items",
    "images",
    "truths",
    "fov_masks",
    "mllm_single",
    "failed",
    "targets",
    "pixel_spacings",
    "fov",
    "masks",
)
#: (B, L) text tensors, padded on the right with this value when chunks of different lengths meet
_TEXT = {"input_ids": None, "labels": -100, "attention_mask": 0}


def chunk_size(batch_size: int, num_workers: int) -> int:
    """Images per loader task: the largest divisor of `batch_size` not above its share per worker."""
    if num_workers <= 1:
        return batch_size
    share = -(-batch_size // num_workers)
    return max(d for d in range(1, share + 1) if batch_size % d == 0)


def _count(batch: dict[str, Any]) -> int:
    return len(batch.get("items", ())) + len(batch.get("failed", ()))


def merge(chunks: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """One batch from collated chunks (same keys, tensors on one device), in chunk order."""
    if len(chunks) == 1:
        return chunks[0]
    merged: dict[str, Any] = {}
    for key in _LISTS:
        if any(key in c for c in chunks):
            merged[key] = [x for c in chunks for x in c.get(key, [None] * len(c.get("items", ())))]
    with_text = [c for c in chunks if "input_ids" in c]
    if with_text:
        length = max(int(c["input_ids"].shape[1]) for c in with_text)
        for key, fill in _TEXT.items():
            if key not in with_text[0]:
                continue
            value = pad_id if fill is None else fill
            parts = []
            for c in with_text:
                t = c[key]
                if t.shape[1] < length:
                    t = torch.cat([t, t.new_full((t.shape[0], length - t.shape[1]), value)], dim=1)
                parts.append(t)
            merged[key] = torch.cat(parts)
        merged["sam_pixel_values"] = torch.cat([c["sam_pixel_values"] for c in with_text])
        merged["mllm_inputs"] = {
            k: torch.cat([c["mllm_inputs"][k] for c in with_text]) for k in with_text[0]["mllm_inputs"]
        }
        if all("masks_low_res" in c for c in with_text):
            merged["masks_low_res"] = torch.cat([c["masks_low_res"] for c in with_text])
    return merged


def device_batches(
    chunks: Iterable[dict[str, Any]], batch_size: int, device: torch.device | None, pad_id: int
) -> Iterator[dict[str, Any]]:
    """Batches of `batch_size` inputs (the last may be smaller) from loader chunks, moved to `device` on arrival
    (None: left where they are) and merged there."""
    group: list[dict[str, Any]] = []
    count = 0
    for chunk in chunks:
        group.append(to_device(chunk, device) if device is not None else chunk)
        count += _count(chunk)
        if count >= batch_size:
            yield merge(group, pad_id)
            group, count = [], 0
    if group:
        yield merge(group, pad_id)
